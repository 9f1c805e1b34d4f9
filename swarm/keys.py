"""Every DHT key of a run, derived from its run id. No key string is formatted anywhere else.

Keys are `<run_id>_<name>` so that hivemind's `SchemaValidator(prefix=run_id)` can check the fixed
ones; per-round keys carry the round number, so peers of different rounds never meet.
"""

from __future__ import annotations

import re

from swarm.errors import ConfigError

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r} must be 1-63 letters, digits or '-', starting with a letter or digit")
    return run_id


# Runs announce themselves here (subkey: run id), so `join` works without --run-id.
RUNS_KEY = "lteswarm_runs"


class RunKeys:
    def __init__(self, run_id: str):
        self.run_id = check_run_id(run_id)

    def _key(self, name: str) -> str:
        return f"{self.run_id}_{name}"

    @property
    def run(self) -> str:
        """The run's description: config, coordinator, number of rounds."""
        return self._key("run")

    @property
    def leases(self) -> str:
        """Head leases; one subkey per (head, claimant)."""
        return self._key("leases")

    @property
    def donors(self) -> str:
        """Peers that can hand out W; one subkey per peer with its round and W hash."""
        return self._key("donors")

    @property
    def peers(self) -> str:
        """Status records of the peers; one subkey per peer."""
        return self._key("peers")

    @property
    def progress(self) -> str:
        """The coordinator's per-round history (accuracy, loss, samples)."""
        return self._key("progress")

    def ready(self, round_: int) -> str:
        """Peers whose contribution to merge round `round_` is ready to download."""
        return self._key(f"round{round_}_ready")

    def hashes(self, round_: int) -> str:
        """Each peer's W hash after merge round `round_`, with the contributions it merged."""
        return self._key(f"round{round_}_hash")

    @staticmethod
    def lease_subkey(head: int, peer: str) -> str:
        return f"{head}:{peer}"

    # Names of the blobs a peer serves over P2P (not DHT keys, but owned here all the same).
    def contribution_blob(self, round_: int) -> str:
        return f"{self.run_id}/contribution/{round_}"

    @property
    def state_blob(self) -> str:
        return f"{self.run_id}/state"
