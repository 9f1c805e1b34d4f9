"""The volunteer's peer: hold heads, train them on its own data for T steps, merge, repeat."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from hivemind.utils import get_dht_time

from peers.data import DataSource, ImageShape
from peers.models import create_lte_model, resolve_device
from peers.node import EventLog, SwarmError, add_run_validators
from peers.simulate import head_loss, lr_factor, stack_batches
from swarm.config import RunConfig
from swarm.keys import RunKeys
from swarm.leases import HeadLeases
from swarm.lte_model import clip_head_grads_
from swarm.rounds import MergeProtocol
from swarm.schemas import ReadyRecord, publish_status
from swarm.transport import NETWORK_ERRORS, BlobServer
from swarm.wire import encode_contribution

log = logging.getLogger(__name__)


@dataclass
class TrainerOptions:
    heads: int = 1
    data: str | None = None         # this peer's own data spec (default: the run's)
    device: str = "cpu"
    throttle: float = 0.0           # seconds to pause after every step
    sync_timeout: float = 60.0


class Trainer:
    def __init__(self, cfg: RunConfig, keys: RunKeys, dht, opts: TrainerOptions, stop: threading.Event,
                 events: EventLog):
        self.cfg, self.keys, self.dht, self.opts, self.stop, self.events = cfg, keys, dht, opts, stop, events
        self.peer = str(dht.peer_id)
        self.device = resolve_device(opts.device)
        self.model = create_lte_model(cfg, [], self.device)
        self.server = BlobServer(dht, namespace=keys.run_id)
        sw = cfg.swarm
        self.leases = HeadLeases(dht, keys, self.peer, cfg.lte.heads, sw.lease_seconds, sw.settle_seconds)
        self.protocol = MergeProtocol(dht, self.server, keys, self.peer, sw, self.model,
                                      active_peers=lambda: set(self.leases.holders().values()))
        data_cfg = cfg.data if opts.data is None else cfg.data.model_copy(update={"source": opts.data})
        self.source = DataSource(data_cfg, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
        self.signer = add_run_validators(dht, keys.run_id)
        self.streams: dict[int, object] = {}
        self.last_merged_round = -1
        self.step_in_round = 0
        self.loss: float | None = None
        self.samples_per_second = 0.0
        self._status_at = 0.0
        self.optimizer: torch.optim.Optimizer | None = None
        self.unmerged_steps = 0
        self.trained_head_steps = 0
        self.carry_over = False

    # ---- heads -----------------------------------------------------------------------------
    def _adopt_heads(self) -> None:
        heads = sorted(self.leases.held)
        if heads == self.model.head_ids:
            return
        if self.unmerged_steps and set(heads) != set(self.model.head_ids):
            log.warning("head set changes from %s to %s; unmerged work of dropped heads is lost",
                        self.model.head_ids, heads)
        self.model.set_heads(heads)
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=self.cfg.train.lr,
                                           weight_decay=self.cfg.train.weight_decay) if heads else None
        n = self.cfg.lte.heads
        self.streams = {h: self.streams.get(h) or self.source.batches(h, n, self.cfg.head_batch) for h in heads}
        self.events.emit("heads", heads=heads)

    def _claim(self) -> None:
        missing = self.opts.heads - len(self.leases.held)
        if missing > 0:
            self.leases.claim(missing)
        self._adopt_heads()

    def _keep_leases(self) -> None:
        if self.leases.due():
            if self.leases.renew():
                self._adopt_heads()
            self.protocol.announce()

    # ---- status ----------------------------------------------------------------------------
    def status(self, state: str, force: bool = True) -> None:
        """Publish our signed status (rate-limited while training); never fails the peer."""
        now = time.monotonic()
        if not force and now - self._status_at < 2.0:
            return
        self._status_at = now
        record = dict(run_id=self.keys.run_id, peer=self.peer, state=state, heads=list(self.model.head_ids),
                      round=self.protocol.round, step=self.step_in_round, last_merged_round=self.last_merged_round,
                      loss=None if self.loss is None or self.loss != self.loss else float(self.loss),
                      samples_per_second=float(self.samples_per_second), bytes_sent=self.server.bytes_sent,
                      bytes_received=self.server.bytes_received, device=str(self.device),
                      storage=self.cfg.lte.storage, digest=self.model.state_digest(), time=float(time.time()))
        try:
            publish_status(self.dht, self.keys.peers, self.signer, record, ttl=max(10.0, self.cfg.swarm.lease_seconds))
        except NETWORK_ERRORS as exc:
            log.debug("could not publish status: %s", exc)

    # ---- training --------------------------------------------------------------------------
    def _train_round(self) -> tuple[int, float]:
        """Up to T local steps of every held head; returns (steps, mean loss)."""
        cfg = self.cfg
        first = self.protocol.round * cfg.lte.merge_every
        steps = min(cfg.lte.merge_every, cfg.steps - first)
        losses = []
        started = time.perf_counter()
        for i in range(steps):
            if self.stop.is_set():
                break
            self.step_in_round = i
            x, y = stack_batches([self.streams[h] for h in self.model.head_ids], self.device)
            loss, mean_loss = head_loss(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                clip_head_grads_(self.model.trainable_parameters(), cfg.train.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(first + i, cfg.steps, cfg.train)
            self.optimizer.step()
            losses.append(mean_loss.item())
            self.loss = losses[-1]
            self.samples_per_second = (i + 1) * self.cfg.head_batch * len(self.model.head_ids) / (time.perf_counter() - started)
            self._keep_leases()
            self.status("training", force=False)
            if self.opts.throttle:
                time.sleep(self.opts.throttle)
        done = len(losses)
        self.unmerged_steps += done
        self.trained_head_steps += done * len(self.model.head_ids)
        return done, sum(losses) / max(1, done)

    def run(self) -> None:
        deadline = time.monotonic() + self.opts.sync_timeout
        self.status("syncing")
        while not self.protocol.sync():
            if time.monotonic() > deadline or self.stop.is_set():
                raise SwarmError(f"no peer of run {self.keys.run_id} handed out W within {self.opts.sync_timeout:.0f}s")
            time.sleep(1.0)
        self.events.emit("joined", peer=self.peer, round=self.protocol.round, digest=self.model.state_digest(),
                         pid=os.getpid())
        while not self.stop.is_set() and self.protocol.round < self.cfg.rounds:
            try:
                self._claim()
                if not self.model.head_ids:  # standby: follow the rounds, take the next free head
                    self.events.emit("standby", round=self.protocol.round)
                    self.status("standby")
                    result = self.protocol.merge(None, None)
                    if result is not None:
                        self._report(result, 0, 0.0, 0.0)
                    continue
                if self.protocol.round == 0 and not self._enough_heads():
                    continue
                t0 = time.perf_counter()
                if self.carry_over:
                    # We missed the last round with T steps of work in hand: offer that work to
                    # this round at once instead of training more and risking missing it again.
                    steps, loss, self.carry_over = 0, float("nan"), False
                else:
                    steps, loss = self._train_round()
                train_seconds = time.perf_counter() - t0
                if self.stop.is_set():
                    break
                heads = list(self.model.head_ids)
                blob, _ = encode_contribution(self.model, heads)
                ready = ReadyRecord(round=self.protocol.round, heads=heads,
                                    head_steps=self.unmerged_steps * len(heads), nbytes=len(blob), ready_at=get_dht_time(),
                                    train_seconds=train_seconds)
                self.events.emit("ready", round=self.protocol.round, heads=heads, nbytes=len(blob))
                self.status("merging")
                result = self.protocol.merge(blob, ready)
                if result is None:
                    continue
                if result.merged:
                    self.model.mark_merged(heads)
                    self.unmerged_steps = 0
                    self.last_merged_round = result.round
                self.step_in_round = 0
                self.carry_over = result.missed and self.unmerged_steps > 0
                self._report(result, steps, loss, train_seconds)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: network trouble, retrying: %s", self.protocol.round, exc)
                time.sleep(1.0)

    def _enough_heads(self) -> bool:
        """Before the first round: wait (briefly, then ask again) until `swarm.min_heads` heads are held."""
        held = len(self.leases.holders())
        if held >= self.cfg.swarm.min_heads:
            return True
        self.status("waiting")
        self._keep_leases()
        self.stop.wait(self.cfg.swarm.poll_seconds * 5)
        return False

    def _report(self, result, steps: int, loss: float, train_seconds: float) -> None:
        self.events.emit(
            "round", round=result.round, new_round=result.new_round, merged=result.merged, missed=result.missed,
            resynced=result.resynced, members=result.members, merged_head_steps=result.merged_head_steps,
            digest=result.digest, heads=list(self.model.head_ids), steps=steps, loss=loss,
            trained_head_steps=self.trained_head_steps, unmerged_steps=self.unmerged_steps,
            seconds_train=train_seconds, seconds_wait=result.seconds_waiting, seconds_comm=result.seconds_communicating,
            bytes_sent=self.server.bytes_sent, bytes_received=self.server.bytes_received, rejected=result.rejected)
        log.info("round %d -> %d: %s, loss %.3f, W %s", result.round, result.new_round,
                 "merged" if result.merged else ("missed" if result.missed else "not merged"), loss, result.digest[:10])

    def close(self) -> None:
        self.leases.release()
        self.events.emit("left", peer=self.peer, round=self.protocol.round, digest=self.model.state_digest(),
                         trained_head_steps=self.trained_head_steps, unmerged_steps=self.unmerged_steps,
                         heads=list(self.model.head_ids))
        self.server.shutdown()
