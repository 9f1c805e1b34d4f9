"""Merge rounds: how every peer's W moves from round r to round r + 1 identically.

Round r has its own DHT keys, so a late peer's round r never meets others' round r + 1. Every
record is signed by its writer (`swarm.identity`); only some writers count:

1. A peer that finished its T local steps serves its contribution and writes a ready record. Only
   ready records from the holder of every head they list count (one contribution per head), and
   only with a ready time within the clock skew of now.
2. The round closes when every lease holder is ready, or after the first ready peer has waited
   `merge_grace` seconds or `merge_slack` times its own training time (capped by the round
   timeout), whichever is longer; or when the coordinator, or most lease holders, voted for it.
   A peer that comes later is a straggler: it re-syncs W and keeps its change for the next round
   (nothing is lost, nothing merged twice).
3. Every peer downloads every ready contribution (sizes bounded by what the model implies, a few
   at a time), validates it (format, heads, shapes, NaN/inf, size of the change against the size
   of W), clips outliers to a multiple of the round's median, merges in fingerprint order and
   writes its W digest together with the contributors it merged.
4. The coordinator's digest is the agreed W; without it, the digest most lease holders hold (one
   vote per signed identity). A peer that computed another one re-syncs from a peer holding the
   agreed W, accepting only state that hashes to it. A peer that finds the swarm ahead of it
   (the coordinator's progress, or most holders' donors) syncs instead of merging alone.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re

import torch
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from swarm import dht_io, schemas
from swarm.clock import Clock
from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.keys import RunKeys
from swarm.lte_model import LTEModel
from swarm.schemas import DonorRecord, HashRecord, PartRecord, ReadyRecord, RunProgress
from swarm.transport import NETWORK_ERRORS, TransferError, pushed_name
from swarm.wire import (Contribution, ContributionError, apply_reduced, compact_part, contribution_bound,
                        decode_contribution, decode_contribution_parts, decode_reduced, decode_state, dequantized,
                        encode_reduced, encode_state, expand_part, merged_totals, part_bound, part_factors, plan_parts,
                        reduce_contributions, reduced_digest, reduced_tensors, shapes_of, split_contribution,
                        state_bound)

log = logging.getLogger(__name__)

KEEP_CONTRIBUTIONS = 3  # rounds for which a peer keeps serving its contributions
_LISTING_BYTES = 1 << 16  # bound on the digest list of an unreachable peer's pushed blobs
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Each poll that finds nothing new waits this much longer than the last (up to swarm.poll_max_seconds):
# a round waiting on transfers over a slow link must not spend the link on reading DHT records.
POLL_BACKOFF = 1.5
# An open round asks whether the others already merged it (a read of the round's votes) at most
# this often; it reads the ready records at every poll. Votes exist only once the round closed.
CLOSED_EVERY = 1.0
# How old a view of the lease holders a round's polls may use (`HeadLeases.holders`): it filters
# whose records count while waiting, and a head changes hands over a settle delay at the fastest.
# Each fresh view is a read of every holder's claim, at every poll it would be most of a round's
# DHT traffic. What decides a round (its close, its members) asks for a thorough view instead.
VIEW_SECONDS = 2.0
MIN_REDUCE_MEMBERS = 3  # below this, two owners per part means everyone reduces everything: gather instead


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


@dataclass
class MergeRound:
    """One peer's progress through merge round `round`; advanced by `MergeProtocol.poll`."""

    round: int
    contribution: bytes | None
    ready: ReadyRecord | None
    started: float                 # monotonic
    deadline: float                # monotonic: bound on the current step
    step: RoundStep = RoundStep.OPEN
    wait: float = 0.0              # seconds until the next poll is useful
    idle_polls: int = 0            # polls in a row that found nothing new: the next waits longer
    votes_seen: int = 0            # votes read while voting (a new one is progress)
    marks: dict[str, float] = field(default_factory=dict)  # step -> seconds since `started` (RoundResult.phases)
    reads_before: int = 0          # `MergeProtocol.dht_reads` when the round began
    settle_until: float = 0.0
    first_ready_seen: float | None = None  # monotonic: when this peer first saw a ready record
    closed_asked: float = float("-inf")  # monotonic: when an open round last read its votes
    agreed_members: list[str] | None = None  # the agreed contributors, once known
    awaited: set[str] | None = None  # whose votes the round waits for
    waited: float = 0.0
    ready_set: dict[str, ReadyRecord] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    digest: str = ""
    result: RoundResult | None = None
    work: "ReduceWork | None" = None
    settled: bool = False          # the ready set is read (once per round)
    push_deadline: float = 0.0     # monotonic: how long we wait for blobs pushed by unreachable peers
    pushed: dict[str, bytes] = field(default_factory=dict)  # digest -> blob pushed by an unreachable peer
    coordinator_p2p: list[str] | None = None  # the coordinator's address this round, once looked up
    totals: dict[str, torch.Tensor] | None = None  # the merge, when it applies later (swarm.overlap)
    pending: bool = False          # agreed, not yet applied to our W (`MergeProtocol.apply_pending`)


@dataclass
class ReduceWork:
    """One peer's share of an owner-reduced merge: the parts it reduces (or had to fetch itself),
    what it knows of every part's accepted contributors, and the reduced parts it has."""

    members: list[str]                                                    # the round's contributors
    servers: list[str]                                                    # those that accept connections
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
    published: list[tuple[int, tuple[str, ...], str]] = field(default_factory=list)  # (part, members, digest) we serve
    announced: int = 0                                                   # ... of which our part record names
    expiration: float = 0.0                                              # ... and when that record expires


def owners(part: int, members: list[str], count: int = 2) -> tuple[str, ...]:
    """The `count` members that reduce `part`: consecutive in fingerprint order, so every member
    owns about count/P of the parts. Two owners check each other; one owner is checked by the
    coordinator's recomputation (`swarm.part_owners`). Only members that accept connections own
    parts (`servers`)."""
    n = len(members)
    return tuple(dict.fromkeys(members[(part + k) % n] for k in range(count)))


