"""Merge rounds: how every peer's W moves from round r to round r + 1 identically.

Round r has its own DHT keys, so a late peer's round r never meets others' round r + 1.

1. A peer that finished its T local steps serves its contribution and writes a ready record.
2. The round closes when every lease holder is ready, or after the first ready peer has waited
   `merge_grace` seconds or `merge_slack` times its own training time, whichever is longer (a
   deadline that scales with the round, so peers somewhat slower than the fastest still make it). A peer that comes later is a straggler: it re-syncs W and keeps its change for
   the next round (nothing is lost, nothing merged twice).
3. Every peer downloads every ready contribution, validates it, merges them in peer-id order and
   writes its W digest together with the contributors it merged.
4. The digest most peers hold is the agreed W. A peer that computed another one (a contributor
   died mid-round, a download failed) re-syncs from a peer holding the agreed W. A contribution
   counts as merged only if it is in the agreed contributor list.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from swarm import schemas
from swarm.clock import Clock
from swarm.config import SwarmConfig
from swarm.keys import RunKeys
from swarm.lte_model import LTEModel
from swarm.schemas import DonorRecord, HashRecord, ReadyRecord
from swarm.transport import NETWORK_ERRORS, TransferError
from swarm.wire import Contribution, ContributionError, decode_contribution, decode_state, encode_state, merge_contributions

log = logging.getLogger(__name__)

KEEP_CONTRIBUTIONS = 3  # rounds for which a peer keeps serving its contributions


class RoundStep(str, enum.Enum):
    """Where one peer is within one merge round."""

    OPEN = "open"                # contributions are being offered; waiting for the round to close
    SETTLING = "settling"        # closed; letting the last ready records spread before reading them
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
    seconds_waiting: float = 0.0
    seconds_communicating: float = 0.0


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
    settle_until: float = 0.0
    waited: float = 0.0
    ready_set: dict[str, ReadyRecord] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    digest: str = ""
    result: RoundResult | None = None


class MergeProtocol:
    """One peer's side of the merge rounds of a run; `model` holds this peer's W (and heads).

    It alone writes the peer's round number: `sync` sets it from the state it downloads, the end
    of a round moves it to r + 1. A round is a `MergeRound` that `poll` advances one step at a
    time without ever sleeping, so the same code runs under a real and a fake clock."""

    def __init__(self, dht, server, keys: RunKeys, peer: str, cfg: SwarmConfig, model: LTEModel,
                 active_peers: Callable[[], set[str]], clock: Clock | None = None, round_: int = 0):
        self.dht, self.server, self.keys, self.peer, self.cfg = dht, server, keys, peer, cfg
        self.model = model
        self.active_peers = active_peers  # peers currently holding heads (whom a round waits for)
        self.clock = clock or Clock()
        self._round = round_
        self.max_bytes = int(cfg.max_contribution_mb * 2**20)
        server.publish(keys.state_blob, lambda: encode_state(self.model, self._round))

    @property
    def round(self) -> int:
        """The round of this peer's W: merge round `round` is the next one it takes part in."""
        return self._round

    # ---- state ---------------------------------------------------------------------------
    def announce(self) -> None:
        """Tell newcomers we can hand out W at our round (refreshed by callers now and then)."""
        record = DonorRecord(round=self._round, digest=self.model.state_digest())
        schemas.store(self.dht, self.keys.donors, self.peer, record, self.clock.now() + 3 * self.cfg.lease_seconds)

    def donors(self) -> dict[str, DonorRecord]:
        found = schemas.read(self.dht, self.keys.donors, DonorRecord, now=self.clock.now())
        return {p: r for p, (r, _) in found.items() if p != self.peer}

    def sync(self, min_round: int = 0, digest: str | None = None, candidates: list[str] | None = None) -> bool:
        """Download W from a donor at `min_round` or later (or from `candidates` holding `digest`)."""
        if candidates is None:
            donors = self.donors()
            candidates = sorted((p for p, r in donors.items() if r.round >= min_round),
                                key=lambda p: (-donors[p].round, p))
            # Spread newcomers over the donors at the newest round instead of all hitting one.
            newest = [p for p in candidates if donors[p].round == donors[candidates[0]].round] if candidates else []
            if len(newest) > 1:
                shift = int(hashlib.sha256(self.peer.encode()).hexdigest(), 16) % len(newest)
                candidates = newest[shift:] + newest[:shift] + candidates[len(newest):]
            expected = {p: donors[p].digest for p in candidates}
        else:
            expected = {p: digest for p in candidates}
        for donor in candidates:
            self.clock.check()
            try:
                blob = self.server.fetch(donor, self.keys.state_blob, self.cfg.request_timeout * 4, 16 * self.max_bytes)
                self._round = decode_state(blob, self.model, expect_digest=None)
                if expected.get(donor) and self.model.state_digest() != expected[donor]:
                    log.info("donor %s moved on while we downloaded; took its round %d", donor[-8:], self._round)
                log.info("synced W of round %d from %s (%.1f MB)", self._round, donor[-8:], len(blob) / 2**20)
                self.announce()
                return True
            except NETWORK_ERRORS + (ContributionError,) as exc:
                log.warning("could not sync from %s: %s", donor[-8:], exc)
        return False

    # ---- reading a round's records ---------------------------------------------------------
    def _ready(self, r: int) -> dict[str, ReadyRecord]:
        found = schemas.read(self.dht, self.keys.ready(r), ReadyRecord, now=self.clock.now())
        return {p: rec for p, (rec, _) in found.items() if rec.round == r}

    def _hashes(self, r: int) -> dict[str, HashRecord]:
        found = schemas.read(self.dht, self.keys.hashes(r), HashRecord, now=self.clock.now())
        return {p: rec for p, (rec, _) in found.items() if rec.round == r}

    def close_at(self, ready: dict[str, ReadyRecord]) -> float:
        """When a round with these ready records stops waiting for the others (DHT time)."""
        first = min(ready.values(), key=lambda x: x.ready_at)
        return first.ready_at + max(self.cfg.merge_grace, self.cfg.merge_slack * first.train_seconds)

    def closed(self, r: int) -> bool:
        """Round r no longer takes contributions (someone merged it, or its deadline passed)."""
        if self._hashes(r):
            return True
        ready = self._ready(r)
        return bool(ready) and self.clock.now() > self.close_at(ready)

    # ---- one round, step by step -------------------------------------------------------------
    def begin(self, contribution: bytes | None, ready: ReadyRecord | None) -> MergeRound:
        """Enter merge round `self.round` as a contributor (offering `contribution`), or as a
        follower when `contribution` is None."""
        r, start = self._round, self.clock.monotonic()
        mr = MergeRound(round=r, contribution=contribution, ready=ready, started=start,
                        deadline=start + self.cfg.round_timeout)
        if self.closed(r):
            log.warning("merge round %d closed before we were ready; catching up (our change waits for the next round)", r)
            mr.step = RoundStep.CATCHING_UP
            return mr
        if contribution is not None and ready is not None:
            self.server.publish(self.keys.contribution_blob(r), contribution)
            self.server.drop(self.keys.contribution_blob(r - KEEP_CONTRIBUTIONS))
            schemas.store(self.dht, self.keys.ready(r), self.peer, ready, self._expiration())
        return mr

    def poll(self, mr: MergeRound) -> RoundResult | None:
        """Advance `mr` by one step; the result once the round is over for us, else None (poll
        again after `mr.wait` seconds). Network failures inside a step degrade (a rejected or
        missing contribution, a re-sync); only a failed catch-up raises `TransferError`."""
        step = {RoundStep.OPEN: self._poll_open, RoundStep.SETTLING: self._poll_settling,
                RoundStep.VOTING: self._poll_voting, RoundStep.CATCHING_UP: self._poll_catching_up}.get(mr.step)
        if step is not None:
            mr.wait = self.cfg.poll_seconds
            step(mr)
        return mr.result

    def run(self, mr: MergeRound) -> RoundResult:
        """Poll `mr` to its end, sleeping in between (the blocking form of a round)."""
        while (result := self.poll(mr)) is None:
            self.clock.sleep(mr.wait)
        return result

    def merge(self, contribution: bytes | None, ready: ReadyRecord | None) -> RoundResult:
        """Take part in merge round `self.round` from start to end (blocking)."""
        return self.run(self.begin(contribution, ready))

    def _expiration(self) -> float:
        return self.clock.now() + self.cfg.round_timeout * 3

    def _poll_open(self, mr: MergeRound) -> None:
        r, now = mr.round, self.clock.now()
        ready_set = self._ready(r)
        close = False
        if ready_set:
            close = not (self.active_peers() - set(ready_set)) or now > self.close_at(ready_set)
        elif mr.contribution is None and self.clock.monotonic() > mr.deadline:
            self._finish(mr, RoundResult(round=r, new_round=self._round, idle=True))
            return
        if close or self._hashes(r):
            mr.step = RoundStep.SETTLING
            mr.settle_until = self.clock.monotonic() + self.cfg.settle_seconds
            mr.wait = self.cfg.settle_seconds

    def _poll_settling(self, mr: MergeRound) -> None:
        remaining = mr.settle_until - self.clock.monotonic()
        if remaining > 0:
            mr.wait = remaining
            return
        r = mr.round
        mr.ready_set = self._ready(r)
        if mr.contribution is not None and self.peer not in mr.ready_set:  # our record never made it out
            log.warning("our ready record for round %d is not visible; merging without us", r)
        mr.waited = self.clock.monotonic() - mr.started
        contributions, mr.rejected = self._gather(r, mr.ready_set, mr.contribution)
        merge_contributions(self.model, contributions)
        mr.members = sorted(c.peer for c in contributions)
        mr.digest = self.model.state_digest()
        schemas.store(self.dht, self.keys.hashes(r), self.peer, HashRecord(round=r, digest=mr.digest, members=mr.members),
                      self._expiration())
        mr.step = RoundStep.VOTING
        mr.deadline = self.clock.monotonic() + self.cfg.merge_grace

    def _poll_voting(self, mr: MergeRound) -> None:
        """Wait until every contributor we merged has published its digest (bounded by the grace),
        then take the agreed W: ours, or the one most peers hold (re-synced from one of them)."""
        r = mr.round
        votes = self._hashes(r)
        if not set(mr.members) <= set(votes) and self.clock.monotonic() <= mr.deadline:
            return
        # Our own vote counts even if the DHT did not take it (then we only agree with ourselves).
        votes.setdefault(self.peer, HashRecord(round=r, digest=mr.digest, members=mr.members))
        agreed_digest, agreed = agreed_vote(votes)
        result = RoundResult(round=r, new_round=r + 1, rejected=mr.rejected, seconds_waiting=mr.waited)
        members = mr.members
        if agreed_digest != mr.digest:
            holders = sorted(p for p, v in votes.items() if v.digest == agreed_digest and p != self.peer)
            log.warning("round %d: our W (%s, %d contributions) differs from the agreed one (%s, %d); re-syncing",
                        r, mr.digest[:10], len(mr.members), agreed_digest[:10], len(agreed.members))
            result.resynced = self.sync(candidates=holders, digest=agreed_digest)
            members = agreed.members
        self._round = max(self._round, r + 1)
        result.new_round = self._round
        result.members = members
        result.merged = self.peer in members
        result.merged_head_steps = sum(mr.ready_set[p].head_steps for p in members if p in mr.ready_set)
        self._finish(mr, result)
        self.announce()

    def _poll_catching_up(self, mr: MergeRound) -> None:
        """We came too late for the round: take W from a peer that has it, keep our change."""
        if self.sync(min_round=mr.round + 1):
            self._finish(mr, RoundResult(round=mr.round, new_round=self._round, missed=True, resynced=True))
            return
        if self.clock.monotonic() > mr.deadline:
            raise TransferError(f"no peer could hand out W of round {mr.round + 1} or later")
        mr.wait = max(self.cfg.poll_seconds, 0.5)

    def _finish(self, mr: MergeRound, result: RoundResult) -> None:
        elapsed = self.clock.monotonic() - mr.started
        result.digest = self.model.state_digest()
        result.seconds_communicating = max(0.0, elapsed - result.seconds_waiting)
        mr.step, mr.result, mr.wait = RoundStep.DONE, result, 0.0

    def _gather(self, r: int, ready_set: dict[str, ReadyRecord], own: bytes | None) -> tuple[list[Contribution], list[str]]:
        def one(peer: str) -> Contribution | None:
            try:
                blob = own if peer == self.peer and own is not None else self.server.fetch(
                    peer, self.keys.contribution_blob(r), self.cfg.request_timeout, self.max_bytes)
                contribution = decode_contribution(blob, peer, self.model, self.cfg.max_update)
                if sorted(contribution.heads) != sorted(ready_set[peer].heads):
                    raise ContributionError(f"heads {list(contribution.heads)} differ from its ready record")
                return contribution
            except ContributionError as exc:
                log.warning("round %d: rejected the contribution of %s: %s", r, peer[-8:], exc)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: no contribution from %s: %s", r, peer[-8:], exc)
            return None

        peers = sorted(ready_set)
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(peers)))) as pool:
            results = list(pool.map(one, peers))
        got = [c for c in results if c is not None]
        return got, [p for p, c in zip(peers, results) if c is None]


def agreed_vote(votes: dict[str, HashRecord]) -> tuple[str, HashRecord]:
    """The digest most peers hold; ties go to the one merging more contributions, then the
    larger digest, so every peer that sees the same votes picks the same one."""
    counts = Counter(v.digest for v in votes.values())
    sample = {v.digest: v for v in votes.values()}
    digest = max(counts, key=lambda d: (counts[d], len(sample[d].members), d))
    return digest, sample[digest]
