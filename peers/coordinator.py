"""The organiser's peer: creates (or resumes) a run, publishes it, follows every merge round as a
state donor, evaluates W and checkpoints it to the run dir.

Like the trainer it is a state machine advanced by `step()`: it holds no head and follows each
round as a reader of the others' contributions."""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path

from peers.checkpoint import load_checkpoint, save_checkpoint
from peers.data import DataSource, ImageShape
from peers.models import create_lte_model
from peers.node import Runtime, announce_run, join_rounds
from peers.training import evaluate
from peers.verification import Verification
from swarm import dht_io
from swarm.config import RunConfig
from swarm.clock import run_steps
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.keys import RunKeys, make_run_id
from swarm.rounds import MergeRound, RoundResult
from swarm.rounds.undo import UNDO_DELAY
from swarm.schemas import DECISIONS_KEPT, HashRecord, RevocationRecord, RoundSummary, RunProgress, RunRecord
from swarm.transport import NETWORK_ERRORS

log = logging.getLogger(__name__)


KEY_FILE = "signing.key"  # the run's authority; not the P2P identity of --identity


REVOKED_FILE = "revoked.json"  # the members `lte-swarm revoke` took out of the run, a JSON list of fingerprints


def revoked_members(run_dir: Path) -> list[str]:
    """The fingerprints revoked in `run_dir` (none if the file is missing; a ConfigError if it is
    not a list of fingerprints)."""
    import json

    from swarm.identity import is_fingerprint

    path = Path(run_dir) / REVOKED_FILE
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); fix or remove it") from None
    if not isinstance(found, list) or not all(isinstance(f, str) and is_fingerprint(f) for f in found):
        raise ConfigError(f"{path} is not a list of key fingerprints; fix or remove it")
    return sorted(set(found))


def write_revoked(run_dir: Path, fingerprints) -> list[str]:
    """Make `fingerprints` the run dir's revoked members (what `revoked_members` reads); returns them sorted."""
    import json

    from swarm.identity import write_private

    revoked = sorted(set(fingerprints))
    write_private(Path(run_dir) / REVOKED_FILE, json.dumps(revoked, indent=1).encode())
    return revoked


def coordinator_identity(run_dir: Path) -> Identity:
    """The run's authority: the coordinator's signing key, kept in the run dir so that a resumed
    coordinator keeps its run id (which pins the key) and its authority."""
    return Identity.load_or_create(Path(run_dir) / KEY_FILE)


