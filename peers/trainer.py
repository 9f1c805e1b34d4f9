"""The volunteer's peer: hold heads, train them on its own data for T steps, merge, repeat.

The peer is a state machine (`PeerPhase`) advanced by `step()`, one bounded piece of work at a
time (one training step, one poll of a merge round, one lease settle), which returns how long to
wait before the next. `run()` loops it on real time; protocol tests drive many peers on a fake
clock in one process.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from peers.data import DataSource, ImageShape, is_shareable
from peers.models import create_lte_model, resolve_device
from peers.node import Runtime, SwarmError, join_rounds
from peers.training import HeadTrainer, stack_batches
from peers.verifier import Verifier
from peers.verify import Counted, RoundStart, rewind, snapshot
from swarm.config import RunConfig
from swarm.clock import run_steps
from swarm.errors import ConfigError
from swarm.keys import RunKeys
from swarm.rounds import MergeRound, RoundResult, RoundStep
from swarm.dht_io import publish_status
from swarm.schemas import InviteRecord, PeerPhase, PeerStatus, ReadyRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import encode_contribution

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0   # seconds between live status records while nothing changes
ROSTER_EVERY = 20.0  # seconds between copies of it in the run's list of peers (see `publish_status`)
BESIDE_WAIT = 1.0  # most seconds our steps wait, once done, for the poll running beside us to finish
CLOSE_WAIT = 5.0  # seconds a leaving peer waits for a poll running beside it
# A standby asks for a free head every this many leases: a head frees when its holder leaves (at
# once) or crashes (a lease later); a swarm of many standbys must not make the nodes that store
# the leases answer each of them every second.
STANDBY_LEASES = 0.5


@dataclass
class TrainerOptions:
    heads: int = 1
    data: str | None = None         # this peer's own data spec (default: the run's)
    device: str = "cpu"
    throttle: float = 0.0           # seconds to pause after every step
    sync_timeout: float = 60.0
    invite: InviteRecord | None = None  # admission to a closed run (`lte-swarm invite`)


class Trainer:
    def __init__(self, cfg: RunConfig, keys: RunKeys, rt: Runtime, opts: TrainerOptions):
        if not 1 <= opts.heads <= cfg.swarm.max_heads_per_peer:
            raise ConfigError(f"--heads {opts.heads}: this run lets a peer hold 1 to {cfg.swarm.max_heads_per_peer} heads "
                              "(swarm.max_heads_per_peer)")
        self.cfg, self.keys, self.rt, self.opts = cfg, keys, rt, opts
        self.dht, self.clock, self.events = rt.dht, rt.clock, rt.events
        self.peer = rt.peer
        self.device = resolve_device(opts.device)
        self.model = create_lte_model(cfg, [], self.device)
        self.server, self.leases, self.protocol, self.membership = join_rounds(
            rt, keys, cfg, self.model, holds_heads=True, invite=opts.invite)
        self.membership.check_member(rt.identity)
        self.membership.publish(rt.identity)  # before any claim, so that others admit our claims at once
        self.protocol.keep_alive = self._keep_leases
        data_cfg = cfg.data if opts.data is None else cfg.data.model_copy(update={"source": opts.data})
        if opts.data is None and not is_shareable(cfg.data.source):
            # The run's config comes from its coordinator: it must not pick files on our disk.
            raise ConfigError(f"this run trains on the local data {cfg.data.source!r}, and a peer never reads a "
                              "local path the run names: pass --data with your own copy of the data")
        # Whether we commit to what each head's round began from (`peers.verify`): only in a run
        # that redoes rounds (swarm.verify_rate), whose volunteers would otherwise copy, encode and
        # hash their heads' state every round for nobody; not with swarm.overlap, whose steps train
        # on a W that a merge changes midway; not on our own data (--data other than the run's),
        # which nobody else can redo: such work goes uncommitted, which a run may refuse
        # (swarm.accept_unverifiable).
        private = data_cfg.source != cfg.data.source
        self.commits = cfg.swarm.verify_rate > 0 and not cfg.swarm.overlap and not private
        if cfg.swarm.verify_rate > 0 and not cfg.swarm.accept_unverifiable:
            if private:
                raise ConfigError(f"run {keys.run_id} merges only work it can redo, on its own data "
                                  f"{cfg.data.source!r}: join without --data, or with --data {cfg.data.source!r}")
            if not rt.reachable:
                raise ConfigError(f"run {keys.run_id} merges only work it can redo, which is fetched from the peer "
                                  "that did it, and this peer joined with --client-mode (it cannot accept "
                                  "connections): join without it, from a host that accepts connections")
        self.source = DataSource(data_cfg, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
        # Standing by, we redo the rounds the coordinator gives us, on the run's data (ours is not)
        self.verifier = (Verifier(cfg, self.protocol.ctx, self.source, self.events, self.device)
                         if self.commits and cfg.swarm.verifiers > 0 else None)
        self.streams: dict[int, Counted] = {}
        # What the heads' unmerged work began from: committed to in our ready record, served to
        # whoever redoes the round.
        self.starts: dict[int, RoundStart] = {}
        self.starts_round = -1                  # the round whose W they began on
        self.head_trainer: HeadTrainer | None = None

        self.phase = PeerPhase.SYNCING
        self.finished = False
        self.sync_deadline = self.clock.monotonic() + opts.sync_timeout
        self.mr: MergeRound | None = None       # the merge round we are in, if any
        self.heads_changed = False              # a renewal found a lost head
        self.settle_at: float | None = None     # when our pending head claims can be read back
        self.step_in_round = 0                  # local steps done towards the current round
        self.round_losses: list[float] = []
        self.round_started = 0.0
        self.carry_over = False                 # missed a round with work in hand: offer it at once
        self.stale = False                      # stood by: our W may be rounds behind the swarm's
        self.last_merged_round = -1
        self.unmerged_steps = 0
        # swarm.overlap: the heads train on while a round's bytes move; its merge lands here and is
        # applied at the end of the current steps (`_land`).
        self.overlap = cfg.swarm.overlap
        self.landed: tuple[MergeRound, RoundResult] | None = None
        self.inflight_steps = 0                 # local steps in the contribution of the round in flight
        self.inflight_losses: list[float] = []  # ... and their losses (its round event reports them)
        self.poll_due = 0.0                     # monotonic: when the round in flight is next polled
        # ... and the poll now running beside our steps (`_poll_beside`), with whether the round
        # was reducing when it began
        self.polling: tuple[bool, Future] | None = None
        self._renewing = threading.Lock()       # a long round renews leases from its own thread too
        self.renewal: Future | None = None      # a lease renewal running beside our steps (`_renew_beside`)
        self.trained_head_steps = 0
        self.compute_seconds = 0.0              # in forward/backward (and batching) alone, all run long
        self.loss: float | None = None
        self.samples_per_second = 0.0
        self._status_at = self._roster_at = float("-inf")

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Step until the run ends or the peer is stopped (every wait ends at a stop request)."""
        if not run_steps(self.clock, self.step, lambda: self.finished):
            log.info("stopped in phase %s", self.phase.value)

    def step(self) -> float:
        """One bounded piece of work; returns the seconds to wait before the next. Expected
        network failures degrade: the round in hand is given up, its work carried to the next."""
        try:
            return self._step()
        except NETWORK_ERRORS as exc:
            log.warning("round %d: network trouble, retrying: %s", self.protocol.round, exc)
            self._drain("polling")  # the round is given up: nothing may advance it any more
            mr, self.mr = self.mr, None
            if mr is not None and mr.contribution is not None and self.overlap:
                merged = mr.agreed_members is not None and self.peer in mr.agreed_members
                self.landed = (mr, RoundResult(round=mr.round, new_round=self.protocol.round, merged=merged,
                                               missed=not merged))
            elif mr is not None and mr.contribution is not None:
                if mr.agreed_members is not None and self.peer in mr.agreed_members:
                    self._merged(mr)  # our change is in the agreed W even though we could not fetch it
                else:
                    self._missed()
                self.step_in_round, self.round_losses = 0, []
            return 1.0

    def _step(self) -> float:
        if self.peer in self.membership.revoked:  # nobody stores, serves or counts anything of ours now
            raise ConfigError(f"the coordinator of run {self.keys.run_id} revoked this peer's key {self.peer}; "
                              "it can no longer take part in the run")
        if self.phase is PeerPhase.SYNCING:
            return self._sync()
        if self.protocol.round >= self.cfg.rounds and self.mr is None and self.landed is None:
            self.finished = True
            return 0.0
        self._renew_beside()
        if self.mr is not None:
            if not self._overlapping():
                return self._poll_round()
            self._poll_beside()
            if self.mr is not None:  # still in flight; once our steps are done, wait for it
                if self.step_in_round >= self._round_steps():
                    if self.polling is None:
                        return max(0.0, self.poll_due - self.clock.monotonic())
                    self.clock.wait_for(self.polling[1], BESIDE_WAIT)  # woken by its end, not by a timer
                    return 0.0
                return self._train_step()
        if self.landed is not None:  # the round landed: train the rest of our steps, then apply it
            return self._train_step() if self.step_in_round < self._round_steps() else self._offer()
        if self.heads_changed:
            self.heads_changed = False
            self._adopt_heads()
        if self.settle_at is not None:  # head claims written: read them back once they settled
            if self.clock.monotonic() < self.settle_at:
                return self.settle_at - self.clock.monotonic()
            self.settle_at = None
            self._drain("renewal")
            self.leases.settle()
            self._adopt_heads()
        elif self.step_in_round == 0 and not self.carry_over and len(self.leases.held) < self.opts.heads:
            self._drain("renewal")
            if self.stale and self._run_over():  # a standby does not follow the rounds: it asks
                return 0.0
            if self.leases.propose(self.opts.heads - len(self.leases.held)):
                self.settle_at = self.clock.monotonic() + self.cfg.swarm.settle_seconds
                return self.cfg.swarm.settle_seconds
        if not self.model.head_ids:
            return self._stand_by()
        if self.stale:
            return self._catch_up()
        if self.protocol.round == 0 and len(self.leases.holders()) < self.cfg.swarm.min_heads:
            self._set_phase(PeerPhase.WAITING)
            return self.cfg.swarm.poll_seconds * 5
        if not self.carry_over and self.step_in_round < self._round_steps():
            return self._train_step()
        return self._offer()

    # ---- phases ------------------------------------------------------------------------------
    def _sync(self) -> float:
        """Join with the swarm's W, or (no head is free to train) stand by without it: W is
        fetched once a head is won (`_catch_up`)."""
        self._publish_status(force=True)
        if not self.leases.free_heads():
            self._joined()
            return self._stand_by()
        if self.protocol.sync():
            self._joined()
            self._set_phase(PeerPhase.STANDBY)
            return 0.0
        if self.clock.monotonic() > self.sync_deadline:
            raise SwarmError(f"no peer of run {self.keys.run_id} handed out W within {self.opts.sync_timeout:.0f}s")
        return 1.0

    def _joined(self) -> None:
        self.events.emit("joined", peer=self.peer, p2p=self.rt.p2p, round=self.protocol.round,
                         digest=self.model.state_digest(), downloaded=self.protocol.state_bytes_downloaded,
                         pid=os.getpid(), dht_pid=getattr(self.dht, "pid", None))

    def _stand_by(self) -> float:
        """No head is free: wait for one (each step asks the leases again) without following the
        rounds. Most volunteers of a large swarm stand by, and a standby that took every round's
        merge would cost the members' uplinks a round's parts each, for a W it may not train on for
        hours; its W goes stale instead, and is brought up to date once it wins a head
        (`_catch_up`: a round or two replayed, else downloaded). Before each claim it asks whether
        the run is over (`_run_over`): then it leaves with the W it has. In a run that redoes rounds
        it meanwhile does the checks the coordinator gives it (`peers.verifier`)."""
        if self.phase is not PeerPhase.STANDBY or not self.stale:
            self.stale = True
            self._set_phase(PeerPhase.STANDBY)
            self.events.emit("standby", round=self.protocol.round)
        self._publish_status()  # live in the list of peers: the coordinator picks verifiers from it
        if self.verifier is not None:
            self.verifier.poll()
        return self.cfg.swarm.lease_seconds * STANDBY_LEASES

    def _catch_up(self) -> float:
        """We won a head after standing by: take the swarm's W before training on it."""
        if self.protocol.sync(min_round=self.protocol.round):
            self.stale = False
            return 0.0
        if self._run_over():
            return 0.0
        log.warning("round %d: nobody handed out the swarm's W yet; trying again", self.protocol.round)
        return 1.0

    def _run_over(self) -> bool:
        """Whether the swarm's W is at the run's last round (as far as a standby can tell, which
        does not follow the rounds): then we are finished too."""
        trusted = self.protocol.agreement.trusted_state()
        self.finished = trusted is not None and trusted[0] >= self.cfg.rounds
        return self.finished

    def _overlapping(self) -> bool:
        """A contribution of ours is in a round whose merge is not applied yet (swarm.overlap)."""
        return self.overlap and ((self.mr is not None and self.mr.contribution is not None) or self.landed is not None)

    def _period(self) -> int:
        """The T steps we train: those of our W's round, or of the next one while a round is in flight."""
        return self.protocol.round + int(self._overlapping())

    def _round_steps(self) -> int:
        first = self._period() * self.cfg.lte.merge_every
        return max(0, min(self.cfg.lte.merge_every, self.cfg.steps - first))

    def _train_step(self) -> float:
        if self.step_in_round == 0:
            self.round_losses, self.round_started = [], self.clock.monotonic()
        self._set_phase(PeerPhase.TRAINING)
        global_step = self._period() * self.cfg.lte.merge_every + self.step_in_round
        if self.step_in_round == 0 and self.unmerged_steps == 0 and self.commits:
            steps = self._round_steps()
            self.starts = {h: snapshot(self.model, self.head_trainer.optimizer, h, global_step, self.streams[h].count,
                                       steps) for h in self.model.head_ids}
            self.starts_round = self.protocol.round
        began = self.clock.monotonic()
        x, y = stack_batches([self.streams[h] for h in self.model.head_ids], self.device)
        with self.model.lock:  # W and the shared parameters stay put for the whole step
            self.loss = self.head_trainer.step(x, y, global_step)
        self.compute_seconds += self.clock.monotonic() - began
        self.round_losses.append(self.loss)
        self.step_in_round += 1
        self.unmerged_steps += 1
        self.trained_head_steps += len(self.model.head_ids)
        elapsed = self.clock.monotonic() - self.round_started
        if elapsed > 0:
            self.samples_per_second = self.step_in_round * self.cfg.head_batch * len(self.model.head_ids) / elapsed
        self._publish_status()
        return self.opts.throttle

    def _land(self) -> None:
        """swarm.overlap, at the end of our steps: apply the merge that landed meanwhile (if one
        did), and move the heads' baselines past what it merged (or back, if it left us out)."""
        landed, self.landed = self.landed, None
        merged, targets = True, None
        if landed is not None:
            mr, result = landed
            targets = mr.scope.targets
            self.protocol.apply_pending(mr)
            merged = result.merged
            if merged:
                self.last_merged_round = mr.round
            else:
                self.unmerged_steps += self.inflight_steps  # offered again with the next contribution
        self.inflight_steps = 0
        self.model.settle_delayed(merged, self.model.head_ids, targets)

    def _offer(self) -> float:
        """Our T steps are done (or carried over from a missed round): enter the merge round."""
        if self.overlap:
            self._land()
            if self.heads_changed:
                self.heads_changed = False
                self._adopt_heads()
            if self._round_steps() == 0 or not self.model.head_ids:  # nothing more to train: the run is over
                return 0.0
        train_seconds = 0.0 if self.carry_over else self.clock.monotonic() - self.round_started
        self.carry_over = False
        heads = list(self.model.head_ids)
        blob = self.encode(heads)
        ready = ReadyRecord(round=self.protocol.round, heads=heads, head_steps=self.unmerged_steps * len(heads),
                            nbytes=len(blob), ready_at=self.clock.now(), train_seconds=train_seconds,
                            p2p=self.rt.p2p, starts=self._commit_starts(heads))
        self.events.emit("ready", round=self.protocol.round, heads=heads, nbytes=len(blob),
                         compute_seconds=self.compute_seconds)
        self.mr = self.protocol.begin(blob, ready)
        if self.overlap:  # train the next steps while this round's bytes move
            self.model.mark_sent(heads, self.mr.scope.targets)
            self.inflight_steps, self.unmerged_steps = self.unmerged_steps, 0
            self.inflight_losses, self.step_in_round, self.round_losses = self.round_losses, 0, []
            return 0.0
        self._set_phase(PeerPhase.MERGING)
        return 0.0

    def _commit_starts(self, heads: list[int]) -> list[str] | None:
        """Serve what each head's work in the coming round began from, and their digests for our
        ready record; None when the work is not one round's steps from a start we took (carried
        over from a missed round, heads changed, or a run that redoes no rounds)."""
        starts, r = [self.starts.get(h) for h in heads], self.protocol.round
        if (not self.commits or self.starts_round != r  # carried over: it trained on an older W
                or any(s is None or s.steps != self.unmerged_steps for s in starts)):
            return None
        for h, start in zip(heads, starts):  # encoded only if someone asks: most rounds are never drawn
            self.protocol.ctx.serve(r, self.keys.round_start_blob(r, self.peer, h), start.encode)
        return [start.digest() for start in starts]

    def _missed(self) -> None:
        """Our contribution missed its round: offer it again at once, or, in a run that merges
        only work it can redo (`swarm.accept_unverifiable` false; work carried over began on a W
        the swarm has left), take the heads back to where the round began, to train it again."""
        self.carry_over = False
        if self.unmerged_steps <= 0:
            return
        if self.cfg.swarm.accept_unverifiable:
            self.carry_over = True
            return
        for head in self.model.head_ids:
            if head in self.starts:
                rewind(self.model, self.head_trainer.optimizer, self.starts[head])
        unstarted = [h for h in self.model.head_ids if h not in self.starts]
        if unstarted:  # no start to go back to (adopted since): its change is dropped, its factors kept
            self.model.mark_merged(unstarted)
        log.info("round %d: our contribution missed it; training the heads' round again on the new W",
                 self.protocol.round)
        self.unmerged_steps, self.starts = 0, {}

    def _afresh(self) -> None:
        """The round rolled W back to before a cheat's rounds: our heads' factors and moments,
        trained on the W it poisoned, start afresh, as a newly claimed head does (our streams go on)."""
        heads = list(self.model.head_ids)
        self.head_trainer.set_heads([])
        self.head_trainer.set_heads(heads)
        self.unmerged_steps, self.carry_over, self.starts = 0, False, {}
        self.events.emit("afresh", round=self.protocol.round, heads=heads)
        log.info("round %d: W was rolled back; our heads %s start afresh", self.protocol.round, heads)

    def _merged(self, mr: MergeRound) -> None:
        """The contribution of `mr` is in the agreed W: its heads start over from there."""
        self.model.mark_merged(mr.ready.heads, mr.scope.targets)
        self.unmerged_steps = 0
        self.last_merged_round = mr.round

    def encode(self, heads: list[int]) -> bytes:
        """This peer's contribution to the coming round: the unmerged change of `heads` to what the
        round merges (all of W, or one fragment's parts)."""
        return encode_contribution(self.model, heads, dtype=self.cfg.swarm.contribution_dtype,
                                   targets=self.protocol.scope(self.protocol.round).targets)[0]

    def _poll_beside(self) -> None:
        """swarm.overlap: the round in flight advances one poll at a time in the background (its
        downloads take seconds on a home link) while we train; between steps we start the next poll
        when due and take in a finished one. The clock runs polls: a fake clock at once, in line."""
        if self.polling is None and self.clock.monotonic() >= self.poll_due:
            mr = self.mr
            self.polling = (mr.step is RoundStep.REDUCING, self.clock.background(lambda: self.protocol.poll(mr)))
        if self.polling is not None and self.polling[1].done():
            (reducing, future), self.polling = self.polling, None
            mr = self.mr
            self._polled(mr, reducing, future.result())  # raises what the poll raised
            self.poll_due = self.clock.monotonic() + (mr.wait if self.mr is not None else 0.0)

    def _drain(self, job: str, timeout: float | None = None) -> None:
        """Let go of the job running beside our steps under attribute `job`, once it ended (each of
        its DHT calls and transfers is bounded) or `timeout` passed: "renewal", a lease renewal,
        whose outcome (a lost head) is taken in as usual and whose error is raised; "polling", a
        round's poll, whose outcome is dropped (the round it advanced is given up)."""
        running = getattr(self, job)
        setattr(self, job, None)
        if running is None:
            return
        future = running[1] if job == "polling" else running
        if job == "renewal" and timeout is None:
            future.result()
        else:
            self.clock.wait_for(future, timeout)

    def _poll_round(self) -> float:
        mr = self.mr
        return self._polled(mr, mr.step is RoundStep.REDUCING, self.protocol.poll(mr))

    def _polled(self, mr: MergeRound, reducing: bool, result: RoundResult | None) -> float:
        """Take in what a poll of `mr` found (`reducing`: whether the round was reducing before)."""
        if result is None:
            if not reducing and mr.step is RoundStep.REDUCING:  # who the round's owners are, for the record
                self.events.emit("reducing", round=mr.round, members=sorted(mr.ready_set))
            return mr.wait
        self.mr = None
        if result.idle:
            return 0.0
        # The steps in this round's contribution: with overlap, those before it went out, not the
        # ones we train meanwhile
        losses = self.inflight_losses if self.overlap else self.round_losses
        steps = len(losses) if mr.contribution is not None else 0
        loss = sum(losses) / steps if steps else float("nan")
        if mr.contribution is not None and self.overlap:
            self.landed = (mr, result)  # applied at the end of the steps we are training (`_land`)
        elif mr.contribution is not None:
            if result.merged:
                self._merged(mr)
            elif result.missed:
                self._missed()
            self.step_in_round, self.round_losses = 0, []
        if result.rolled_back and self.model.head_ids:
            self._afresh()
        self._report(result, steps, loss, mr.ready.train_seconds if mr.ready is not None else 0.0)
        self._publish_status(force=True)
        return 0.0

    # ---- heads -------------------------------------------------------------------------------
    def _renew_beside(self) -> None:
        """Renew our leases when due. In the middle of our T steps the renewal (a DHT store and a
        read, each a round trip on a busy home link) runs beside them; anything else that touches
        the leases waits for it first (`_drain`). A fake clock runs it at once, in line."""
        if self.renewal is not None:
            if not self.renewal.done():
                return
            self._drain("renewal")  # raises what the renewal raised
        if (self.leases.due() and self.model.head_ids and self.step_in_round < self._round_steps()
                and self.settle_at is None and not self.heads_changed):
            self.renewal = self.clock.background(self._keep_leases)
        else:
            self._keep_leases()

    def _keep_leases(self) -> None:
        """Renew our leases when due (also from inside a long merge); adopt what changed."""
        if not self._renewing.acquire(blocking=False):
            return  # the other thread is renewing them (a round running beside our steps)
        try:
            self.membership.publish(self.rt.identity)
            if self.leases.due():
                if self.leases.renew():
                    self.heads_changed = True  # adopted between rounds, never under a running merge
                self.protocol.announce()
        finally:
            self._renewing.release()

    def _adopt_heads(self) -> None:
        self._drain("renewal")
        heads = sorted(self.leases.held)
        if heads == self.model.head_ids:
            return
        if self.unmerged_steps and set(heads) != set(self.model.head_ids):
            log.warning("head set changes from %s to %s; unmerged work of dropped heads is lost",
                        self.model.head_ids, heads)
        cfg = self.cfg
        if self.head_trainer is None:
            self.head_trainer = HeadTrainer(self.model, cfg.train, cfg.steps)
        self.head_trainer.set_heads(heads)  # kept heads keep their optimizer state
        self.streams = {h: self.streams.get(h) or Counted(self.source.batches(h, cfg.lte.heads, cfg.head_batch))
                        for h in heads}
        self.events.emit("heads", heads=heads)
        self._publish_status(force=True)  # the status view shows the new head set at once

    # ---- reporting ---------------------------------------------------------------------------
    def _set_phase(self, phase: PeerPhase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self._publish_status(force=True)

    def _publish_status(self, force: bool = False) -> None:
        """Our signed status record (rate-limited while nothing changes); never fails the peer."""
        now = self.clock.monotonic()
        if not force and now - self._status_at < STATUS_EVERY:
            return
        self._status_at = now
        listed = now - self._roster_at >= ROSTER_EVERY
        if listed:
            self._roster_at = now
        loss = float(self.loss) if self.loss is not None and math.isfinite(self.loss) else None
        record = PeerStatus(run_id=self.keys.run_id, peer=self.peer, state=self.phase, heads=list(self.model.head_ids),
                            round=self.protocol.round, step=self.step_in_round, last_merged_round=self.last_merged_round,
                            loss=loss, samples_per_second=float(self.samples_per_second),
                            bytes_sent=self.server.bytes_sent, bytes_received=self.server.bytes_received,
                            device=str(self.device), storage=self.cfg.lte.storage, digest=self.protocol.w_digest(),
                            time=float(self.clock.now()), verifies=self.verifier is not None)
        expiration = self.clock.now() + max(10.0, self.cfg.swarm.lease_seconds)
        try:  # not waited for: a training step never stalls on the DHT's answer to a status record
            publish_status(self.dht, self.keys, self.rt.identity, record, expiration,
                           roster_expiration=expiration + ROSTER_EVERY if listed else None, wait=False)
        except NETWORK_ERRORS as exc:
            log.debug("could not publish status: %s", exc)

    def _report(self, result: RoundResult, steps: int, loss: float, train_seconds: float) -> None:
        self.events.emit(
            "round", round=result.round, new_round=result.new_round, merged=result.merged, missed=result.missed,
            resynced=result.resynced, members=result.members, merged_head_steps=result.merged_head_steps,
            digest=result.digest, heads=list(self.model.head_ids), steps=steps, loss=loss,
            trained_head_steps=self.trained_head_steps, unmerged_steps=self.unmerged_steps,
            seconds_train=train_seconds, seconds_wait=result.seconds_waiting, seconds_comm=result.seconds_communicating,
            bytes_sent=self.server.bytes_sent, bytes_received=self.server.bytes_received, rejected=result.rejected,
            reduced=result.reduced, raw_parts=result.raw_parts, phases=result.phases,
            dht_reads=result.dht_reads)
        log.info("round %d -> %d: %s, loss %.3f, W %s", result.round, result.new_round,
                 "merged" if result.merged else ("missed" if result.missed else "not merged"), loss, result.digest[:10])

    def close(self) -> None:
        """Leave: release the heads (others may take them at once), stop serving blobs."""
        self._drain("polling", timeout=CLOSE_WAIT)  # a stopped poll ends at its next wait or transfer bound
        self._drain("renewal", timeout=CLOSE_WAIT)
        try:
            self.leases.release()
        finally:
            self.events.emit("left", peer=self.peer, round=self.protocol.round, digest=self.model.state_digest(),
                             trained_head_steps=self.trained_head_steps, unmerged_steps=self.unmerged_steps,
                             compute_seconds=self.compute_seconds, heads=list(self.model.head_ids))
            self.server.shutdown()


def serve_trainer(cfg: RunConfig, keys: RunKeys, rt: Runtime, opts: TrainerOptions) -> Trainer:
    """Run a volunteer's peer to the end of the run or a stop request; always leaves cleanly."""
    trainer = Trainer(cfg, keys, rt, opts)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer
