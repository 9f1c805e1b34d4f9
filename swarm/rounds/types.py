"""The values one peer's merge round is made of: where it stands (`MergeRound`, `RoundStep`), what
it comes to (`RoundResult`), and its share of an owner-reduced merge (`ReduceWork`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from swarm.schemas import ReadyRecord
from swarm.wire import Contribution

KEEP_CONTRIBUTIONS = 3  # rounds for which a peer keeps serving its contributions (and others' baselines)


class RoundStep(str, enum.Enum):
    """Where one peer is within one merge round."""

    OPEN = "open"                # contributions are being offered; waiting for the round to close
    SETTLING = "settling"        # closed; letting the last ready records spread before reading them
    REDUCING = "reducing"        # owners reduce their parts of W; everyone collects the reduced parts
    VOTING = "voting"            # merged; waiting for the contributors' digests
    CATCHING_UP = "catching_up"  # the round closed before we offered: downloading its result
    DONE = "done"


@dataclass
class RoundResult:
    round: int                     # the merge round this was about
    new_round: int                 # the peer's W round afterwards
    merged: bool = False           # our contribution is in the agreed W
    missed: bool = False           # the round closed before we were ready
    resynced: bool = False         # W was downloaded from a peer holding the agreed state
    idle: bool = False             # a follower saw no round start in time (nothing changed)
    members: list[str] = field(default_factory=list)
    merged_head_steps: int = 0     # head-steps of all contributions in the agreed W
    digest: str = ""
    rejected: list[str] = field(default_factory=list)
    reduced: bool = False          # merged through the parts' owners (else all-gathered)
    raw_parts: int = 0             # parts whose owners failed us: reduced here from raw contributions
    seconds_waiting: float = 0.0
    seconds_communicating: float = 0.0
    # seconds from entering the round to each step we reached: where a round's time goes
    phases: dict[str, float] = field(default_factory=dict)
    dht_reads: int = 0             # DHT keys read while in the round (each from `swarm.read_replicas` nodes)
    rolled_back: bool = False      # the round rolled W back (`undo`): the heads start afresh


@dataclass(frozen=True)
class RoundScope:
    """What one merge round merges (`lte.fragments`): the parts it covers (indices into the
    context's `parts`), their layers and parameters (None: all), and the key under which the
    factors of a whole contribution of such a round are kept (the baseline of the next whole
    contribution that covers the same targets, which is then sent compact)."""

    parts: tuple[int, ...]
    targets: frozenset[str] | None
    whole: int

    @property
    def among(self) -> tuple[int, ...] | None:
        """The round's parts when it merges only some (what `plan.owners` spreads), else None."""
        return None if self.targets is None else self.parts


@dataclass
class MergeRound:
    """One peer's progress through merge round `round`; advanced by `MergeProtocol.poll`."""

    round: int
    contribution: bytes | None
    ready: ReadyRecord | None
    started: float                 # monotonic
    deadline: float                # monotonic: bound on the current step
    scope: RoundScope              # what the round merges
    step: RoundStep = RoundStep.OPEN
    wait: float = 0.0              # seconds until the next poll is useful
    idle_polls: int = 0            # polls in a row that found nothing new: the next waits longer
    votes_seen: int = 0            # votes read while voting (a new one is progress)
    marks: dict[str, float] = field(default_factory=dict)  # step -> seconds since `started` (RoundResult.phases)
    reads_before: int = 0          # the peer's DHT reads when the round began
    settle_until: float = 0.0
    first_ready_seen: float | None = None  # monotonic: when this peer first saw a ready record
    closed_asked: float = float("-inf")  # monotonic: when an open round last read its votes
    agreed_members: list[str] | None = None  # the agreed contributors, once known
    awaited: set[str] | None = None  # whose votes the round waits for
    waited: float = 0.0
    ready_set: dict[str, ReadyRecord] = field(default_factory=dict)
    order: str = ""                # the seed that orders the round's owners (`plan.servers`), once settled
    members: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    digest: str = ""
    result: RoundResult | None = None
    work: "ReduceWork | None" = None
    settled: bool = False          # the ready set is read (once per round)
    push_deadline: float = 0.0     # monotonic: how long we wait for blobs pushed by unreachable peers
    pushed: dict[str, bytes] = field(default_factory=dict)  # digest -> blob pushed by an unreachable peer
    coordinator_p2p: list[str] | None = None  # the coordinator's address this round, once looked up
    coordinator_up: bool = False  # the coordinator said it is up and in this round (asked until it did)
    slow: set[str] = field(default_factory=set)  # members' addresses that let a fetch of this round time out
    totals: dict[str, torch.Tensor] | None = None  # the merge, when it applies later (swarm.overlap)
    undo: dict[str, torch.Tensor] | None = None  # what the round takes out of its totals again (`undo`)
    rolled_back: bool = False      # ... every contribution of some rounds: every head starts afresh after it
    shares: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # (the coordinator's) per member, what it added
    pending: bool = False          # agreed, not yet applied to our W (`MergeProtocol.apply_pending`)

    def mark(self, step: str, now: float) -> None:
        """Note when (seconds since `started`, monotonic `now`) the round first reached `step`."""
        self.marks.setdefault(step, round(now - self.started, 3))


@dataclass
class ReduceWork:
    """One peer's share of an owner-reduced merge: the parts it reduces (or had to fetch itself),
    what it knows of every part's accepted contributors, and the reduced parts it has."""

    members: list[str]                                                    # the round's contributors
    servers: list[str]                                                    # those that accept connections
    scope: RoundScope                                                     # the parts the round merges
    held: dict[int, dict[str, Contribution]] = field(default_factory=dict)  # part -> validated contributions
    accepted: dict[int, set[str]] = field(default_factory=dict)          # part -> contributors that passed
    reduced: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # part -> values over the final set
    computed: dict[tuple[int, tuple[str, ...]], tuple[str, dict]] = field(default_factory=dict)
    fetched: dict[tuple[int, tuple[str, ...]], dict[str, torch.Tensor]] = field(default_factory=dict)  # downloaded
    final: list[str] | None = None                                       # contributors every part accepted
    first_seen: dict[int, float] = field(default_factory=dict)           # part -> when an owner's record showed up
    began: float = 0.0                                                   # when we began collecting the parts
    orphaned: set[int] = field(default_factory=set)                      # parts whose other owner seems absent
    raw: set[int] = field(default_factory=set)                           # parts we fetched raw: owners failed us
    await_coordinator: bool = False                                      # the final set waits for the coordinator's fetched record
    coordinator: set[str] | None = None                                  # ... the contributors it fetched, once read
    published: list[tuple[int, tuple[str, ...], str]] = field(default_factory=list)  # (part, members, digest) we serve
    announced: int = 0                                                   # ... of which our part record names
    expiration: float = 0.0                                              # ... and when that record expires
