"""Every DHT key of a run, derived from its run id. No key string is formatted anywhere else.

Keys are `<run_id>_<name>` so that hivemind's `SchemaValidator(prefix=run_id)` can check the fixed
ones; per-round keys carry the round number, so peers of different rounds never meet. A run id
ends in the fingerprint of its coordinator's signing key: whoever knows the run id knows whose
run record, progress and votes to believe.
"""

from __future__ import annotations

import re

from swarm.errors import ConfigError
from swarm.identity import FINGERPRINT_CHARS, is_fingerprint

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r} must be 1-63 letters, digits or '-', starting with a letter or digit")
    return run_id


# Runs announce themselves here (subkey: run id), so `join` works without --run-id.
RUNS_KEY = "lteswarm_runs"


def make_run_id(stem: str, coordinator: str) -> str:
    """`<stem>-<coordinator fingerprint>`, the stem cut to fit."""
    clean = "".join(c if c.isalnum() or c == "-" else "-" for c in stem).strip("-") or "run"
    return check_run_id(f"{clean[:63 - FINGERPRINT_CHARS - 1].rstrip('-') or 'run'}-{coordinator}")


def pinned_coordinator(run_id: str) -> str:
    """The fingerprint a run id pins; a ConfigError if it pins none."""
    tail = run_id.rsplit("-", 1)[-1]
    if "-" not in run_id or not is_fingerprint(tail):
        raise ConfigError(f"run id {run_id!r} does not end in its coordinator's key fingerprint "
                          f"({FINGERPRINT_CHARS} hex digits); copy the run id the coordinator printed")
    return tail


class RunKeys:
    def __init__(self, run_id: str):
        self.run_id = check_run_id(run_id)
        self.coordinator = pinned_coordinator(run_id)

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
        """The run's list of peers: each one's status record, rewritten now and then; one subkey
        per peer."""
        return self._key("peers")

    def status(self, writer: str) -> str:
        """The live status record of peer `writer`, rewritten every few seconds. A key of its own:
        a DHT store first looks the key up, and every node on the way sends back all it holds
        there, so a live record in the shared list would cost each store the whole swarm's."""
        return self._key(f"status_{writer}")

    @property
    def members(self) -> str:
        """Invites of a closed run's members, each published by the member it names."""
        return self._key("members")

    @property
    def revocations(self) -> str:
        """The members of a closed run the coordinator has revoked (its record alone counts)."""
        return self._key("revoked")

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

    def verdicts(self, round_: int) -> str:
        """The coordinator's verdicts on the contributions of merge round `round_` it redid."""
        return self._key(f"round{round_}_verdicts")

    @property
    def checks(self) -> str:
        """The coordinator's checks that spare volunteers redo (`CheckRecord`)."""
        return self._key("checks")

    def undo(self, round_: int) -> str:
        """The contributions found not to reproduce that merge round `round_` takes out of W again."""
        return self._key(f"round{round_}_undo")

    def fetched(self, round_: int) -> str:
        """The contributors of merge round `round_` whose contributions the coordinator holds."""
        return self._key(f"round{round_}_fetched")

    def beacon(self, epoch: int) -> str:
        """The coordinator's seed for an epoch of rounds: it orders the members that own parts
        (`rounds.plan.epoch`, `rounds.plan.servers`)."""
        return self._key(f"epoch{epoch}_beacon")

    def parts(self, round_: int) -> str:
        """Owners' reductions of the parts of W in merge round `round_`; one subkey per owner."""
        return self._key(f"round{round_}_parts")

    def sums(self, round_: int) -> str:
        """The coordinator's reductions of every part of W in merge round `round_` (one owner per
        part): apart from the owners' records, as it is the one record every peer needs."""
        return self._key(f"round{round_}_sums")

    @staticmethod
    def lease_tag(head: int) -> str:
        """The tag of a claim on `head` in its writer's owner subkey."""
        return str(head)

    # Names of the blobs a peer serves over P2P (not DHT keys, but owned here all the same).
    def contribution_blob(self, round_: int, writer: str) -> str:
        """Named after its writer: a record pointing at another peer's address finds nothing."""
        return f"{self.run_id}/contribution/{round_}/{writer}"

    def contribution_part_blob(self, round_: int, writer: str, part: int) -> str:
        return f"{self.run_id}/contribution/{round_}/{writer}/{part}"

    def contribution_compact_blob(self, round_: int, writer: str, part: int | None) -> str:
        """The contribution (part None) or one of its parts without the baseline factors its reader
        already holds (`wire.compact_part`)."""
        whole = self.contribution_blob(round_, writer)
        return f"{whole}/compact" if part is None else f"{whole}/{part}/compact"

    def round_start_blob(self, round_: int, writer: str, head: int) -> str:
        """What `writer`'s work on `head` in merge round `round_` began from (`peers.verify.RoundStart`)."""
        return f"{self.run_id}/start/{round_}/{writer}/{head}"

    def check_blob(self, round_: int, name: str) -> str:
        """What the coordinator serves to the verifiers of merge round `round_`: "w" (W as the
        round began), "<writer>" (its contribution), "<writer>/<head>" (the start of its round)."""
        return f"{self.run_id}/check/{round_}/{name}"

    def undo_blob(self, round_: int, digest: str) -> str:
        """What merge round `round_` subtracts from its totals (`UndoRecord`)."""
        return f"{self.run_id}/undo/{round_}/{digest}"

    def reduced_blob(self, round_: int, part: int, digest: str) -> str:
        return f"{self.run_id}/reduced/{round_}/{part}/{digest}"

    @property
    def state_blob(self) -> str:
        return f"{self.run_id}/state"
