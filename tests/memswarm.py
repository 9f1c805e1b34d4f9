"""Whole swarms in one process: real trainers and a real coordinator on the in-memory network and a
fake clock, stepped in a fixed order by a discrete-event loop. Same inputs, same run: a failure
replays exactly, and a round of many peers takes milliseconds of real time."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from peers.coordinator import KEY_FILE, Coordinator, coordinator_identity
from peers.node import EventLog, Runtime, install_signing
from peers.trainer import Trainer, TrainerOptions
from swarm.clock import FakeClock
from swarm.config import RunConfig, parse_config
from swarm.errors import LTESwarmError, Stopped
from swarm.identity import Identity
from swarm.memnet import MemoryBlobServer, MemoryDHT, MemoryNetwork
from tests.conftest import ROOT

# Fast protocol timing on the fake clock (seconds of fake time).
MEM_SWARM = dict(lease_seconds=6.0, settle_seconds=0.5, merge_grace=3.0, round_timeout=20.0,
                 request_timeout=5.0, poll_seconds=0.1, checkpoint_every=2)


def tiny_config(*, heads: int = 2, merge_every: int = 2, rounds: int = 4, per_head: int = 4, **swarm) -> RunConfig:
    """The digits config shrunk to a model whose step takes about a millisecond."""
    raw = yaml.safe_load((ROOT / "configs" / "digits-vit-tiny.yaml").read_text())
    raw["model"]["args"].update(embed_dim=16, depth=1, num_heads=2)
    raw["lte"].update(heads=heads, merge_every=merge_every, rank=4, alpha=32)
    raw["train"].update(batch_size=per_head * heads, samples=per_head * heads * merge_every * rounds, eval_every=1,
                        warmup_steps=1)
    raw["data"]["shuffle_buffer"] = 64
    raw["swarm"] = {**MEM_SWARM, **swarm}
    return parse_config(raw, origin="tiny test config")


def with_protocol(cls, part: str | None = None) -> type[Trainer]:
    """A volunteer whose merge protocol is `cls` (a MergeProtocol that fails or attacks in a way
    a test names), or whose protocol's `part` (e.g. "reduction") is `cls`."""
    class Peer(Trainer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            target = self.protocol if part is None else getattr(self.protocol, part)
            target.__class__ = cls
    return Peer


class RecordingEvents(EventLog):
    """The event log, kept in memory for assertions."""

    def __init__(self):
        super().__init__(None)
        self.items: list[dict] = []

    def emit(self, event: str, **fields) -> None:
        self.items.append({"event": event, "time": None, **fields})

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.items if e["event"] == kind]

    def last(self, kind: str) -> dict:
        found = self.of(kind)
        assert found, f"no {kind} event in {[e['event'] for e in self.items]}"
        return found[-1]


@dataclass
class Node:
    name: str
    role: Trainer | Coordinator
    rt: Runtime
    events: RecordingEvents
    next_at: float = 0.0
    state: str = "running"  # running, finished, stopped, crashed
    error: BaseException | None = None
    extra: dict = field(default_factory=dict)


_IDENTITIES: dict[str, Identity] = {}


def named_identity(name: str) -> Identity:
    """The same key for the same name throughout a test session: two runs of a scenario (with and
    without an attack) then order contributions alike and can be compared bit for bit."""
    if name not in _IDENTITIES:
        _IDENTITIES[name] = Identity()
    return _IDENTITIES[name]


