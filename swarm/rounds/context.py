"""What every part of one peer's merge rounds shares: who it is, its DHT, its blob server, the run's
config and keys, its model, and the few helpers they all use (counted DHT reads, serving a round's
blobs, spreading requests over peers)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from swarm import dht_io
from swarm.clock import Clock
from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.keys import RunKeys
from swarm.lte_model import LTEModel
from swarm.rounds.types import KEEP_CONTRIBUTIONS, RoundScope
from swarm.wire import contribution_bound, part_bound, plan_parts, round_parts, state_bound, targets_of


@dataclass
class RoundContext:
    """One peer's place in the run's rounds. `holders` maps head -> holder (`HeadLeases.holders`):
    who may contribute and vote. `keep_alive` is called while a round blocks (lease renewals).
    Behind NAT (`reachable` False) nobody can fetch from the peer: it pushes its contribution,
    never owns a part and never hands out W."""

    dht: object
    server: object
    keys: RunKeys
    identity: Identity
    cfg: SwarmConfig
    model: LTEModel
    holders: Callable[..., dict[int, str]]
    clock: Clock
    reachable: bool = True
    reach: dict[str, float] = field(default_factory=dict)  # LTEModel.update_reach: bounds a contribution's size
    fragments: int = 1  # lte.fragments: W's parts merged in turn, one fragment a round
    rounds_total: int | None = None  # the run's last round merges every part
    keep_alive: Callable[[], None] = lambda: None
    # bytes on the wire per byte of ours, by blob kind: 1 but in a simulation that moves a larger
    # model's bytes (`peers.swarm_sim`), whose W download must be waited for as that model's would
    wire_scale: dict[str, float] = field(default_factory=dict)
    beacons: dict[int, str] = field(default_factory=dict)  # epoch -> the coordinator's beacon (`agreement.order`)
    dht_reads: int = 0  # DHT keys read so far (RoundResult.dht_reads: in one round)
    _served: dict[int, list[str]] = field(default_factory=dict)  # round -> names of the blobs we serve for it

    def __post_init__(self):
        self.peer = self.identity.fingerprint
        self.p2p = str(self.dht.peer_id)
        self.authority = self.keys.coordinator
        self.parts = plan_parts(self.model, self.cfg.parts or 2 * self.model.spec.n_heads)
        self.max_contribution_bytes = contribution_bound(self.model)
        self.max_part_bytes = [part_bound(self.model, part) for part in self.parts]
        self.max_state_bytes = state_bound(self.model)
        # Factors of a part are kept (ours and each member's) until that part's next turn, k rounds on.
        self.keep_bases = KEEP_CONTRIBUTIONS * self.fragments

    def scope(self, r: int) -> RoundScope:
        """What merge round r merges: every part, or one fragment's (`swarm.wire.round_parts`)."""
        parts = round_parts(len(self.parts), self.fragments, r, self.rounds_total)
        whole = 0 if len(parts) == len(self.parts) else -1 - parts[0]
        return RoundScope(tuple(parts), targets_of(self.parts, parts), whole)

    @property
    def is_authority(self) -> bool:
        return self.peer == self.authority

    def read(self, key: str, model: type[dht_io.T], now: float, thorough: bool = False) -> "dht_io.Signed[dht_io.T]":
        """`dht_io.read` from the nodes nearest to `key` (`swarm.read_replicas`), counted: a
        round's polls are most of what a peer sends and receives besides blobs. `thorough` asks
        all the nodes a record is stored at: for a read that decides (a node that just left is
        replaced by the next nearest, but one that lacks a fresh record is not)."""
        self.dht_reads += 1
        return dht_io.read(self.dht, key, model, now, replicas=0 if thorough else self.cfg.read_replicas)

    def expiration(self) -> float:
        """When a record of a round may go: three round timeouts from now."""
        return self.clock.now() + self.cfg.round_timeout * 3

    def serve(self, r: int, name: str, blob: bytes | Callable[[], bytes]) -> None:
        """Serve a blob of round r (or what makes it, called when asked for); what we served for
        rounds long past is dropped."""
        self.server.publish(name, blob)
        self._served.setdefault(r, []).append(name)
        for old in [k for k in self._served if k <= r - KEEP_CONTRIBUTIONS]:
            for stale in self._served.pop(old):
                self.server.drop(stale)

    def spread(self, n: int) -> int:
        """Where in a list of n this peer starts, so that peers spread their requests."""
        return int(hashlib.sha256(self.peer.encode()).hexdigest(), 16) % max(1, n)

    def start(self, members: list[str]) -> int:
        """Where in the sorted `members` this peer starts asking: after itself, or spread."""
        return (members.index(self.peer) + 1) if self.peer in members else self.spread(len(members))
