"""The configs shipped inside the package, found by name, so commands need no source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from swarm.errors import ConfigError

DEFAULT_CONFIG = "digits-vit-tiny"


def shipped_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("peers.configs").iterdir()
                  if p.name.endswith(".yaml"))


def shipped_config(name: str = DEFAULT_CONFIG) -> Path:
    """The file of a shipped config. `configs/*.yaml` is installed as the package `peers.configs`
    (see pyproject.toml): an editable install resolves it to the checkout's `configs/`, a wheel to
    its own copy, so the same call works from any directory."""
    path = Path(str(resources.files("peers.configs") / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no shipped config named {name!r} (shipped: {', '.join(shipped_names())})")
    return path