class MemorySwarm:
    def __init__(self, cfg: RunConfig, workdir: Path, clock: FakeClock | None = None):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.clock = clock or FakeClock()
        self.net = MemoryNetwork(self.clock)
        self.nodes: dict[str, Node] = {}
        self.run_id = ""
        self.steps = 0

    # ---- building the swarm ---------------------------------------------------------------
    def runtime(self, name: str, identity: Identity | None = None, reachable: bool = True
                ) -> tuple[Runtime, RecordingEvents]:
        dht = MemoryDHT(self.net, f"Qm{name}")
        events = RecordingEvents()

        def blob_server(namespace: str) -> MemoryBlobServer:
            server = MemoryBlobServer(self.net, dht.peer_id)
            server.unreachable = not reachable
            return server

        rt = Runtime(dht=dht, stop=threading.Event(), events=events, clock=self.clock, blob_server=blob_server,
                     identity=identity or named_identity(name), reachable=reachable)
        install_signing(dht, rt.identity)
        return rt, events

    def signing_dht(self, name: str, identity: Identity | None = None) -> tuple[MemoryDHT, Identity]:
        """A bare DHT node of the in-memory network that signs with `identity` (new if None): for
        tests that act on the DHT directly, as a stranger with a key of its own would."""
        identity = identity or Identity()
        dht = MemoryDHT(self.net, f"Qm{name}")
        install_signing(dht, identity)
        return dht, identity

    def coordinator_role(self) -> Coordinator:
        return next(n.role for n in self.nodes.values() if isinstance(n.role, Coordinator))

    def coordinator(self, name: str = "coordinator", run_dir: Path | None = None, **kw) -> Node:
        run_dir = Path(run_dir or self.workdir / "run")
        key = run_dir / KEY_FILE
        if not key.exists():  # the session's key for this name, so that runs compare bit for bit
            run_dir.mkdir(parents=True, exist_ok=True)
            key.write_bytes(named_identity(name).to_bytes())
        rt, events = self.runtime(name, identity=coordinator_identity(run_dir))
        role = Coordinator(self.cfg, run_dir, rt, run_id=kw.pop("run_id", "mem-run"), **kw)
        self.run_id = role.keys.run_id
        role.start()
        return self._add(Node(name, role, rt, events, next_at=self.clock.now()))

    def trainer(self, name: str, *, heads: int = 1, throttle: float = 0.05, data: str | None = None,
                role: type[Trainer] = Trainer, invite=None, reachable: bool = True) -> Node:
        """A volunteer; `reachable=False` puts it behind NAT: nobody can fetch from it."""
        from swarm.keys import RunKeys

        rt, events = self.runtime(name, reachable=reachable)
        role = role(self.cfg, RunKeys(self.run_id), rt,
                    TrainerOptions(heads=heads, throttle=throttle, data=data, invite=invite))
        return self._add(Node(name, role, rt, events, next_at=self.clock.now()))

    def _add(self, node: Node) -> Node:
        assert node.name not in self.nodes
        self.nodes[node.name] = node
        return node

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    # ---- failures ---------------------------------------------------------------------------
    def crash(self, name: str) -> None:
        """SIGKILL: the node stops at once; its blobs vanish, its DHT records stay until they expire."""
        node = self.nodes[name]
        node.role.server.crash()
        node.rt.dht.shutdown()
        node.state = "crashed"

    def stop(self, name: str) -> None:
        """SIGTERM: the stop event is set; the node unwinds at its next wait and leaves."""
        self.nodes[name].rt.stop.set()

    # ---- running ----------------------------------------------------------------------------
    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state == "running"]

    def run(self, until: Callable[["MemorySwarm"], bool] | None = None, max_seconds: float = 600.0,
            max_steps: int = 200_000) -> None:
        """Step nodes in order of their next wake-up (ties: order of creation) until `until` holds,
        every node has ended, or `max_seconds` of fake time passed (then fail)."""
        limit = self.clock.now() + max_seconds
        while (live := self.running()):
            if until is not None and until(self):
                return
            node = min(live, key=lambda n: n.next_at)
            if node.next_at > limit or self.steps >= max_steps:
                raise AssertionError(f"swarm still running after {max_seconds}s of fake time: "
                                     + ", ".join(f"{n.name}:{getattr(n.role, 'phase', '-')}" for n in live))
            self.clock.set(node.next_at)
            self.steps += 1
            self._step(node)
        if until is not None and not until(self):
            raise AssertionError("every node ended before the condition held")

    def _step(self, node: Node) -> None:
        role = node.role
        try:
            if node.rt.stop.is_set():
                raise Stopped()
            wait = role.step()
        except Stopped:
            role.close()
            node.state = "stopped"
            return
        except LTESwarmError as exc:  # the peer stops with one line saying why, as the CLI would
            role.close()
            node.state, node.error = "failed", exc
            return
        except Exception as exc:
            node.state, node.error = "failed", exc
            raise
        if role.finished:
            role.close()
            node.state = "finished"
            return
        node.next_at = self.clock.now() + max(wait, 1e-4)

    def digests(self, *names: str) -> dict[str, str]:
        names = names or tuple(self.nodes)
        return {n: self.nodes[n].role.model.state_digest() for n in names}


def run_swarm(cfg: RunConfig, workdir: Path, peers: int) -> MemorySwarm:
    """A coordinator and volunteers p0 .. p{peers-1}, run until the run ends."""
    swarm = MemorySwarm(cfg, workdir)
    swarm.coordinator()
    for i in range(peers):
        swarm.trainer(f"p{i}")
    swarm.run()
    return swarm