def new_run_id(stem: str, identity: Identity) -> str:
    return make_run_id(f"{stem}-{secrets.token_hex(2)}", identity.fingerprint)


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, rt: Runtime, run_id: str | None = None,
                 config_name: str = "run", evaluate_rounds: bool = True, adopt_swarm_state: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved = load_checkpoint(self.run_dir)
        self.history: list[RoundSummary] = []
        self.decisions: list[HashRecord] = []  # our votes on the latest rounds, repeated in the progress record
        if saved is not None:
            if saved.config.model != cfg.model or saved.config.lte != cfg.lte:
                raise ConfigError(f"{self.run_dir} holds a run of another model/LTE config; use another --run-dir")
            if RunKeys(saved.run_id).coordinator != rt.identity.fingerprint:
                raise ConfigError(f"{self.run_dir}/{KEY_FILE} is not the key of run {saved.run_id}; "
                                  "restore that file or use another --run-dir")
            log.info("resuming run %s at round %d from %s", saved.run_id, saved.round, self.run_dir)
            cfg, run_id, round_ = saved.config, saved.run_id, saved.round
            self.model, self.history = saved.model, saved.history
        else:
            run_id = make_run_id(run_id, rt.identity.fingerprint) if run_id else new_run_id(config_name, rt.identity)
            round_ = 0
            self.model = create_lte_model(cfg, [])
        self.cfg, self.rt, self.events, self.clock = cfg, rt, rt.events, rt.clock
        self.dht = rt.dht
        self.keys = RunKeys(run_id)
        self.peer = rt.peer
        # A read-only view of the leases (the coordinator holds no head): whom a round waits for.
        self.server, self.leases, self.protocol, self.membership = join_rounds(
            rt, self.keys, cfg, self.model, holds_heads=False, round_=round_)
        # A resumed coordinator may find the swarm went on without it: it takes what most lease
        # holders hold once it recomputed the rounds in between (or, if its operator says so,
        # unverified), then is the authority again.
        self.protocol.adopt_holders_state = saved is not None
        self.protocol.state.adopt_unverified = adopt_swarm_state
        # A round blocks for as long as its transfers take (recomputing every part waits on every
        # member's uplink); peers take a lapsed progress record for a coordinator that is gone and
        # decide the round without it, so the record is kept up between transfers too.
        self.protocol.keep_alive = self.keep_published
        self.record = RunRecord(run_id=run_id, config=cfg.model_dump(mode="json"), coordinator=self.peer,
                                created=float(self.clock.now()))
        self.resumed = saved is not None
        self.eval_set = None
        if evaluate_rounds:
            source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
            self.eval_set = source.eval_set()
        self.started = False
        self.finished = False
        self.mr: MergeRound | None = None
        self._published_at = float("-inf")
        self._linger_until: float | None = None
        self.revoked: list[str] = []
        self._revocations_stamp: int | None = None  # the revoked file's mtime when last published
        self.verification = Verification(cfg, self)  # swarm.verify_rate: redoing rounds, and what follows

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        save_checkpoint(self.run_dir, self.keys.run_id, self.protocol.round, self.cfg, self.model, self.history)
        self.events.emit("checkpoint", round=self.protocol.round, digest=self.model.state_digest())

    # ---- the loop ----------------------------------------------------------------------------
    def publish(self) -> None:
        """The run's record, our progress (peers take a lapsed one for a coordinator gone) and
        revocations. They outlive what may pass between two rewrites: a lease, and one download
        tried twice, which no keep-alive interrupts (`swarm.request_timeout` each)."""
        swarm = self.cfg.swarm
        life = max(6 * swarm.lease_seconds, 2 * swarm.lease_seconds + 2 * swarm.request_timeout)
        expiration = self.clock.now() + life
        announce_run(self.dht, self.keys, self.rt.identity, self.record, expiration)
        self.protocol.announce()
        progress = RunProgress(round=self.protocol.round, digest=self.model.state_digest(), rounds_total=self.cfg.rounds,
                               samples=sum(h.samples for h in self.history), history=self.history[-200:],
                               decisions=self.decisions[-DECISIONS_KEPT:])
        dht_io.store(self.dht, self.keys.progress, self.rt.identity, progress, expiration)
        self.publish_revocations(expiration)
        self._published_at = self.clock.now()

    def _revocations_changed(self) -> bool:
        """Whether the run dir's revoked members changed since we last published them."""
        try:
            stamp = (self.run_dir / REVOKED_FILE).stat().st_mtime_ns
        except OSError:
            stamp = None
        changed, self._revocations_stamp = stamp != self._revocations_stamp, stamp
        return changed

    def publish_revocations(self, expiration: float) -> None:
        """Keep the run dir's revoked members in the DHT, read afresh each time (`lte-swarm
        revoke` adds to it while the run goes on); a file gone bad keeps the last good list."""
        try:
            self.revoked = revoked_members(self.run_dir)
        except ConfigError as exc:
            log.warning("%s", exc)
        if self.revoked:
            dht_io.store(self.dht, self.keys.revocations, self.rt.identity,
                         RevocationRecord(revoked=self.revoked[-4096:]), expiration)

    def start(self) -> None:
        self.publish()
        if not self.resumed:
            self.checkpoint()
        self.events.emit("started", run_id=self.keys.run_id, peer=self.peer, p2p=self.rt.p2p, round=self.protocol.round,
                         digest=self.model.state_digest(), pid=os.getpid(), dht_pid=getattr(self.dht, "pid", None))
        self.started = True

    def run(self) -> None:
        """Step until the run ends or a stop request (every wait ends at one)."""
        if not run_steps(self.clock, self.step, lambda: self.finished):
            log.info("stopped at round %d", self.protocol.round)

    def step(self) -> float:
        """One bounded piece of work; returns the seconds to wait before the next."""
        try:
            return self._step()
        except NETWORK_ERRORS as exc:
            log.warning("round %d: %s", self.protocol.round, exc)
            self.mr = None
            return 1.0

    def _publish_due(self) -> bool:
        return self.clock.now() - self._published_at > self.cfg.swarm.lease_seconds

    def keep_published(self) -> None:
        if self.started and self._publish_due():
            try:
                self.publish()
            except NETWORK_ERRORS as exc:
                log.debug("could not publish our progress: %s", exc)

    def _step(self) -> float:
        if not self.started:
            self.start()
        if self._publish_due() or self._revocations_changed():
            self.publish()
        self.membership.publish(self.rt.identity)  # where the members reach us (a closed run serves only them)
        if self.mr is None and self.protocol.round >= self.cfg.rounds:
            return self._linger()
        if self.mr is None:
            self.mr = self.protocol.begin(None, None)
            self.verification.begin(self.mr.round)
        result = self.protocol.poll(self.mr)
        if result is None:
            return self.mr.wait
        shares, self.mr = self.mr.shares, None
        if not result.idle:
            if not result.missed:  # it merged a round itself: the authority again (it chases the holders till then)
                self.protocol.adopt_holders_state = False
            self._record(result)
            self._verify(result, shares)
        return 0.0

    # ---- redoing rounds ----------------------------------------------------------------------
    def _verify(self, result: RoundResult, shares: dict[str, dict]) -> None:
        """Redo a share of the heads merged in `result`'s round, or give them to spare volunteers
        to redo (`peers.verification`), and act on the verdicts in: a contribution that does not
        reproduce has consequences before the next round begins: all its writer added in the
        rounds no verdict passed is taken out again UNDO_DELAY rounds on by every peer
        (`swarm.rounds.undo`), and its key is revoked, so that its heads go to others, who start
        them afresh; a verifier that lied is revoked too."""
        failed, liars = self.verification.after(result, shares)
        if failed:
            taken, total, rollback = self.verification.take_out(failed, result.round)
            if taken:
                self.protocol.undoing.schedule(result.round + UNDO_DELAY, taken, total, rollback)
                self.events.emit("undo", round=result.round, at=result.round + UNDO_DELAY,
                                 writers=[u.writer for u in taken], rounds=[u.rounds for u in taken],
                                 rollback=None if rollback is None else [rollback.first, rollback.last])
        if failed or liars:
            self._revoke([*failed, *liars])

    def _revoke(self, writers: list[str]) -> None:
        """Revoke `writers`' keys: in the run dir (so that a resumed run keeps them out), for our
        own reads at once, and in the DHT for everyone's."""
        write_revoked(self.run_dir, {*self.revoked, *writers})
        self.membership.revoked |= set(writers)
        self._revocations_changed()
        self.publish_revocations(self.clock.now() + max(6 * self.cfg.swarm.lease_seconds, 3 * self.cfg.swarm.round_timeout))

    def _linger(self) -> float:
        """The run is over: checkpoint, then stay a donor so peers finishing the last round can
        still fetch the agreed W (until the last of them left, at most a round's timeout)."""
        if self._linger_until is None:
            self.checkpoint()
            self._linger_until = self.clock.monotonic() + self.cfg.swarm.round_timeout
        remaining = self._linger_until - self.clock.monotonic()
        if remaining <= 0 or not self.leases.holders():
            self.finished = True
            return 0.0
        return min(remaining, self.cfg.swarm.poll_seconds * 5)

    def _record(self, result: RoundResult) -> None:
        fields = dict(round=result.round, new_round=result.new_round, members=result.members,
                      merged_head_steps=result.merged_head_steps, digest=result.digest, resynced=result.resynced,
                      missed=result.missed, rejected=result.rejected,
                      bytes_sent=self.server.bytes_sent, bytes_received=self.server.bytes_received, phases=result.phases,
                      dht_reads=result.dht_reads)
        if self.eval_set is not None and (result.new_round % self.cfg.train.eval_every == 0
                                          or result.new_round >= self.cfg.rounds):
            acc, loss = evaluate(self.model.forward_merged, *self.eval_set, device=self.model.device)
            fields.update(accuracy=acc, loss=loss if math.isfinite(loss) else None)
            log.info("round %d: test accuracy %.2f%%, loss %s", result.new_round, 100 * acc, fields["loss"])
        self.events.emit("round", **fields)
        samples = result.merged_head_steps * self.cfg.head_batch
        self.history.append(RoundSummary(round=result.new_round, time=float(self.clock.now()), samples=samples,
                                         members=len(result.members), accuracy=fields.get("accuracy"),
                                         loss=fields.get("loss")))
        if result.new_round == result.round + 1 and result.digest:
            self.decisions = [*self.decisions[-(DECISIONS_KEPT - 1):],
                              HashRecord(round=result.round, digest=result.digest, members=sorted(result.members))]
        self.publish()
        if result.new_round % self.cfg.swarm.checkpoint_every == 0 and result.new_round < self.cfg.rounds:
            self.checkpoint()

    def close(self) -> None:
        """Leave: a last checkpoint (the round we reached survives a Ctrl+C), stop serving."""
        try:
            if self.started:
                self.checkpoint()
        finally:
            self.events.emit("left", round=self.protocol.round, digest=self.model.state_digest())
            self.server.shutdown()


def serve(cfg: RunConfig, run_dir: Path, *, initial_peers: list[str], host_maddrs: list[str] | None,
          identity_path: str | None, run_id: str | None, config_name: str, events_path: str | None,
          announce, adopt_swarm_state: bool = False) -> None:
    """Start the DHT, create or resume the run, tell the caller how to join, follow rounds until
    the run ends or a signal arrives; always leave cleanly."""
    from peers.node import open_runtime

    with open_runtime(initial_peers, host_maddrs, identity_path, events_path,
                      identity=coordinator_identity(run_dir)) as rt:
        coordinator = Coordinator(cfg, run_dir, rt, run_id=run_id, config_name=config_name,
                                  adopt_swarm_state=adopt_swarm_state)
        try:
            maddrs = [str(m) for m in rt.dht.get_visible_maddrs()]
            rt.events.emit("maddrs", maddrs=maddrs, run_id=coordinator.keys.run_id)
            announce(coordinator.keys.run_id, maddrs, coordinator.protocol.round, coordinator.resumed)
            coordinator.run()
        finally:
            coordinator.close()
