"""The organiser's peer: creates (or resumes) a run, publishes it, follows every merge round as a
state donor, evaluates W and checkpoints it to the run dir."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from hivemind.utils import get_dht_time
from safetensors.torch import load_file, save_file

from peers.data import DataSource, ImageShape
from peers.models import create_lte_model
from peers.node import EventLog, add_run_validators, announce_run
from peers.simulate import evaluate
from swarm.config import RunConfig, parse_config
from swarm.errors import ConfigError
from swarm.keys import RunKeys, check_run_id
from swarm.leases import HeadLeases
from swarm.rounds import MergeProtocol
from swarm import schemas
from swarm.schemas import RoundSummary, RunProgress, RunRecord
from swarm.transport import NETWORK_ERRORS, BlobServer

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
RUN_FILE = "run.json"


def new_run_id(config_name: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in config_name)[:40].strip("-") or "run"
    return check_run_id(f"{stem}-{secrets.token_hex(3)}")


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path, dht, stop: threading.Event, events: EventLog,
                 run_id: str | None = None, config_name: str = "run", evaluate_rounds: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = create_lte_model(cfg, [])
        resumed = self._load_checkpoint(cfg)
        if resumed is not None:
            run_id, cfg, round_ = resumed
        else:
            run_id, round_ = run_id or new_run_id(config_name), 0
        self.cfg, self.dht, self.stop, self.events = cfg, dht, stop, events
        self.keys = RunKeys(run_id)
        self.peer = str(dht.peer_id)
        self.server = BlobServer(dht, namespace=run_id)
        sw = cfg.swarm
        # A read-only view of the leases (the coordinator holds no head): whom a round waits for.
        self.leases = HeadLeases(dht, self.keys, self.peer, cfg.lte.heads, sw.lease_seconds, sw.settle_seconds)
        self.protocol = MergeProtocol(dht, self.server, self.keys, self.peer, sw, self.model,
                                      active_peers=lambda: set(self.leases.holders().values()))
        self.protocol.round = round_
        self.record = RunRecord(run_id=run_id, config=cfg.model_dump(mode="json"), coordinator=self.peer, created=time.time())
        self.resumed = resumed is not None
        self.eval_set = None
        if evaluate_rounds:
            source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
            self.eval_set = source.eval_set()
        self._published_at = 0.0
        self.history: list[RoundSummary] = []
        self.signer = add_run_validators(dht, run_id)

    # ---- checkpoints -----------------------------------------------------------------------
    def _load_checkpoint(self, cfg: RunConfig) -> tuple[str, RunConfig, int] | None:
        meta_path, state_path = self.run_dir / RUN_FILE, self.run_dir / STATE_FILE
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            saved = parse_config(meta["config"], origin=str(meta_path))
            state = load_file(str(state_path))
            self.model.load_shared_state(state)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot resume from {self.run_dir}: {exc}; use another --run-dir") from None
        if saved.model != cfg.model or saved.lte != cfg.lte:
            raise ConfigError(f"{self.run_dir} holds a run of another model/LTE config; use another --run-dir")
        if self.model.state_digest() != meta.get("digest"):
            raise ConfigError(f"{state_path} does not match the digest in {meta_path}; the checkpoint is corrupt")
        log.info("resuming run %s at round %d from %s", meta["run_id"], meta["round"], self.run_dir)
        return meta["run_id"], saved, int(meta["round"])

    def checkpoint(self) -> None:
        """Write W and the round atomically (temp file, then rename): a crash never leaves half a file."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.shared_state().items()}
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(self.run_dir / STATE_FILE)
        meta = {"run_id": self.keys.run_id, "round": self.protocol.round, "digest": self.model.state_digest(),
                "config": self.cfg.model_dump(mode="json"), "saved": time.time()}
        tmp = self.run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.run_dir / RUN_FILE)
        self.events.emit("checkpoint", round=self.protocol.round, digest=meta["digest"])

    # ---- loop ------------------------------------------------------------------------------
    def publish(self) -> None:
        ttl = self.cfg.swarm.lease_seconds * 6
        announce_run(self.dht, self.keys, self.record, ttl=ttl)
        self.protocol.announce()
        progress = RunProgress(round=self.protocol.round, rounds_total=self.cfg.rounds,
                               samples=sum(h.samples for h in self.history), history=self.history[-200:])
        schemas.store(self.dht, self.keys.progress, "coordinator", progress, get_dht_time() + ttl)
        self._published_at = get_dht_time()

    def run(self) -> None:
        self.publish()
        if not self.resumed:
            self.checkpoint()
        self.events.emit("started", run_id=self.keys.run_id, round=self.protocol.round, digest=self.model.state_digest(),
                         pid=os.getpid())
        while not self.stop.is_set() and self.protocol.round < self.cfg.rounds:
            if get_dht_time() - self._published_at > self.cfg.swarm.lease_seconds:
                self.publish()
            try:
                result = self.protocol.merge(None, None)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: %s", self.protocol.round, exc)
                continue
            if result is None:
                continue
            fields = dict(round=result.round, new_round=result.new_round, members=result.members,
                          merged_head_steps=result.merged_head_steps, digest=result.digest, resynced=result.resynced,
                          missed=result.missed, rejected=result.rejected,
                          bytes_sent=self.server.bytes_sent, bytes_received=self.server.bytes_received)
            if self.eval_set is not None and (result.new_round % self.cfg.train.eval_every == 0
                                              or result.new_round >= self.cfg.rounds):
                acc, loss = evaluate(self.model.forward_merged, *self.eval_set, device=self.model.device)
                fields.update(accuracy=acc, loss=loss)
                log.info("round %d: test accuracy %.2f%%, loss %.3f", result.new_round, 100 * acc, loss)
            self.events.emit("round", **fields)
            samples = result.merged_head_steps * self.cfg.head_batch
            self.history.append(RoundSummary(round=result.new_round, time=time.time(), samples=samples,
                                             members=len(result.members), accuracy=fields.get("accuracy"),
                                             loss=fields.get("loss")))
            self.publish()
            if result.new_round % self.cfg.swarm.checkpoint_every == 0 or result.new_round >= self.cfg.rounds:
                self.checkpoint()
        self.checkpoint()
        # Stay a donor a little longer so peers finishing the last round can still fetch W.
        if not self.stop.is_set():
            self.stop.wait(self.cfg.swarm.merge_grace)

    def close(self) -> None:
        self.events.emit("left", round=self.protocol.round, digest=self.model.state_digest())
        self.server.shutdown()


def serve(cfg: RunConfig, run_dir: Path, *, initial_peers: list[str], host_maddrs: list[str] | None,
          identity_path: str | None, run_id: str | None, config_name: str, events_path: str | None,
          announce) -> None:
    """Start the DHT, create or resume the run, tell the caller how to join, follow rounds until
    the run ends or a signal arrives; always leave cleanly."""
    from peers.node import start_dht, stop_on_signals

    events = EventLog(events_path)
    with stop_on_signals() as stop:
        dht = start_dht(initial_peers, host_maddrs, identity_path)
        coordinator = None
        try:
            coordinator = Coordinator(cfg, run_dir, dht, stop, events, run_id=run_id, config_name=config_name)
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
            events.emit("maddrs", maddrs=maddrs, run_id=coordinator.keys.run_id)
            announce(coordinator.keys.run_id, maddrs, coordinator.protocol.round, coordinator.resumed)
            coordinator.run()
        finally:
            if coordinator is not None:
                coordinator.close()
            dht.shutdown()
            events.close()