class MergeProtocol:
    """One peer's side of the merge rounds of a run; `model` holds this peer's W (and heads).

    It alone writes the peer's round number: `sync` sets it from the state it downloads, the end
    of a round moves it to r + 1. A round is a `MergeRound` that `poll` advances one step at a
    time without ever sleeping, so the same code runs under a real and a fake clock."""

    def __init__(self, dht, server, keys: RunKeys, identity: Identity, cfg: SwarmConfig, model: LTEModel,
                 holders: Callable[..., dict[int, str]], clock: Clock | None = None, round_: int = 0,
                 rounds_total: int | None = None, reachable: bool = True):
        self.dht, self.server, self.keys, self.identity, self.cfg = dht, server, keys, identity, cfg
        self.peer = identity.fingerprint
        self.p2p = str(dht.peer_id)
        self.authority = keys.coordinator
        self.model = model
        self.holders = holders  # head -> holder: who may contribute and vote (`HeadLeases.holders`)
        self.keep_alive: Callable[[], None] = lambda: None  # called while a round blocks (lease renewals)
        self.clock = clock or Clock()
        self._round = round_
        self.rounds_total = rounds_total  # no trustworthy state is ever past the run's last round
        # Only a resuming coordinator adopts what most lease holders hold (the swarm went on without
        # it); otherwise the coordinator is the truth and never takes state from anyone.
        self.adopt_holders_state = not self.is_authority
        self._incumbents: tuple[int, dict[int, str]] = (-1, {})
        self._agreed_members: tuple[int, list[str]] = (-1, [])
        self.max_contribution_bytes = contribution_bound(model)
        self.max_state_bytes = state_bound(model)
        self.parts = plan_parts(model, cfg.parts or 2 * model.spec.n_heads)
        self.max_part_bytes = [part_bound(model, part) for part in self.parts]
        self._served: dict[int, list[str]] = {}  # round -> names of the blobs we serve for it
        # The current factors of our last contribution and of each of its parts (blob index: 0 the
        # whole, i + 1 part i), the baseline of our next one; and those of every peer's last blob
        # we received, by (peer, index): what compact blobs leave out (`wire.compact_part`).
        self._sent_factors: dict[int, dict[str, torch.Tensor]] = {}
        self._bases: dict[tuple[str, int], tuple[int, str, dict[str, torch.Tensor]]] = {}
        self._w_version = 0  # bumped whenever W or the round may have changed
        self._announced = ((-1, -1), float("-inf"))  # ((W version, round), monotonic time) of our last donor record
        self._digest: tuple[int, str] = (-1, "")  # (W version, its digest): see `w_digest`
        self._state_blob: tuple[int, bytes] | None = None
        self.dht_reads = 0  # DHT keys read so far (RoundResult.dht_reads: in one round)
        self.state_bytes_downloaded = 0  # W fetched from donors (none when we already held it)
        # Behind NAT (hivemind's client mode) nobody can fetch from us: we push our contribution to
        # peers that can be reached, never own a part and never hand out W. Those peers keep what
        # is pushed to them within a budget: every head's contribution, in the worst case.
        self.reachable = reachable
        server.inbox.limit_bytes = model.spec.n_heads * (self.max_contribution_bytes + _LISTING_BYTES)
        server.inbox.keep_seconds = KEEP_CONTRIBUTIONS * 2 * cfg.round_timeout
        server.publish(keys.state_blob, self._encoded_state)

    def _encoded_state(self) -> bytes:
        """W as handed out to newcomers, encoded once per version of W: anyone may ask for it, and
        asking again and again must cost a donor a copy, not an encoding of the whole model. The
        version is read first, so a blob encoded while W changed is never served as the new one."""
        version = self._w_version
        cached = self._state_blob
        if cached is not None and cached[0] == version:
            return cached[1]
        blob = encode_state(self.model, self._round)
        self._state_blob = (version, blob)
        return blob

    @property
    def round(self) -> int:
        """The round of this peer's W: merge round `round` is the next one it takes part in."""
        return self._round

    def w_digest(self) -> str:
        """Our W's digest, hashed once per version of W: the donor record and the peer's status
        record both say it, and hashing all of W each time would take its time from training. As in
        `_encoded_state`, the version is read first, so a hash taken while W changed is never
        given out for the new W."""
        version, cached = self._w_version, self._digest
        if cached[0] != version:
            cached = self._digest = (version, self.model.state_digest())
        return cached[1]

    @property
    def is_authority(self) -> bool:
        return self.peer == self.authority

    # ---- state ---------------------------------------------------------------------------
    def announce(self) -> None:
        """Tell newcomers we can hand out W at our round; a peer nobody can connect to hands out
        nothing. Callers ask now and then: the record is written again once W changed, or once
        it is a lease old (it lives three), never more often, as every store into the shared
        list of donors moves the whole list."""
        if not self.reachable:
            return
        now, held = self.clock.monotonic(), (self._w_version, self._round)
        said, at = self._announced
        if said == held and now - at < self.cfg.lease_seconds:
            return
        digest = self.w_digest()
        if (self._w_version, self._round) != held:
            return  # W changed while we hashed it (a renewal runs beside the merge): its changer announces
        self._announced = (held, now)
        record = DonorRecord(round=held[1], digest=digest, p2p=self.p2p)
        dht_io.store(self.dht, self.keys.donors, self.identity, record, self.clock.now() + 3 * self.cfg.lease_seconds)

    def donors(self) -> dict[str, DonorRecord]:
        found = dht_io.by_writer(self._read(self.keys.donors, DonorRecord, self.clock.now()))
        return {who: r for who, r in found.items() if who != self.peer}

    def progress(self) -> RunProgress | None:
        """The coordinator's signed account of the run (its latest agreed W), if it is up."""
        found = dht_io.by_writer(self._read(self.keys.progress, RunProgress, self.clock.now()))
        return found.get(self.authority)

    def trusted_state(self) -> tuple[int, str] | None:
        """(round, digest) of the W this peer may adopt: the coordinator's agreed W whenever its
        progress record is live; without it (or for a resuming coordinator), what a strict
        majority of the lease holders advertise. None when nobody trustworthy says anything."""
        if not self.is_authority:
            progress = self.progress()
            if progress is not None:
                # The coordinator's vote on the round after its progress record (published before
                # it evaluates and records that round) is as trustworthy and often newer.
                vote = self._authority_vote(progress.round)
                if vote is not None:
                    return progress.round + 1, vote.digest
                return progress.round, progress.digest
        if not self.adopt_holders_state:
            return None
        holders = set(self.holders().values())
        said = Counter((r.round, r.digest) for who, r in self.donors().items()
                       if who in holders and (self.rounds_total is None or r.round <= self.rounds_total))
        if not said:
            return None
        (round_, digest), count = max(said.items(), key=lambda kv: (kv[1], kv[0][0], kv[0][1]))
        return (round_, digest) if 2 * count > len(holders) else None

    def incumbents(self) -> dict[int, str]:
        """head -> the identity whose work on it was merged in the round before ours (it keeps
        the head while its lease lives; see `leases.winners`). From what we merged ourselves, else
        the agreed vote of that round and its contributors' signed ready records."""
        r = self._round - 1
        if r < 0:
            return {}
        if self._incumbents[0] == r:
            return self._incumbents[1]
        now = self.clock.now()
        if self._agreed_members[0] == r:
            members = self._agreed_members[1]
        else:
            vote = self._authority_vote(r)  # nobody else's word decides who keeps a head
            members = vote.members if vote is not None else []
        ready = dht_io.by_writer(self._read(self.keys.ready(r), ReadyRecord, now))
        out = {h: who for who in members if who in ready and ready[who].round == r for h in ready[who].heads}
        if members:
            self._incumbents = (r, out)
        return out

    def _authority_vote(self, r: int) -> HashRecord | None:
        """The coordinator's digest (and contributors) for round r, if it published one."""
        votes = dht_io.by_writer(self._read(self.keys.hashes(r), HashRecord, self.clock.now()))
        vote = votes.get(self.authority)
        return vote if vote is not None and vote.round == r else None

    def sync(self, min_round: int = 0) -> bool:
        """Adopt the trusted W (see `trusted_state`) if it is at `min_round` or later, from any
        donor advertising it; only state hashing to the trusted digest is accepted."""
        target = self.trusted_state()
        if target is None or target[0] < min_round:
            return False
        if target == (self._round, self.model.state_digest()):
            # Already held: W0 is built from the run's seed, so a newcomer at round 0 usually has
            # it bit for bit and need not pull a whole W through anyone's link.
            log.info("W of round %d already held (digest %s): nothing to download", self._round, target[1][:12])
            self.announce()
            return True
        donors = self.donors()
        candidates = sorted(who for who, r in donors.items() if (r.round, r.digest) == target)
        if len(candidates) > 1:  # spread newcomers over the donors instead of all hitting one
            shift = self._spread(len(candidates))
            candidates = candidates[shift:] + candidates[:shift]
        # the coordinator and the lease holders first: a stranger may advertise the right digest
        holders = set(self.holders().values())
        candidates.sort(key=lambda who: (who != self.authority, who not in holders))
        return self._fetch_state([donors[c].p2p for c in candidates], *target)

    def _fetch_state(self, addresses: list[str], round_: int, digest: str) -> bool:
        for address in addresses:
            self.clock.check()
            self.keep_alive()
            try:
                blob = self.server.fetch(address, self.keys.state_blob, self.cfg.request_timeout * 4,
                                         self.max_state_bytes)
                self._w_version += 1
                try:
                    with self.model.lock:  # not under a training step running beside us (swarm.overlap)
                        self._round = decode_state(blob, self.model, expect_digest=digest, expect_round=round_)
                finally:
                    self._w_version += 1
                self.state_bytes_downloaded += len(blob)
                log.info("synced W of round %d from %s (%.1f MB)", self._round, address[-8:], len(blob) / 2**20)
                self.announce()
                return True
            except NETWORK_ERRORS + (ContributionError,) as exc:
                log.warning("could not sync from %s: %s", address[-8:], exc)
        return False

    # ---- reading a round's records ---------------------------------------------------------
    def _read(self, key: str, model: type[schemas.T], now: float,
              thorough: bool = False) -> "dht_io.Signed[schemas.T]":
        """`dht_io.read` from the nodes nearest to `key` (`swarm.read_replicas`), counted: a
        round's polls are most of what a peer sends and receives besides blobs. `thorough` asks
        all the nodes a record is stored at: for a read that decides (a node that just left is
        replaced by the next nearest, but one that lacks a fresh record is not)."""
        self.dht_reads += 1
        return dht_io.read(self.dht, key, model, now, replicas=0 if thorough else self.cfg.read_replicas)

    def _ready(self, r: int, thorough: bool = False) -> dict[str, ReadyRecord]:
        """Ready records of round r that count: dated near now, from the holder of every head
        they list (so at most one contribution per head). `thorough`: see `_read`; its view of
        the holders may be the one the round's close read a settle delay before. A record that
        a reused view does not back is checked against a fresh view before it is left out (a
        claimant can be ready a few seconds after its claim)."""
        now = self.clock.now()
        found = dht_io.by_writer(self._read(self.keys.ready(r), ReadyRecord, now, thorough))
        oldest = now - 3 * self.cfg.round_timeout
        dated = {who: rec for who, rec in found.items()
                 if rec.round == r and oldest <= rec.ready_at <= now + self.cfg.clock_skew}
        holders = self.holders(max_age=self.cfg.settle_seconds + VIEW_SECONDS if thorough else VIEW_SECONDS,
                               thorough=thorough)
        if any(holders.get(h) != who for who, rec in dated.items() for h in rec.heads):
            holders = self.holders(max_age=0.0, thorough=True) if thorough else self.holders()
        return {who: rec for who, rec in dated.items() if all(holders.get(h) == who for h in rec.heads)}

    def _votes(self, r: int) -> dict[str, HashRecord]:
        """Digests published for round r by those whose vote counts: the coordinator and the
        lease holders, one vote per signed identity."""
        voters = set(self.holders(max_age=VIEW_SECONDS).values()) | {self.authority, self.peer}
        found = dht_io.by_writer(self._read(self.keys.hashes(r), HashRecord, self.clock.now()))
        return {who: rec for who, rec in found.items() if rec.round == r and who in voters}

    def close_window(self, ready: dict[str, ReadyRecord]) -> float:
        """How long a round waits for the others once this peer saw its first ready record."""
        first = min(ready.values(), key=lambda x: x.ready_at)
        train = min(first.train_seconds, self.cfg.round_timeout)
        return max(self.cfg.merge_grace, self.cfg.merge_slack * train)

    def closed(self, r: int) -> bool:
        """Round r no longer takes contributions: the coordinator or most holders merged it. (Ready
        times do not decide this: a holder could date its records so that every round looks over.)"""
        votes = self._votes(r)
        holders = set(self.holders(max_age=VIEW_SECONDS).values())
        holder_votes = len(set(votes) & holders)
        return self.authority in votes or (bool(holders) and 2 * holder_votes > len(holders))

    # ---- one round, step by step -------------------------------------------------------------
    def begin(self, contribution: bytes | None, ready: ReadyRecord | None) -> MergeRound:
        """Enter merge round `self.round` as a contributor (offering `contribution`), or as a
        follower when `contribution` is None."""
        r, start = self._round, self.clock.monotonic()
        mr = MergeRound(round=r, contribution=contribution, ready=ready, started=start,
                        deadline=start + self.cfg.round_timeout, reads_before=self.dht_reads)
        trusted = self.trusted_state()
        if trusted is not None and trusted[0] > r:
            log.warning("the swarm is at round %d, we are at %d: syncing instead of merging alone", trusted[0], r)
            mr.step = RoundStep.CATCHING_UP
            return mr
        if self.closed(r):
            log.warning("merge round %d closed before we were ready; catching up (our change waits for the next round)", r)
            mr.step = RoundStep.CATCHING_UP
            return mr
        mr.closed_asked = start
        if contribution is not None and ready is not None:
            self._serve(r, self.keys.contribution_blob(r, self.peer), contribution)
            parts = split_contribution(contribution, self.parts) if self.cfg.merge == "reduce" else []
            previous, self._sent_factors = self._sent_factors, {}
            for index, blob in enumerate([contribution, *parts]):
                part = None if index == 0 else index - 1
                if part is not None:
                    self._serve(r, self.keys.contribution_part_blob(r, self.peer, part), blob)
                compact, self._sent_factors[index], base = compact_part(blob, previous.get(index))
                self._serve(r, self.keys.contribution_compact_blob(r, self.peer, part), compact)
                if index == 0 and base == "zero":  # nothing of its heads is in W: anyone can rebuild it
                    mr.ready = ready = ready.model_copy(update={"zero_baseline": True})
            if not self.reachable:  # what we will push, named in our signed record by its digest
                blobs = [contribution, *parts]
                listing = json.dumps([hashlib.sha256(b).hexdigest() for b in blobs]).encode()
                mr.pushed = {hashlib.sha256(b).hexdigest(): b for b in [listing, *blobs]}
                mr.ready = ready = ready.model_copy(update={"pushed": hashlib.sha256(listing).hexdigest()})
            dht_io.store(self.dht, self.keys.ready(r), self.identity, ready, self._expiration())
        return mr

    def poll(self, mr: MergeRound) -> RoundResult | None:
        """Advance `mr` by one step; the result once the round is over for us, else None (poll
        again after `mr.wait` seconds). Network failures inside a step degrade (a rejected or
        missing contribution, a re-sync); only a failed catch-up raises `TransferError`."""
        step = {RoundStep.OPEN: self._poll_open, RoundStep.SETTLING: self._poll_settling,
                RoundStep.REDUCING: self._poll_reducing, RoundStep.VOTING: self._poll_voting,
                RoundStep.CATCHING_UP: self._poll_catching_up}.get(mr.step)
        if step is not None:
            before = self._progress(mr)
            mr.wait = self.cfg.poll_seconds
            if mr.step in (RoundStep.REDUCING, RoundStep.VOTING):
                # Waiting on transfers and on others' digests: back off. (An open round is not: its
                # window runs from when each peer first sees a ready record, and must run alike.)
                mr.wait = min(mr.wait * POLL_BACKOFF ** mr.idle_polls, max(mr.wait, self.cfg.poll_max_seconds))
            step(mr)
            mr.idle_polls = mr.idle_polls + 1 if self._progress(mr) == before else 0
        return mr.result

    @staticmethod
    def _progress(mr: MergeRound) -> tuple:
        """What a poll that found something new changes: the step, or the parts we know of."""
        work = mr.work
        return (mr.step, mr.votes_seen,
                None if work is None else (len(work.accepted), len(work.reduced), len(work.first_seen), len(work.fetched)))

    def _mark(self, mr: MergeRound, step: str) -> None:
        mr.marks.setdefault(step, round(self.clock.monotonic() - mr.started, 3))

    def _serve(self, r: int, name: str, blob: bytes) -> None:
        """Serve a blob of round r; what we served for rounds long past is dropped."""
        self.server.publish(name, blob)
        self._served.setdefault(r, []).append(name)
        for old in [k for k in self._served if k <= r - KEEP_CONTRIBUTIONS]:
            for stale in self._served.pop(old):
                self.server.drop(stale)

    def _expiration(self) -> float:
        return self.clock.now() + self.cfg.round_timeout * 3

    def _poll_open(self, mr: MergeRound) -> None:
        r, now = mr.round, self.clock.monotonic()
        ready_set = self._ready(r)
        close = False
        if ready_set:
            if mr.first_ready_seen is None:  # our own clock decides, not the records' dates
                mr.first_ready_seen = now
            # Every holder is ready: as a view of the holders may be half a second old or read from
            # nodes that lack a fresh claim, a thorough one confirms before the round closes early.
            close = (not (set(self.holders(max_age=VIEW_SECONDS).values()) - set(ready_set))
                     and not (set(self.holders(max_age=0.0, thorough=True).values()) - set(ready_set))
                     or now > mr.first_ready_seen + self.close_window(ready_set))
        elif now > mr.deadline:
            # Nobody's ready record counts, ours included (a lost head, a store that never made it):
            # the round is over for us without a merge; a contributor keeps its change.
            self._finish(mr, RoundResult(round=r, new_round=self._round, idle=mr.contribution is None,
                                         missed=mr.contribution is not None))
            return
        if close or self._closed_meanwhile(mr):
            self._mark(mr, "closed")
            mr.step = RoundStep.SETTLING
            mr.settle_until = self.clock.monotonic() + self.cfg.settle_seconds
            mr.wait = self.cfg.settle_seconds

    def _closed_meanwhile(self, mr: MergeRound) -> bool:
        """`closed`, asked of an open round at most every CLOSED_EVERY seconds (`begin` asked it
        once already): each ask reads every holder's vote, and none exist before someone merged."""
        now = self.clock.monotonic()
        if now - mr.closed_asked < CLOSED_EVERY:
            return False
        mr.closed_asked = now
        return self.closed(mr.round)

    def _poll_settling(self, mr: MergeRound) -> None:
        remaining = mr.settle_until - self.clock.monotonic()
        if remaining > 0:
            mr.wait = remaining
            return
        r = mr.round
        if not mr.settled:
            mr.settled = True
            mr.ready_set = self._ready(r, thorough=True)  # the round's members
            if mr.contribution is not None and self.peer not in mr.ready_set:  # our record never made it out
                log.warning("our ready record for round %d is not visible; merging without us", r)
            mr.waited = self.clock.monotonic() - mr.started
            if not self.reachable and self.peer in mr.ready_set:
                self._push(mr)
            mr.push_deadline = self.clock.monotonic() + self.cfg.request_timeout
        if self._awaiting_pushes(mr) and self.clock.monotonic() < mr.push_deadline:
            return  # an unreachable member's blobs are still on their way to us
        self._mark(mr, "settled")
        for key in [k for k, held in self._bases.items() if held[0] < r - KEEP_CONTRIBUTIONS]:
            del self._bases[key]  # what peers gone for rounds sent us
        if self._reduces(mr):
            self._start_reducing(mr)
            return
        contributions, mr.rejected = self._gather(mr)
        totals = merged_totals(self.model, contributions, self.cfg.robust_clip, self.cfg.reduced_dtype)
        self._merge(mr, totals, sorted(c.peer for c in contributions))

    def _merge(self, mr: MergeRound, totals: dict[str, torch.Tensor], members: list[str]) -> None:
        """Apply the merge to our W and vote for the result. A contributor that trains on while the
        round's bytes move (swarm.overlap) applies it only at the end of those steps
        (`apply_pending`), so that its heads train on the same W as in the simulation; it votes for
        the W it will then hold."""
        if self.cfg.overlap and mr.contribution is not None:
            mr.totals = totals
            mr.digest = self.model.digest_after({n: totals[n] for n in self.model.layer_names},
                                                {n: totals[n] for n in self.model.replicated})
        else:
            self._w_version += 1
            apply_reduced(self.model, totals)
            self._w_version += 1
            mr.digest = self.model.state_digest()
        self._vote(mr, members)

    def apply_pending(self, mr: MergeRound) -> None:
        """Apply the merge of `mr` that was agreed while we trained on (see `_merge`); our W and
        round move on only now, so what we hand out is always a W of the round we say."""
        if not mr.pending:
            return
        mr.pending = False
        self._w_version += 1
        apply_reduced(self.model, mr.totals)
        self._round = max(self._round, mr.round + 1)
        self._w_version += 1  # after the round too: what read the version first saw W and round change
        self.announce()

    def _vote(self, mr: MergeRound, members: list[str]) -> None:
        """Our W is merged (`mr.digest`): publish its digest with the contributors in it, then wait
        for the others'."""
        mr.members = members
        self._mark(mr, "merged")
        dht_io.store(self.dht, self.keys.hashes(mr.round), self.identity,
                      HashRecord(round=mr.round, digest=mr.digest, members=mr.members), self._expiration())
        mr.step = RoundStep.VOTING
        mr.deadline = self.clock.monotonic() + self.cfg.merge_grace

    # ---- peers that cannot accept connections ---------------------------------------------------
    def _servers(self, mr: MergeRound) -> list[str]:
        """The round's contributors that accept connections: only they own parts."""
        return sorted(p for p, rec in mr.ready_set.items() if rec.pushed is None)

    def _reduces(self, mr: MergeRound) -> bool:
        """Owner-reduced, or (too few members or owners to make it worth it) all-gathered."""
        return (self.cfg.merge == "reduce" and len(mr.ready_set) >= MIN_REDUCE_MEMBERS
                and len(self._servers(mr)) >= 2)

    def _coordinator_p2p(self, mr: MergeRound) -> list[str]:
        """The coordinator's address, looked up in the DHT once per round."""
        if mr.coordinator_p2p is None:
            donor = self.donors().get(self.authority)
            mr.coordinator_p2p = [donor.p2p] if donor is not None and donor.p2p != self.p2p else []
        return mr.coordinator_p2p

    def _holders(self, mr: MergeRound, index: int | None) -> list[str]:
        """Addresses that were pushed an unreachable member's blob `index` (0: the whole
        contribution, i + 1: part i; None: its digest list, which all of them got)."""
        servers = self._servers(mr)
        if index is not None and index > 0:
            return [mr.ready_set[o].p2p for o in self._owners(index - 1, servers)]
        return [mr.ready_set[s].p2p for s in servers] + self._coordinator_p2p(mr)

    def _push(self, mr: MergeRound) -> None:
        """We cannot be fetched from: push the digest list and what each peer needs of our
        contribution to it: each part to its owners and the whole to the coordinator (reduced
        merge), or the whole to every reachable member and the coordinator (all-gather)."""
        rec = mr.ready_set[self.peer]
        listing = mr.pushed[rec.pushed]
        digests = json.loads(listing)
        targets: dict[str, list[bytes]] = {}
        if self._reduces(mr):
            servers = self._servers(mr)
            for i in range(len(self.parts)):
                for owner in self._owners(i, servers):
                    targets.setdefault(mr.ready_set[owner].p2p, [listing]).append(mr.pushed[digests[i + 1]])
            if self.cfg.coordinator_recomputes:
                for address in self._coordinator_p2p(mr):
                    targets.setdefault(address, [listing]).append(mr.pushed[digests[0]])
        else:
            for address in self._holders(mr, 0):
                targets.setdefault(address, [listing]).append(mr.pushed[digests[0]])

        def push(address: str, blobs: list[bytes]) -> None:
            for blob in blobs:
                try:
                    self.server.push(address, blob, self.cfg.request_timeout)
                except NETWORK_ERRORS as exc:
                    log.warning("round %d: could not push our contribution to %s: %s", mr.round, address[-8:], exc)
                    return

        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.parallel_downloads, len(targets)))) as pool:
            for future in as_completed([pool.submit(push, a, b) for a, b in targets.items()]):
                future.result()
                self.keep_alive()

    def _needed_pushes(self, mr: MergeRound) -> list[int]:
        """Which blobs of every unreachable member we fetch this round (see `_holders`)."""
        if not self._reduces(mr):
            return [0]
        if self.is_authority and self.cfg.coordinator_recomputes:
            return [0]
        return [i + 1 for i in range(len(self.parts)) if self.peer in self._owners(i, self._servers(mr))]

    def _awaiting_pushes(self, mr: MergeRound) -> bool:
        """Whether a blob we need from an unreachable member has reached neither us nor anyone we
        could fetch it from yet."""
        needed = self._needed_pushes(mr)
        for peer, rec in mr.ready_set.items():
            if rec.pushed is None or peer == self.peer:
                continue
            try:
                if any(self._pushed_blob(mr, peer, index) is None for index in needed):
                    return True
            except ContributionError:
                continue  # a malformed digest list: rejected when its contribution is fetched
        return False

    def _pushed_blob(self, mr: MergeRound, peer: str, index: int) -> bytes | None:
        """Blob `index` pushed by unreachable member `peer`, found by the digests its signed ready
        record names (in our inbox, or at a peer it was pushed to); None if nowhere yet."""
        listing = self._by_digest(mr, mr.ready_set[peer].pushed, None, _LISTING_BYTES)
        if listing is None:
            return None
        expected = 1 + (len(self.parts) if self.cfg.merge == "reduce" else 0)
        try:
            digests = json.loads(listing)
            if (not isinstance(digests, list) or len(digests) != expected
                    or not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests)):
                raise ValueError
        except ValueError:
            raise ContributionError("the list of blobs it pushed is malformed") from None
        return self._by_digest(mr, digests[index], index, self.max_contribution_bytes)

    def _by_digest(self, mr: MergeRound, digest: str, index: int | None, bound: int) -> bytes | None:
        """The blob hashing to `digest`: already held, pushed to us, or fetched from a peer it
        was pushed to (`_holders(mr, index)`, only asked when we do not hold it)."""
        found = mr.pushed.get(digest) or self.server.inbox.get(digest)
        for address in self._holders(mr, index) if found is None else []:
            if address == self.p2p:
                continue
            try:
                data = self.server.fetch(address, pushed_name(digest), self.cfg.request_timeout, bound)
            except NETWORK_ERRORS:
                continue
            if hashlib.sha256(data).hexdigest() == digest:
                found = data
                break
        if found is not None:
            mr.pushed[digest] = found
        return found

    def _contribution_blob(self, mr: MergeRound, peer: str, index: int, name: str, bound: int) -> bytes:
        """A member's whole contribution (index 0) or part index - 1: fetched from the member
        (compact when we kept the factors of its last such blob: its baseline, if that went into
        W), or, for a member nobody can connect to, from what it pushed."""
        rec = mr.ready_set[peer]
        if rec.pushed is None:
            r, held = mr.round, self._bases.get((peer, index))
            blob = None
            if rec.zero_baseline or (held is not None and held[0] >= r - KEEP_CONTRIBUTIONS):
                compact = self.keys.contribution_compact_blob(r, peer, None if index == 0 else index - 1)
                blob = expand_part(self._fetch_member(mr, rec, compact, bound), None if held is None else held[1:],
                                   zero=rec.zero_baseline)
            if blob is None:
                blob = self._fetch_member(mr, rec, name, bound)
            digest, factors = part_factors(blob)
            self._bases[(peer, index)] = (r, digest, factors)
            return blob
        blob = self._pushed_blob(mr, peer, index)
        if blob is None:
            raise TransferError("what it pushed reached neither us nor the peers it pushed to in time")
        if len(blob) > bound:
            raise ContributionError(f"it pushed {len(blob)} bytes, more than the limit {bound}")
        return blob

    def _fetch_member(self, mr: MergeRound, rec: ReadyRecord, name: str, bound: int) -> bytes:
        started = self.clock.monotonic()
        try:
            return self.server.fetch(rec.p2p, name, self.cfg.request_timeout, bound)
        except NETWORK_ERRORS as exc:
            # A stream cut short on a busy home link must not leave a live member out of the round
            # (its part's owners would then disagree); a peer that let a request time out is not
            # asked twice.
            if self.clock.monotonic() - started > self.cfg.request_timeout / 2:
                raise
            log.info("round %d: fetching %s again after: %s", mr.round, name, exc)
            return self.server.fetch(rec.p2p, name, self.cfg.request_timeout, bound)

    # ---- the owner-reduced merge --------------------------------------------------------------
    def _owners(self, part: int, servers: list[str]) -> tuple[str, ...]:
        return owners(part, servers, self.cfg.part_owners)

    def _vouchers(self, part: int, servers: list[str]) -> set[str]:
        """Who reduces and serves a part: its two owners, whose equal digests make it trusted; or
        its one owner and the coordinator, which recomputes every part and whose digest alone
        makes it trusted (`_agreed_parts`: the owner serves it under that digest if its sum agreed)."""
        return set(self._owners(part, servers)) | ({self.authority} if self.cfg.part_owners == 1 else set())

    def _start_reducing(self, mr: MergeRound) -> None:
        """Reduce the parts we own: fetch our parts of every contribution, validate, sum, serve the
        result and publish its digest. Then collect every part (`_poll_reducing`)."""
        work = ReduceWork(members=sorted(mr.ready_set), servers=self._servers(mr))
        if self.is_authority and self.cfg.coordinator_recomputes:
            # The authority trusts no owner: it reduces every part from the raw contributions, and
            # its digest is the one a peer fooled by two colluding owners re-syncs to.
            self._fetch_parts(mr, work, list(range(len(self.parts))))
        else:
            mine = [i for i in range(len(self.parts)) if self.peer in self._owners(i, work.servers)]
            self._fetch_parts(mr, work, mine)
            for i in mine:
                self._reduce_part(mr, work, i, sorted(work.accepted[i]), publish=True)
            self._publish_parts(mr, work)
        mr.work = work
        work.began = self.clock.monotonic()
        self._mark(mr, "reduced_own")
        mr.step = RoundStep.REDUCING
        mr.deadline = work.began + self.cfg.round_timeout / 2

    def _fetch_parts(self, mr: MergeRound, work: ReduceWork, parts: list[int]) -> None:
        """Download and validate `parts` of every member's contribution, a few at a time. For
        most of the parts (the coordinator, a fallback) whole contributions are fetched instead:
        one request per member, not one per part."""
        r = mr.round
        whole = 2 * len(parts) > len(self.parts)

        def one(i: int | None, peer: str) -> dict[int, Contribution | None]:
            rec = mr.ready_set[peer]
            wanted = parts if i is None else [i]
            out: dict[int, Contribution | None] = dict.fromkeys(wanted)
            name = (self.keys.contribution_blob(r, peer) if i is None
                    else self.keys.contribution_part_blob(r, peer, i))
            try:
                if peer == self.peer and mr.contribution is not None:
                    blob = self.server.lookup(name)
                    if blob is None:
                        raise ContributionError("our own contribution is not served")
                elif rec.nbytes > self.max_contribution_bytes:
                    raise ContributionError(f"it announces {rec.nbytes} bytes, more than this model's contributions "
                                            f"can take ({self.max_contribution_bytes})")
                else:
                    bound = self.max_contribution_bytes if i is None else self.max_part_bytes[i]
                    blob = self._contribution_blob(mr, peer, 0 if i is None else i + 1, name, bound)
            except ContributionError as exc:
                log.warning("round %d: rejected the contribution of %s: %s", r, peer[:8], exc)
                return out
            except NETWORK_ERRORS as exc:
                log.warning("round %d: no contribution (part %s) from %s: %s", r, "all" if i is None else i,
                            peer[:8], exc)
                return out
            decoded = decode_contribution_parts(blob, peer, self.model, self.cfg.max_update,
                                                self.cfg.max_relative_update, [self.parts[j] for j in wanted],
                                                self.cfg.contribution_dtype)
            for j, c in zip(wanted, decoded):
                if not isinstance(c, ContributionError) and sorted(c.heads) != sorted(rec.heads):
                    c = ContributionError(f"heads {list(c.heads)} differ from its ready record")
                if isinstance(c, ContributionError):
                    log.warning("round %d: rejected part %d of %s's contribution: %s", r, j, peer[:8], c)
                else:
                    out[j] = c
            return out

        # Every peer starts with a different member (the one after itself): were they all to ask the
        # same members first, those members' uplinks would serve the whole swarm while others idle.
        start = (work.members.index(self.peer) + 1) if self.peer in work.members else self._spread(len(work.members))
        order = work.members[start:] + work.members[:start]
        jobs = [(None, peer) for peer in order] if whole else [(i, peer) for i in parts for peer in order]
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.parallel_downloads, len(jobs)))) as pool:
            futures = [pool.submit(one, i, peer) for i, peer in jobs]
            for _ in as_completed(futures):
                self.keep_alive()
            results = [f.result() for f in futures]
        for (_, peer), found in zip(jobs, results):
            for j, c in found.items():
                work.held.setdefault(j, {})
                if c is not None:
                    work.held[j][peer] = c
        for i in parts:
            work.accepted[i] = set(work.held.get(i, {}))

    def _reduce_part(self, mr: MergeRound, work: ReduceWork, i: int, members: list[str], publish: bool) -> dict:
        """Part i summed over `members` (from contributions we hold), as the float32 values every
        peer adds; served and announced when we own the part."""
        key = (i, tuple(members))
        if key not in work.computed:
            totals = reduce_contributions(self.model, [work.held[i][m] for m in members], self.cfg.robust_clip,
                                          self.parts[i])
            tensors = reduced_tensors(totals, self.cfg.reduced_dtype)
            digest = reduced_digest(tensors, members)
            work.computed[key] = (digest, dequantized(tensors, self.cfg.reduced_dtype, shapes_of(totals)))
            if publish:
                self._serve(mr.round, self.keys.reduced_blob(mr.round, i, digest), encode_reduced(tensors))
                work.published.append((i, tuple(members), digest))
        return work.computed[key][1]

    def _publish_parts(self, mr: MergeRound, work: ReduceWork) -> None:
        """Announce every part we reduced and serve, in our one record of the round: rewritten
        whole when there is more (a later expiration replaces it). With one owner per part the
        owners announce nothing: only the coordinator's record vouches for a part (`_agreed_parts`)."""
        if len(work.published) == work.announced or (self.cfg.part_owners == 1 and not self.is_authority):
            return
        work.announced = len(work.published)
        work.expiration = max(self._expiration(), work.expiration + 1e-3)  # an equal one would be refused
        key = self.keys.sums(mr.round) if self.is_authority else self.keys.parts(mr.round)
        dht_io.store(self.dht, key, self.identity, PartRecord.of(mr.round, work.published, self.p2p), work.expiration)

    def _agreed_parts(self, mr: MergeRound, work: ReduceWork) -> dict[int, dict[tuple[str, ...], tuple[str, list[str]]]]:
        """part -> {members: (digest, sources' addresses)} for every reduction its vouchers published
        alike (our own reductions count as ours): both its owners, or, with one owner per part,
        the coordinator, whose own sum is what checks the owner's. Then only the coordinator's one
        record is read, not one record per owner (every read of a key carries all it holds), and
        the owner is a source too: it serves the part under that digest if its sum agreed. Notes
        when each part's first record showed up in `work.first_seen`."""
        r = mr.round
        single = self.cfg.part_owners == 1
        found = dht_io.by_writer(self._read(self.keys.sums(r) if single else self.keys.parts(r), PartRecord,
                                             self.clock.now()))
        if single:
            found = {w: rec for w, rec in found.items() if w == self.authority}
        said: dict[tuple[int, tuple[str, ...], str], dict[str, str]] = {}
        for writer, record in found.items():
            if record.round != r:
                continue
            for part, members, digest in record.reduced():
                if (not 0 <= part < len(self.parts) or writer not in self._vouchers(part, work.servers)
                        or not set(members) <= set(work.members)):
                    continue
                said.setdefault((part, members, digest), {})[writer] = record.p2p
                work.first_seen.setdefault(part, self.clock.monotonic())
                if not set(self._owners(part, work.servers)) <= set(members):
                    work.orphaned.add(part)  # an owner says the other one's own contribution failed
        for (i, members), (digest, _) in work.computed.items():
            said.setdefault((i, members, digest), {})[self.peer] = self.p2p
        agreed: dict[int, dict[tuple[str, ...], tuple[str, list[str]]]] = {}
        for (i, members, digest), writers in said.items():
            if (self.authority in writers) if single else self._vouchers(i, work.servers) <= set(writers):
                sources = dict(writers)
                if single:
                    sources.update({o: mr.ready_set[o].p2p for o in self._owners(i, work.servers) if o not in sources})
                addresses = [a for w, a in sorted(sources.items()) if w != self.peer]
                agreed.setdefault(i, {})[members] = (digest, addresses)
        return agreed

    def _poll_reducing(self, mr: MergeRound) -> None:
        """Collect every part: which contributors each part accepted (ours, or as both owners say),
        the final set (accepted by every part), then every part reduced over it: ours, or
        downloaded from an owner and checked against the owners' digest. Parts whose owners are
        silent, dead or disagree past the deadline are fetched raw and reduced here."""
        r, work = mr.round, mr.work
        agreed = self._agreed_parts(mr, work)
        for i, versions in agreed.items():
            if i not in work.accepted:  # the versions are nested: the widest is what the part accepted
                work.accepted[i] = set(max(versions, key=len))
        now = self.clock.monotonic()
        late = now > mr.deadline

        def overdue(i: int) -> bool:
            """Past the deadline; or one owner published and the other stayed silent for the grace,
            or is not in the round as far as its co-owner could tell (then we check it ourselves).
            With one owner per part only the coordinator's record is read: the grace runs from
            when we began collecting, which is when the owners publish theirs."""
            seen = work.first_seen.get(i, work.began if self.cfg.part_owners == 1 else None)
            return late or i in work.orphaned or (seen is not None and now > seen + self.cfg.merge_grace)

        # The final set is usually every part's accepted set: download the parts agreed over what
        # the parts known so far accepted while the last owners are still reducing theirs.
        likely = tuple(sorted(set(work.members).intersection(*work.accepted.values())))
        if work.final is None:
            self._download_parts(mr, work, likely, agreed)
        unknown = [i for i in range(len(self.parts)) if i not in work.accepted]
        if unknown:
            if not all(overdue(i) for i in unknown):
                return
            self._fallback(mr, work, unknown)
        if work.final is None:
            work.final = sorted(set(work.members).intersection(*work.accepted.values()))
            self._mark(mr, "final")
        final = tuple(work.final)
        self._download_parts(mr, work, final, agreed)
        for i in range(len(self.parts)):
            if i in work.reduced:
                continue
            if i in work.held and set(final) <= set(work.held[i]):
                work.reduced[i] = self._reduce_part(mr, work, i, list(final),
                                                    publish=self.peer in self._vouchers(i, work.servers))
            elif (i, final) in work.fetched:
                work.reduced[i] = work.fetched.pop((i, final))
        self._publish_parts(mr, work)
        missing = [i for i in range(len(self.parts)) if i not in work.reduced]
        if missing:
            if not all(overdue(i) for i in missing):
                return
            self._fallback(mr, work, missing)
            unreachable = [i for i in missing if not set(final) <= set(work.held[i])]
            if unreachable:  # a contributor's part we cannot get: take the agreed W from others later
                log.warning("round %d: could not get every contribution to part %d; catching up", r, unreachable[0])
                mr.step, mr.deadline = RoundStep.CATCHING_UP, self.clock.monotonic() + self.cfg.round_timeout
                return
            for i in missing:
                work.reduced[i] = self._reduce_part(mr, work, i, list(final), publish=False)
        work.fetched.clear()
        totals = {name: t.double() for i in range(len(self.parts)) for name, t in work.reduced[i].items()}
        mr.rejected = sorted(set(work.members) - set(final))
        self._merge(mr, totals, list(final))

    def _spread(self, n: int) -> int:
        """Where in a list of n this peer starts, so that peers spread their requests."""
        return int(hashlib.sha256(self.peer.encode()).hexdigest(), 16) % max(1, n)

    def _download_parts(self, mr: MergeRound, work: ReduceWork, members: tuple[str, ...],
                        agreed: dict[int, dict[tuple[str, ...], tuple[str, list[str]]]]) -> None:
        """Download, a few at a time, every part both its owners published reduced over `members`
        that we neither hold nor could reduce ourselves (into `work.fetched`). Each peer starts at
        a different part, so that the owners' uplinks share the load; and of a part's sources
        (its two owners, or its owner and the coordinator) consecutive members ask different ones
        first, so that each source serves its part to about as many readers as the other."""
        n = len(self.parts)
        me = work.members.index(self.peer) if self.peer in work.members else self._spread(len(work.members))
        start = me * n // len(work.members) if self.peer in work.members else self._spread(n)
        todo = [i for i in (list(range(start, n)) + list(range(start))) if i not in work.reduced
                and (i, members) not in work.fetched and members in agreed.get(i, {})
                and not (i in work.held and set(members) <= set(work.held[i]))]
        if not todo:
            return

        def one(i: int) -> dict | None:
            digest, addresses = agreed[i][members]
            return self._download_part(mr.round, i, list(members), digest, addresses, first=me + i)

        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.parallel_downloads, len(todo)))) as pool:
            futures = {pool.submit(one, i): i for i in todo}
            for future in as_completed(futures):
                self.keep_alive()
                tensors = future.result()
                if tensors is not None:
                    work.fetched[(futures[future], members)] = tensors

    def _download_part(self, r: int, i: int, members: list[str], digest: str, addresses: list[str],
                       first: int) -> dict | None:
        """Reduced part i from the first of `addresses` (counted from index `first`) that serves it
        intact."""
        shift = first % max(1, len(addresses))
        for address in addresses[shift:] + addresses[:shift]:
            try:
                blob = self.server.fetch(address, self.keys.reduced_blob(r, i, digest), self.cfg.request_timeout,
                                         self.max_part_bytes[i])
                return decode_reduced(blob, self.model, self.parts[i], members, digest, self.cfg.reduced_dtype)
            except ContributionError as exc:
                log.warning("round %d: part %d from %s is bad: %s", r, i, address[-8:], exc)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: could not fetch part %d from %s: %s", r, i, address[-8:], exc)
        return None

    def _fallback(self, mr: MergeRound, work: ReduceWork, parts: list[int]) -> None:
        """Owners did not deliver these parts in time: fetch every contribution's part ourselves."""
        todo = [i for i in parts if i not in work.held]
        work.raw.update(parts)
        if todo:
            log.warning("round %d: %d of %d parts not reduced by their owners in time; fetching them raw",
                        mr.round, len(todo), len(self.parts))
            self._fetch_parts(mr, work, todo)

    def _poll_voting(self, mr: MergeRound) -> None:
        """Wait until every contributor we merged (and the coordinator, if it is up) has published
        its digest, bounded by the grace; then take the agreed W: the coordinator's, else the one
        most holders hold (re-synced from one of them if it is not ours)."""
        r = mr.round
        votes = self._votes(r)
        mr.votes_seen = len(votes)
        if mr.awaited is None:  # once per round: is the coordinator up and at this round, so that it votes?
            progress = None if self.is_authority else self.progress()
            mr.awaited = set(mr.members) | ({self.authority} if progress is not None and progress.round == r else set())
        # A member that has since left (its heads released) will not vote: waiting for it would
        # hold the round to its deadline, as at the end of a run when every volunteer leaves.
        awaited = mr.awaited & (set(self.holders(max_age=VIEW_SECONDS).values()) | {self.authority})
        now = self.clock.monotonic()
        # The coordinator's vote decides: while it is up, it is awaited for as long as a round may
        # take, not just the grace (a peer that gives up on a slow coordinator merges on alone).
        if not awaited <= set(votes) and (now <= mr.deadline or (
                self.authority in awaited - set(votes) and now <= mr.deadline + self.cfg.round_timeout)):
            return
        # Our own vote counts even if the DHT did not take it (then we only agree with ourselves).
        votes[self.peer] = HashRecord(round=r, digest=mr.digest, members=mr.members)
        agreed = votes[self.authority] if self.authority in votes else agreed_vote(votes)
        mr.agreed_members = list(agreed.members)
        result = RoundResult(round=r, new_round=r + 1, rejected=mr.rejected, seconds_waiting=mr.waited,
                             reduced=mr.work is not None, raw_parts=len(mr.work.raw) if mr.work is not None else 0)
        if agreed.digest != mr.digest:
            log.warning("round %d: our W (%s, %d contributions) differs from the agreed one (%s, %d); re-syncing",
                        r, mr.digest[:10], len(mr.members), agreed.digest[:10], len(agreed.members))
            donors = self.donors()
            addresses = [donors[who].p2p for who, v in sorted(votes.items())
                         if v.digest == agreed.digest and who in donors and who != self.peer]
            result.resynced = self._fetch_state(addresses, r + 1, agreed.digest)
            if not result.resynced:  # nobody handed it out: catch up with the swarm later
                log.warning("round %d: no peer handed out the agreed W; catching up", r)
                mr.step, mr.deadline = RoundStep.CATCHING_UP, self.clock.monotonic() + self.cfg.round_timeout
                return
        self._agreed_members = (r, list(agreed.members))
        result.members = list(agreed.members)
        result.merged = self.peer in agreed.members
        ready = mr.ready_set
        if not set(agreed.members) <= set(ready):  # merged records that came after ours settled (we re-synced)
            ready = {**self._ready(r), **ready}
        result.merged_head_steps = sum(ready[p].head_steps for p in agreed.members if p in ready)
        if mr.totals is not None and not result.resynced:
            mr.pending = True  # applied by the caller, at the end of its current steps
            result.new_round = r + 1
            result.digest = mr.digest
            self._finish(mr, result)
            return
        self._round = max(self._round, r + 1)
        self._w_version += 1
        result.new_round = self._round
        self._finish(mr, result)
        self.announce()

    def _poll_catching_up(self, mr: MergeRound) -> None:
        """We came too late for the round (or the swarm is ahead): take the trusted W from a peer
        that has it, keep our change."""
        if self.sync(min_round=mr.round + 1):
            result = RoundResult(round=mr.round, new_round=self._round, missed=True, resynced=True)
            if mr.agreed_members is not None:  # we merged, then failed to fetch the agreed W
                result.missed = False
                result.members = list(mr.agreed_members)
                result.merged = self.peer in mr.agreed_members
            self._finish(mr, result)
            return
        if self.clock.monotonic() > mr.deadline:
            raise TransferError(f"no peer could hand out the agreed W of round {mr.round + 1} or later")
        mr.wait = max(self.cfg.poll_seconds, 0.5)

    def _finish(self, mr: MergeRound, result: RoundResult) -> None:
        elapsed = self.clock.monotonic() - mr.started
        result.digest = result.digest or self.model.state_digest()
        result.seconds_communicating = max(0.0, elapsed - result.seconds_waiting)
        self._mark(mr, "done")
        result.phases = dict(mr.marks)
        result.dht_reads = self.dht_reads - mr.reads_before
        mr.step, mr.result, mr.wait = RoundStep.DONE, result, 0.0

    def _gather(self, mr: MergeRound) -> tuple[list[Contribution], list[str]]:
        r, ready_set, own = mr.round, mr.ready_set, mr.contribution

        def one(peer: str) -> Contribution | None:
            rec = ready_set[peer]
            try:
                if peer == self.peer and own is not None:
                    blob = own
                elif rec.nbytes > self.max_contribution_bytes:
                    raise ContributionError(f"it announces {rec.nbytes} bytes, more than this model's contributions "
                                            f"can take ({self.max_contribution_bytes})")
                else:
                    blob = self._contribution_blob(mr, peer, 0, self.keys.contribution_blob(r, peer),
                                                   self.max_contribution_bytes)
                contribution = decode_contribution(blob, peer, self.model, self.cfg.max_update,
                                                   self.cfg.max_relative_update, dtype=self.cfg.contribution_dtype)
                if sorted(contribution.heads) != sorted(rec.heads):
                    raise ContributionError(f"heads {list(contribution.heads)} differ from its ready record")
                return contribution
            except ContributionError as exc:
                log.warning("round %d: rejected the contribution of %s: %s", r, peer[:8], exc)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: no contribution from %s: %s", r, peer[:8], exc)
            return None

        peers = sorted(ready_set)
        with ThreadPoolExecutor(max_workers=min(self.cfg.parallel_downloads, max(1, len(peers)))) as pool:
            futures = [pool.submit(one, p) for p in peers]
            for _ in as_completed(futures):
                self.keep_alive()  # a long gather must not let our leases lapse
            results = [f.result() for f in futures]
        got = [c for c in results if c is not None]
        return got, [p for p, c in zip(peers, results) if c is None]


def agreed_vote(votes: dict[str, HashRecord]) -> HashRecord:
    """The vote for the digest most peers hold; ties go to the one merging more contributions,
    then the larger digest, so every peer that sees the same votes picks the same one."""
    counts = Counter(v.digest for v in votes.values())
    sample = {v.digest: v for v in votes.values()}
    return sample[max(counts, key=lambda d: (counts[d], len(sample[d].members), d))]
