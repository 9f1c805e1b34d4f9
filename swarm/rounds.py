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

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from hivemind.utils import get_dht_time

from swarm import schemas
from swarm.config import SwarmConfig
from swarm.keys import RunKeys
from swarm.lte_model import LTEModel
from swarm.schemas import DonorRecord, HashRecord, ReadyRecord
from swarm.transport import NETWORK_ERRORS, BlobServer, TransferError
from swarm.wire import Contribution, ContributionError, decode_contribution, decode_state, encode_state, merge_contributions

log = logging.getLogger(__name__)

KEEP_CONTRIBUTIONS = 3  # rounds for which a peer keeps serving its contributions


@dataclass
class RoundResult:
    round: int                     # the merge round this call was about
    new_round: int                 # the peer's W round afterwards
    merged: bool = False           # our contribution is in the agreed W
    missed: bool = False           # the round closed before we were ready
    resynced: bool = False         # W was downloaded from a peer holding the agreed state
    members: list[str] = field(default_factory=list)
    merged_head_steps: int = 0     # head-steps of all contributions in the agreed W
    digest: str = ""
    rejected: list[str] = field(default_factory=list)
    seconds_waiting: float = 0.0
    seconds_communicating: float = 0.0


class MergeProtocol:
    """One peer's side of the merge rounds of a run; `model` holds this peer's W (and heads)."""

    def __init__(self, dht, server: BlobServer, keys: RunKeys, peer: str, cfg: SwarmConfig, model: LTEModel,
                 active_peers: Callable[[], set[str]], sleep: Callable[[float], None] = time.sleep):
        self.dht, self.server, self.keys, self.peer, self.cfg = dht, server, keys, peer, cfg
        self.model = model
        self.active_peers = active_peers  # peers currently holding heads (whom a round waits for)
        self.sleep = sleep
        self.round = 0
        self.max_bytes = int(cfg.max_contribution_mb * 2**20)
        server.publish(keys.state_blob, lambda: encode_state(self.model, self.round))

    # ---- state ---------------------------------------------------------------------------
    def announce(self) -> None:
        """Tell newcomers we can hand out W at our round (refreshed by callers now and then)."""
        record = DonorRecord(round=self.round, digest=self.model.state_digest())
        schemas.store(self.dht, self.keys.donors, self.peer, record, get_dht_time() + 3 * self.cfg.lease_seconds)

    def donors(self) -> dict[str, DonorRecord]:
        return {p: r for p, (r, _) in schemas.read(self.dht, self.keys.donors, DonorRecord).items() if p != self.peer}

    def sync(self, min_round: int = 0, digest: str | None = None, candidates: list[str] | None = None) -> bool:
        """Download W from a donor at `min_round` or later (or from `candidates` holding `digest`)."""
        if candidates is None:
            donors = self.donors()
            candidates = sorted((p for p, r in donors.items() if r.round >= min_round),
                                key=lambda p: (-donors[p].round, p))
            # Spread newcomers over the donors at the newest round instead of all hitting one.
            newest = [p for p in candidates if donors[p].round == donors[candidates[0]].round] if candidates else []
            if len(newest) > 1:
                shift = hash(self.peer) % len(newest)
                candidates = newest[shift:] + newest[:shift] + candidates[len(newest):]
            expected = {p: donors[p].digest for p in candidates}
        else:
            expected = {p: digest for p in candidates}
        for donor in candidates:
            try:
                blob = self.server.fetch(donor, self.keys.state_blob, self.cfg.request_timeout * 4, 16 * self.max_bytes)
                self.round = decode_state(blob, self.model, expect_digest=None)
                if expected.get(donor) and self.model.state_digest() != expected[donor]:
                    log.info("donor %s moved on while we downloaded; took its round %d", donor[-8:], self.round)
                log.info("synced W of round %d from %s (%.1f MB)", self.round, donor[-8:], len(blob) / 2**20)
                self.announce()
                return True
            except NETWORK_ERRORS + (ContributionError,) as exc:
                log.warning("could not sync from %s: %s", donor[-8:], exc)
        return False

    # ---- rounds --------------------------------------------------------------------------
    def _ready(self, r: int) -> dict[str, ReadyRecord]:
        return {p: rec for p, (rec, _) in schemas.read(self.dht, self.keys.ready(r), ReadyRecord).items() if rec.round == r}

    def _hashes(self, r: int) -> dict[str, HashRecord]:
        return {p: rec for p, (rec, _) in schemas.read(self.dht, self.keys.hashes(r), HashRecord).items() if rec.round == r}

    def close_at(self, ready: dict[str, ReadyRecord]) -> float:
        """When a round with these ready records stops waiting for the others (DHT time)."""
        first = min(ready.values(), key=lambda x: x.ready_at)
        return first.ready_at + max(self.cfg.merge_grace, self.cfg.merge_slack * first.train_seconds)

    def closed(self, r: int) -> bool:
        """Round r no longer takes contributions (someone merged it, or its deadline passed)."""
        if self._hashes(r):
            return True
        ready = self._ready(r)
        return bool(ready) and get_dht_time() > self.close_at(ready)

    def merge(self, contribution: bytes | None, ready: ReadyRecord | None) -> RoundResult | None:
        """Take part in merge round `self.round` (as a contributor, or as a follower when
        `contribution` is None). Returns None if a follower saw no round start in time."""
        r = self.round
        start = time.perf_counter()
        if self.closed(r):
            return self._catch_up(r, start)
        expiration = get_dht_time() + self.cfg.round_timeout * 3
        if contribution is not None and ready is not None:
            self.server.publish(self.keys.contribution_blob(r), contribution)
            self.server.drop(self.keys.contribution_blob(r - KEEP_CONTRIBUTIONS))
            schemas.store(self.dht, self.keys.ready(r), self.peer, ready, expiration)

        # Wait for the round to close.
        deadline = get_dht_time() + self.cfg.round_timeout
        while True:
            ready_set = self._ready(r)
            now = get_dht_time()
            if ready_set:
                waiting_for = self.active_peers() - set(ready_set)
                if not waiting_for or now > self.close_at(ready_set):
                    break
            elif contribution is None and now > deadline:
                return None
            if self._hashes(r):  # others closed it already
                break
            self.sleep(self.cfg.poll_seconds)
        self.sleep(self.cfg.settle_seconds)
        ready_set = self._ready(r)
        if contribution is not None and self.peer not in ready_set:  # our record never made it out
            log.warning("our ready record for round %d is not visible; merging without us", r)
        waited = time.perf_counter() - start

        contributions, rejected = self._gather(r, ready_set, contribution)
        merge_contributions(self.model, contributions)
        members = sorted(c.peer for c in contributions)
        digest = self.model.state_digest()
        schemas.store(self.dht, self.keys.hashes(r), self.peer, HashRecord(round=r, digest=digest, members=members), expiration)

        votes = self._await_votes(r, members)
        agreed_digest, agreed = self._agreed(votes)
        result = RoundResult(round=r, new_round=r + 1, rejected=rejected, seconds_waiting=waited)
        if agreed_digest != digest:
            holders = sorted(p for p, v in votes.items() if v.digest == agreed_digest and p != self.peer)
            log.warning("round %d: our W (%s, %d contributions) differs from the agreed one (%s, %d); re-syncing",
                        r, digest[:10], len(members), agreed_digest[:10], len(agreed.members))
            self.round = r  # the state we download is the agreed round r + 1
            result.resynced = self.sync(candidates=holders, digest=agreed_digest)
            members = agreed.members
        self.round = r + 1 if not result.resynced else max(self.round, r + 1)
        result.new_round = self.round
        result.members = members
        result.merged = self.peer in members
        result.merged_head_steps = sum(ready_set[p].head_steps for p in members if p in ready_set)
        result.digest = self.model.state_digest()
        result.seconds_communicating = time.perf_counter() - start - waited
        self.announce()
        return result

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

    def _await_votes(self, r: int, members: list[str]) -> dict[str, HashRecord]:
        """Wait until every contributor we merged has published its digest (bounded by the grace)."""
        deadline = time.monotonic() + self.cfg.merge_grace
        while True:
            votes = self._hashes(r)
            if set(members) <= set(votes) or time.monotonic() > deadline:
                return votes
            self.sleep(self.cfg.poll_seconds)

    @staticmethod
    def _agreed(votes: dict[str, HashRecord]) -> tuple[str, HashRecord]:
        """The digest most peers hold; ties go to the one merging more contributions, then the
        larger digest, so every peer that sees the same votes picks the same one."""
        counts = Counter(v.digest for v in votes.values())
        sample = {v.digest: v for v in votes.values()}
        digest = max(counts, key=lambda d: (counts[d], len(sample[d].members), d))
        return digest, sample[digest]

    def _catch_up(self, r: int, start: float) -> RoundResult:
        """We came too late for round r: take W from a peer that has it, keep our change for later."""
        log.warning("merge round %d closed before we were ready; catching up (our change waits for the next round)", r)
        deadline = time.monotonic() + self.cfg.round_timeout
        synced = False
        while not synced and time.monotonic() < deadline:
            synced = self.sync(min_round=r + 1)
            if not synced:
                self.sleep(max(self.cfg.poll_seconds, 0.5))
        if not synced:
            raise TransferError(f"no peer could hand out W of round {r + 1} or later")
        elapsed = time.perf_counter() - start
        return RoundResult(round=r, new_round=self.round, missed=True, resynced=True,
                           digest=self.model.state_digest(), seconds_communicating=elapsed)
