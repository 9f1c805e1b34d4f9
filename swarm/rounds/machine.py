"""The merge round as a state machine: how every peer's W moves from round r to round r + 1
identically. Round r has its own DHT keys, so a late peer's round r never meets others' round r + 1.

One round, as a contributor sees it (C: the coordinator, P: any peer, DHT: records, signed):

    P   serve contribution (whole, parts, compact) --------------------------> blob server
    P   ready record (heads, size, address) -------------------------------> DHT  ready(r)
        ... polls ready(r) until every holder is ready or the close window ends ...
    P   (behind NAT) push its blobs to the owners / members / C -------------> their inboxes
    P   settle, then read ready(r) thoroughly: the round's members
      reduced (>= 3 members, >= 2 reachable)      |  all-gathered
    P   fetch own parts of every member <-------- |  P  fetch every whole contribution
    P   reduce, serve, part record ------> DHT    |  P  check, clip, sum
    P   fetch every other part from its owners    |
    P   apply the sum to W, vote: digest + members ---------------------------> DHT  hashes(r)
    P   read hashes(r): C's digest, else most holders'; re-sync W if ours differs

Steps (`RoundStep`) and what moves each:

    step         | leaves when                                           | to
    -------------+-------------------------------------------------------+------------------------
    (begin)      | the swarm is past round r, or r was already merged    | CATCHING_UP
    OPEN         | every holder ready, or the close window ran out,      | SETTLING
                 |   or C / most holders voted                           |
                 | nobody's ready record counts by the round's timeout   | DONE (missed / idle)
    SETTLING     | settle delay over, pushes arrived: members read       | REDUCING or VOTING
    REDUCING     | every part reduced over the final members             | VOTING
                 | a member's part can be had from nobody                | CATCHING_UP
    VOTING       | every member and C voted, or the grace ran out        | DONE (re-synced if ours
                 |                                                       |   differs) or CATCHING_UP
    CATCHING_UP  | the trusted W of round r + 1 or later is downloaded   | DONE

Nothing is lost and nothing merged twice: a peer that comes after the close keeps its change for
the next round and re-syncs W. A round is advanced by `poll`, which never sleeps, so the same code
runs under a real and a fake clock. The parts live beside: `agreement` (whose word counts),
`state_transfer` (this peer's W and its round), `collection` (contributions in and out),
`reduction` (the owner-reduced merge) and `gather` (the all-gather)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

from swarm import dht_io
from swarm.clock import Clock
from swarm.config import SwarmConfig
from swarm.identity import Identity
from swarm.keys import RunKeys
from swarm.lte_model import LTEModel
from swarm.rounds import plan
from swarm.rounds.agreement import Agreement, agreed_vote, order
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.gather import gather
from swarm.rounds.reduction import Reduction
from swarm.rounds.state_transfer import StateTransfer
from swarm.rounds.types import MergeRound, RoundResult, RoundScope, RoundStep
from swarm.rounds.undo import Undoing
from swarm.schemas import HashRecord, ReadyRecord
from swarm.transport import TransferError
from swarm.wire import apply_reduced, split_totals

log = logging.getLogger(__name__)

# Each poll that finds nothing new waits this much longer than the last (up to swarm.poll_max_seconds):
# a round waiting on transfers over a slow link must not spend the link on reading DHT records.
POLL_BACKOFF = 1.5
# An open round asks whether the others already merged it (a read of the round's votes) at most
# this often; it reads the ready records at every poll. Votes exist only once the round closed.
CLOSED_EVERY = 1.0
# A push from a sender no counted ready record names makes us read the rounds' ready records again
# at most this often: strangers pushing cost us a DHT read a second at most.
PUSHERS_READ_EVERY = 1.0
# While the coordinator's progress record lives, a round waits this many round timeouts past its
# grace for the coordinator's vote before the holders' votes decide it.
COORDINATOR_PATIENCE = 4


class MergeProtocol:
    """One peer's side of the merge rounds of a run; `model` holds this peer's W (and heads). It
    alone moves the peer's round: `sync` sets it from the state it downloads, the end of a round
    moves it to r + 1."""

    def __init__(self, dht, server, keys: RunKeys, identity: Identity, cfg: SwarmConfig, model: LTEModel,
                 holders: Callable[..., dict[int, str]], clock: Clock | None = None, round_: int = 0,
                 rounds_total: int | None = None, reachable: bool = True, reach: dict[str, float] | None = None,
                 fragments: int = 1):
        self.ctx = ctx = RoundContext(dht, server, keys, identity, cfg, model, holders, clock or Clock(), reachable,
                                      reach or {}, fragments, rounds_total)
        self.cfg, self.model, self.peer, self.authority = cfg, model, ctx.peer, ctx.authority
        self.parts, self.max_contribution_bytes = ctx.parts, ctx.max_contribution_bytes
        self.agreement = Agreement(ctx, rounds_total)
        self.collection = Collection(ctx, self.agreement.donors)
        self.state = StateTransfer(ctx, self.agreement, self.collection, round_)
        self.reduction = Reduction(ctx, self.collection)
        self.undoing = Undoing(ctx, self.collection)
        # round -> addresses its counted ready records push from; the transport's thread reads it
        self._pushers: dict[int, set[str]] = {}
        self._pushers_lock = threading.Lock()
        self._pushers_read = float("-inf")
        server.inbox.admits = self.admits_push

    def admits_push(self, sender: str) -> bool:
        """Whether `sender` (a libp2p peer id, which the transport authenticated) may push to us: a
        member that cannot be reached and says so in a ready record that counts (`Agreement.ready`:
        signed by the holder of every head it lists) for the round before ours, ours or the next,
        naming `sender` as its address. Anyone else's push costs us a refused stream. An unknown
        sender makes us read those rounds' records again, at most every PUSHERS_READ_EVERY seconds."""
        r = self.round
        rounds = (r - 1, r, r + 1)
        if self._pushes(sender, rounds):
            return True
        now = self.clock.monotonic()
        if now - self._pushers_read < PUSHERS_READ_EVERY:
            return False
        self._pushers_read = now
        for x in rounds:
            if x >= 0:
                self._note_pushers(x, self.agreement.ready(x))
        return self._pushes(sender, rounds)

    def _pushes(self, sender: str, rounds: tuple[int, ...]) -> bool:
        with self._pushers_lock:
            return any(sender in self._pushers.get(x, ()) for x in rounds)

    def _note_pushers(self, r: int, ready_set: dict[str, ReadyRecord]) -> None:
        """Remember who pushes in round r, from a ready set read anyway (the rounds' polls read
        it before any member pushes, so `admits_push` rarely reads it for a push)."""
        pushing = {rec.p2p for rec in ready_set.values() if rec.pushed is not None}
        with self._pushers_lock:
            self._pushers = {x: v for x, v in self._pushers.items() if x >= r - 2}
            self._pushers[r] = self._pushers.get(r, set()) | pushing

    # ---- what peer roles use ---------------------------------------------------------------
    @property
    def round(self) -> int:
        """The round of this peer's W: merge round `round` is the next one it takes part in."""
        return self.state.round

    @property
    def clock(self) -> Clock:
        return self.ctx.clock

    @property
    def keep_alive(self) -> Callable[[], None]:
        return self.ctx.keep_alive

    @keep_alive.setter
    def keep_alive(self, call: Callable[[], None]) -> None:
        self.ctx.keep_alive = call  # called while a round blocks (lease renewals)

    @property
    def adopt_holders_state(self) -> bool:
        return self.agreement.adopt_holders_state

    @adopt_holders_state.setter
    def adopt_holders_state(self, adopt: bool) -> None:
        self.agreement.adopt_holders_state = adopt

    @property
    def state_bytes_downloaded(self) -> int:
        return self.state.bytes_downloaded

    @property
    def dht_reads(self) -> int:
        return self.ctx.dht_reads

    def w_digest(self) -> str:
        return self.state.w_digest()

    def announce(self) -> None:
        self.state.announce()

    def sync(self, min_round: int = 0, replay: bool = True) -> bool:
        return self.state.sync(min_round, replay)

    def scope(self, r: int) -> RoundScope:
        """What merge round r merges (all of W, or one fragment's parts)."""
        return self.ctx.scope(r)

    def incumbents(self) -> dict[int, str]:
        return self.agreement.incumbents(self.state.round)

    def closed(self, r: int) -> bool:
        return self.agreement.closed(r)

    # ---- one round, step by step -------------------------------------------------------------
    def begin(self, contribution: bytes | None, ready: ReadyRecord | None) -> MergeRound:
        """Enter merge round `self.round` as a contributor (offering `contribution`), or as a
        follower when `contribution` is None."""
        ctx, r, start = self.ctx, self.state.round, self.clock.monotonic()
        mr = MergeRound(round=r, contribution=contribution, ready=ready, started=start,
                        deadline=start + self.cfg.round_timeout, scope=ctx.scope(r), reads_before=ctx.dht_reads)
        trusted = self.agreement.trusted_state()
        if trusted is not None and trusted[0] > r:
            log.warning("the swarm is at round %d, we are at %d: syncing instead of merging alone", trusted[0], r)
            mr.step = RoundStep.CATCHING_UP
            return mr
        if not ctx.is_authority and self.closed(r):
            # (The coordinator merges a round the holders merged without it all the same: they wait
            # for its word while its progress record lives, and it has nothing to catch up from.)
            log.warning("merge round %d closed before we were ready; catching up (our change waits for the next round)", r)
            mr.step = RoundStep.CATCHING_UP
            return mr
        mr.closed_asked = start
        if ctx.is_authority:
            self.agreement.publish_beacons(r)
        if contribution is not None and ready is not None:
            mr.ready = self.collection.offer(mr, contribution, ready)
            dht_io.store(ctx.dht, ctx.keys.ready(r), ctx.identity, mr.ready, ctx.expiration())
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

    def _poll_open(self, mr: MergeRound) -> None:
        r, now = mr.round, self.clock.monotonic()
        ready_set = self.agreement.ready(r)
        if not ready_set and now > mr.deadline:
            # An empty poll decides nothing: the few nodes it asked may lack the records, or be
            # placed by a stranger to answer empty. Giving up on the round asks all of them.
            ready_set = self.agreement.ready(r, thorough=True)
        self._note_pushers(r, ready_set)
        close = False
        if ready_set:
            if mr.first_ready_seen is None:  # our own clock decides, not the records' dates
                mr.first_ready_seen = now
            window = mr.first_ready_seen + self.agreement.close_window(ready_set)
            close = self.agreement.all_ready(ready_set) or (now > window and (
                self.agreement.quorum_ready(ready_set) or now > mr.first_ready_seen + self.cfg.round_timeout))
        elif now > mr.deadline:
            # Nobody's ready record counts, ours included (a lost head, a store that never made it):
            # the round is over for us without a merge; a contributor keeps its change.
            self._finish(mr, RoundResult(round=r, new_round=self.state.round, idle=mr.contribution is None,
                                         missed=mr.contribution is not None))
            return
        if close or self._closed_meanwhile(mr):
            mr.mark("closed", self.clock.monotonic())
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
            mr.ready_set = self.agreement.ready(r, thorough=True)  # the round's members
            mr.order = order(self.ctx, r)
            self._note_pushers(r, mr.ready_set)
            if mr.contribution is not None and self.peer not in mr.ready_set:  # our record never made it out
                log.warning("our ready record for round %d is not visible; merging without us", r)
            mr.waited = self.clock.monotonic() - mr.started
            mr.undo = self.undoing.load(mr)  # a contribution found not to reproduce, taken out again
            if not self.ctx.reachable and self.peer in mr.ready_set:
                self.collection.push(mr)
            mr.push_deadline = self.clock.monotonic() + self.cfg.request_timeout
        if self.collection.awaiting_pushes(mr) and self.clock.monotonic() < mr.push_deadline:
            return  # an unreachable member's blobs are still on their way to us
        mr.mark("settled", self.clock.monotonic())
        self.collection.forget(r)
        if plan.reduces(self.cfg, mr.ready_set):
            self._start_reducing(mr)
            return
        totals, members = gather(self.ctx, self.collection, mr)
        self._merge(mr, totals, members)

    def _start_reducing(self, mr: MergeRound) -> None:
        """Reduce the parts we own (`Reduction.start`), then collect the others' (REDUCING)."""
        mr.work = self.reduction.start(mr)
        # A coordinator that recomputes every part says whom it could fetch; with two owners per
        # part (whose records alone make the final set) that is waited for while it is up.
        mr.work.await_coordinator = (self.cfg.coordinator_recomputes and self.cfg.part_owners == 2
                                     and not self.ctx.is_authority and self._coordinator_up(mr))
        mr.mark("reduced_own", self.clock.monotonic())
        mr.step = RoundStep.REDUCING
        mr.deadline = mr.work.began + self.cfg.round_timeout / 2

    def _poll_reducing(self, mr: MergeRound) -> None:
        reduced = self.reduction.collect(mr)
        if reduced is None:
            return
        if reduced.totals is None:  # a contributor's part we cannot get: take the agreed W from others later
            mr.step, mr.deadline = RoundStep.CATCHING_UP, self.clock.monotonic() + self.cfg.round_timeout
            return
        mr.rejected = sorted(set(mr.work.members) - set(reduced.members))
        if self.ctx.is_authority and self.cfg.verify_rate > 0:  # what undoing one of them would take
            mr.shares = self.reduction.shares(mr, reduced.members)
        self._merge(mr, reduced.totals, reduced.members)

    def _merge(self, mr: MergeRound, totals: dict[str, torch.Tensor], members: list[str]) -> None:
        """Apply the merge to our W and vote for the result. A contributor that trains on while the
        round's bytes move (swarm.overlap) applies it only at the end of those steps
        (`apply_pending`), so that its heads train on the same W as in the simulation; it votes for
        the W it will then hold."""
        totals = self.undoing.taken_out(mr, totals)
        self.undoing.note(mr.round, totals)
        if self.cfg.overlap and mr.contribution is not None:
            mr.totals = totals
            mr.digest = self.model.digest_after(*split_totals(self.model, totals))
        else:
            with self.state.changing():
                apply_reduced(self.model, totals)
            mr.digest = self.model.state_digest()
        self._vote(mr, members)

    def _head_steps(self, mr: MergeRound, members: list[str]) -> int:
        """Head-steps of the agreed `members`' contributions, from the ready records we settled on,
        and those read again if some member's came after ours settled (we re-synced, or caught up)."""
        ready = mr.ready_set
        if not set(members) <= set(ready):
            ready = {**self.agreement.ready(mr.round), **ready}
        return sum(ready[p].head_steps for p in members if p in ready)

    def _coordinator_up(self, mr: MergeRound) -> bool:
        """Whether the coordinator is up and at this round (or finishing the one before), asked until
        it says so (by others: the coordinator itself waits for nobody's word). A poll that finds no
        progress record decides nothing (it asked a few of the nodes that may hold it), nor does a
        thorough read while a growing swarm's newcomers are nearer to the record's key than the
        nodes holding it (until the coordinator writes it again): a peer that took the coordinator
        for gone would agree on the holders' W without it."""
        if not mr.coordinator_up:
            progress = None if self.ctx.is_authority else (self.agreement.progress()
                                                            or self.agreement.progress(thorough=True))
            mr.coordinator_up = progress is not None and mr.round - 1 <= progress.round <= mr.round
        return mr.coordinator_up

    def _coordinator_awaited(self, mr: MergeRound, now: float) -> bool:
        """Past the grace, whether to wait on for the coordinator's vote: for a round's timeout, and
        beyond it (up to COORDINATOR_PATIENCE timeouts) while its progress record says it is up. A
        peer that merged on without a live coordinator's word could keep a W the coordinator then
        decides otherwise, and with it every peer that read its vote; only a coordinator that went
        silent (its record expires a few leases after it stopped) leaves the round to the holders."""
        if now <= mr.deadline + self.cfg.round_timeout:
            return True
        return (now <= mr.deadline + COORDINATOR_PATIENCE * self.cfg.round_timeout
                and self.agreement.progress() is not None)

    def apply_pending(self, mr: MergeRound) -> None:
        """Apply the merge of `mr` that was agreed while we trained on (see `_merge`); our W and
        round move on only now, so what we hand out is always a W of the round we say."""
        if not mr.pending:
            return
        mr.pending = False
        with self.state.changing():  # the round too: what read the version first saw W and round change
            apply_reduced(self.model, mr.totals)
            self.state.round = max(self.state.round, mr.round + 1)
        self.announce()

    def _vote(self, mr: MergeRound, members: list[str]) -> None:
        """Our W is merged (`mr.digest`): publish its digest with the contributors in it, then wait
        for the others'."""
        mr.members = members
        mr.mark("merged", self.clock.monotonic())
        self.agreement.vote(mr.round, mr.digest, mr.members)
        mr.step = RoundStep.VOTING
        mr.deadline = self.clock.monotonic() + self.cfg.merge_grace

    def _poll_voting(self, mr: MergeRound) -> None:
        """Wait until every contributor we merged (and the coordinator, if it is up) has published
        its digest, bounded by the grace; then take the agreed W: the coordinator's, else the one
        most holders hold (re-synced from one of them if it is not ours)."""
        r = mr.round
        votes = self.agreement.votes(r)
        mr.votes_seen = len(votes)
        if mr.awaited is None:
            mr.awaited = set(mr.members) | ({self.authority} if self._coordinator_up(mr) else set())
        # A member that has since left (its heads released) will not vote: waiting for it would
        # hold the round to its deadline, as at the end of a run when every volunteer leaves.
        awaited = mr.awaited & (self.agreement.voters() | {self.authority})
        now = self.clock.monotonic()
        # The coordinator's vote decides: while it is up, it is awaited for as long as a round may
        # take, not just the grace (a peer that gives up on a slow coordinator merges on alone).
        if not awaited <= set(votes) and (now <= mr.deadline or (
                self.authority in awaited - set(votes) and self._coordinator_awaited(mr, now))):
            return
        # Our own vote counts even if the DHT did not take it (then we only agree with ourselves).
        votes[self.peer] = HashRecord(round=r, digest=mr.digest, members=mr.members)
        if self.authority not in votes and not self.ctx.is_authority:
            # A coordinator past this round decided it: what it decided stands, never a majority
            # of what some holders said (other peers may have read other holders' votes).
            progress = self.agreement.progress()
            if progress is not None and progress.round > r:
                decided = self.agreement.decided(r, progress)
                if decided is None:
                    log.warning("round %d: the coordinator is at round %d and its decision on this round is out of "
                                "reach; catching up", r, progress.round)
                    mr.step, mr.deadline = RoundStep.CATCHING_UP, now + self.cfg.round_timeout
                    return
                votes[self.authority] = decided
        agreed = votes[self.authority] if self.authority in votes else agreed_vote(votes, mr.digest)
        mr.agreed_members = list(agreed.members)
        result = RoundResult(round=r, new_round=r + 1, rejected=mr.rejected, seconds_waiting=mr.waited,
                             reduced=mr.work is not None, raw_parts=len(mr.work.raw) if mr.work is not None else 0)
        if agreed.digest != mr.digest:
            log.warning("round %d: our W (%s, %d contributions) differs from the agreed one (%s, %d); re-syncing",
                        r, mr.digest[:10], len(mr.members), agreed.digest[:10], len(agreed.members))
            # While our W is still the round's own (the merge waits for our steps: swarm.overlap),
            # the agreed merge is fetched as a peer that missed the round would, not all of W.
            result.resynced = mr.totals is not None and self.state.replay((r + 1, agreed.digest), agreed)
            if result.resynced:
                mr.totals = None  # the agreed merge is in our W already
            else:
                donors = self.agreement.donors()
                addresses = [donors[who].p2p for who, v in sorted(votes.items())
                             if v.digest == agreed.digest and who in donors and who != self.peer]
                result.resynced = self.state.fetch(addresses, r + 1, agreed.digest)
            if not result.resynced:  # nobody handed it out: catch up with the swarm later
                log.warning("round %d: no peer handed out the agreed W; catching up", r)
                mr.step, mr.deadline = RoundStep.CATCHING_UP, self.clock.monotonic() + self.cfg.round_timeout
                return
        self.agreement.remember(r, agreed.members)
        result.members = list(agreed.members)
        result.merged = self.peer in agreed.members
        result.merged_head_steps = self._head_steps(mr, agreed.members)
        if mr.totals is not None and not result.resynced:
            mr.pending = True  # applied by the caller, at the end of its current steps
            result.digest = mr.digest
            self._finish(mr, result)
            return
        with self.state.changing():
            self.state.round = max(self.state.round, r + 1)
        result.new_round = self.state.round
        self._finish(mr, result)
        self.announce()

    def _poll_catching_up(self, mr: MergeRound) -> None:
        """We came too late for the round (or the swarm is ahead): take the trusted W from a peer
        that has it, keep our change. Our W is still the round's own unless we applied a merge to
        it that was not agreed: then only a downloaded W will do, not the round's parts added to ours."""
        if self.sync(min_round=mr.round + 1, replay=not (mr.digest and mr.totals is None)):
            result = RoundResult(round=mr.round, new_round=self.state.round, missed=True, resynced=True)
            if mr.agreed_members is not None:  # we merged, then failed to fetch the agreed W
                result.missed = False
                result.members = list(mr.agreed_members)
                result.merged = self.peer in mr.agreed_members
            elif mr.contribution is not None and (decided := self.agreement.decided(mr.round)) is not None:
                # we offered and the round was decided without our vote: counted as the swarm
                # counts it (carried on to the next round only if it was left out)
                result.members, result.merged = list(decided.members), self.peer in decided.members
                result.missed = not result.merged
                if result.merged:
                    result.merged_head_steps = self._head_steps(mr, decided.members)
            self._finish(mr, result)
            return
        if self.clock.monotonic() > mr.deadline:
            raise TransferError(f"no peer could hand out the agreed W of round {mr.round + 1} or later")
        mr.wait = max(self.cfg.poll_seconds, 0.5)

    def _finish(self, mr: MergeRound, result: RoundResult) -> None:
        elapsed = self.clock.monotonic() - mr.started
        result.digest = result.digest or self.model.state_digest()
        result.seconds_communicating = max(0.0, elapsed - result.seconds_waiting)
        mr.mark("done", self.clock.monotonic())
        result.phases = dict(mr.marks)
        result.dht_reads = self.ctx.dht_reads - mr.reads_before
        result.rolled_back = mr.rolled_back
        mr.step, mr.result, mr.wait = RoundStep.DONE, result, 0.0
