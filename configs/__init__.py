"""The shipped run configs, installed as the package `peers.configs` so that every command finds
them from any directory (`peers.shipped.shipped_config`)."""
