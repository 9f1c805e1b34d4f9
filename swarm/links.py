"""A model of home links for the discrete-event swarm: each node has an uplink, a downlink and a
latency; a transfer's bytes flow at the smaller of its sender's and receiver's fair shares (every
flow on a link gets an equal part of it), recomputed whenever a flow on either link starts or ends,
and it lands one round trip after its last byte left. What it leaves out: TCP's slow start and
losses, the core of the internet (never the bottleneck here), and max-min refinements (a flow held
back at one end does not hand its unused share at the other end to the rest)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from swarm.discrete import Completion, EventLoop

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Link:
    up: float  # bytes per second
    down: float  # bytes per second
    latency: float  # seconds, one way between the node and the internet's core


def home_link(rng: random.Random, down=(10.0, 300.0), up=(2.0, 50.0), latency=(0.010, 0.150)) -> Link:
    """A home link drawn log-uniformly from the given ranges (Mbit/s, Mbit/s, seconds of round trip
    to a typical peer); down and up drawn together, so a fast downlink tends to a fast uplink."""
    q = rng.random()

    def pick(lo: float, hi: float, at: float) -> float:
        return lo * (hi / lo) ** at
    jitter = min(1.0, max(0.0, q + rng.uniform(-0.2, 0.2)))
    return Link(up=pick(*up, jitter) * MBIT, down=pick(*down, q) * MBIT, latency=pick(*latency, rng.random()) / 2)


class _Flow:
    __slots__ = ("src", "dst", "remaining", "rate", "updated", "version", "done", "due")

    def __init__(self, src: str, dst: str, nbytes: float, now: float, done: Completion):
        self.src, self.dst, self.remaining, self.done = src, dst, float(nbytes), done
        self.rate, self.updated, self.version = 0.0, now, 0
        self.due: float | None = None  # when its pending wake-up is


class Links:
    """Every node's link, the flows on them, and the bytes each node sent and received by kind."""

    def __init__(self, loop: EventLoop):
        self.loop = loop
        self.links: dict[str, Link] = {}
        self._up: dict[str, set[_Flow]] = defaultdict(set)
        self._down: dict[str, set[_Flow]] = defaultdict(set)
        self.sent: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.received: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.requests: dict[str, int] = defaultdict(int)  # DHT requests each node answered

    def add(self, node: str, link: Link) -> None:
        self.links[node] = link

    def rtt(self, a: str, b: str) -> float:
        return 2 * (self.links[a].latency + self.links[b].latency)

    def send(self, src: str, dst: str, nbytes: float, kind: str, shared: bool = True) -> Completion:
        """Start moving `nbytes` from src to dst; done when the last byte landed. `shared=False`: a
        message small enough that its share of the links does not matter (a DHT request or answer):
        it takes its bytes at the slower end's whole rate and leaves the flows alone."""
        done = Completion(self.loop)
        self.sent[src][kind] += nbytes
        self.received[dst][kind] += nbytes
        now = self.loop.clock.t
        if src == dst or nbytes <= 0 or not shared:
            alone = 0.0 if src == dst else nbytes / min(self.links[src].up, self.links[dst].down)
            self.loop.call_at(now + (0.0 if src == dst else self.rtt(src, dst) + alone), done.finish)
            return done
        flow = _Flow(src, dst, nbytes, now, done)
        self._up[src].add(flow)
        self._down[dst].add(flow)
        self._rebalance(src, dst, now)
        return done

    def drop(self, node: str) -> None:
        """A node vanished: its flows end with an error at the other side."""
        now = self.loop.clock.t
        for flow in list(self._up.get(node, ())) + list(self._down.get(node, ())):
            self._end(flow, now)
            flow.done.finish(error=ConnectionError("the peer vanished mid-transfer"))

    # ---- fair shares ------------------------------------------------------------------------------
    def _share(self, flow: _Flow) -> float:
        up = self.links[flow.src].up / len(self._up[flow.src])
        down = self.links[flow.dst].down / len(self._down[flow.dst])
        return min(up, down)

    def _rebalance(self, src: str, dst: str, now: float) -> None:
        """New fair shares for the flows on src's uplink and dst's downlink. A flow keeps its
        pending wake-up when it will now land later (that wake-up finds it unfinished and sets
        another): a thousand flows on one link then cost a wake-up each, not one per change."""
        for flow in self._up[src] | self._down[dst]:
            self._progress(flow, now)
            flow.rate = self._share(flow)
            due = now + flow.remaining / flow.rate
            if flow.due is None or due < flow.due - 1e-9:
                self._wake(flow, due)

    @staticmethod
    def _progress(flow: _Flow, now: float) -> None:
        flow.remaining = max(0.0, flow.remaining - flow.rate * (now - flow.updated))
        flow.updated = now

    def _wake(self, flow: _Flow, due: float) -> None:
        flow.due, flow.version = due, flow.version + 1
        self.loop.call_at(due, lambda f=flow, v=flow.version: self._landed(f, v))

    def _landed(self, flow: _Flow, version: int) -> None:
        if version != flow.version or flow not in self._up[flow.src]:
            return  # replaced by an earlier wake-up, or dropped
        now = self.loop.clock.t
        self._progress(flow, now)
        if flow.remaining > 1e-6 * max(1.0, flow.rate):  # slowed down since: not there yet
            self._wake(flow, now + flow.remaining / flow.rate)
            return
        self._end(flow, now)
        self.loop.call_at(now + self.rtt(flow.src, flow.dst), flow.done.finish)

    def _end(self, flow: _Flow, now: float) -> None:
        self._up[flow.src].discard(flow)
        self._down[flow.dst].discard(flow)
        flow.version += 1
        self._rebalance(flow.src, flow.dst, now)

    def totals(self, node: str) -> tuple[dict[str, float], dict[str, float]]:
        return dict(self.sent.get(node, {})), dict(self.received.get(node, {}))
