"""A swarm of many volunteers on a modelled internet, in one process: the real coordinator, real
trainers and the real round code, on the discrete-event clock (`swarm.discrete`) and the modelled
network (`swarm.simnet`, `swarm.links`). Home links, heavy-tailed compute, NAT, late joiners and
churn are drawn from one seed, so a scenario replays exactly.

The model trained is tiny (each step takes about a millisecond of real time); a step takes the
volunteer's drawn compute time in fake time, and every blob's bytes are scaled to what the wire
config's model would send, so the links see the chosen model's sizes while the arithmetic stays
cheap. What the figures mean is in `docs/benchmarks.md`, section "A thousand volunteers"."""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peers.coordinator import KEY_FILE, Coordinator
from peers.models import create_lte_model
from peers.node import EventLog, Runtime, install_signing
from peers.trainer import Trainer, TrainerOptions
from swarm.config import RunConfig, load_config, parse_config, parse_overrides
from swarm.discrete import EventClock
from swarm.errors import ConfigError, Stopped
from swarm.identity import Identity
from swarm.keys import RunKeys
from swarm.links import MBIT, Link, Links, home_link
from swarm.simnet import SimBlobServer, SimDHT, SimNetwork
from swarm.wire import encode_contribution, encode_state

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SERVER_LATENCY = 0.005  # seconds, one way: the coordinator's server


@dataclass
class Scenario:
    """What is drawn and how: every field has a command-line flag in `scripts/simulate_swarm.py`."""

    volunteers: int = 32
    rounds: int = 8
    seed: int = 0
    wire_config: Path = CONFIGS / "vit-s32-imagenet100.yaml"  # its lte and swarm sections, its model's sizes
    step_seconds: float = 0.2  # median seconds of one local step (ViT-S/32, batch 128, a modest GPU)
    step_spread: float = 0.5  # sigma of the log-normal around it: a tail of stragglers
    churn_per_hour: float = 0.3  # fraction of volunteers leaving per hour (each replaced by a newcomer)
    crash_share: float = 0.5  # of those leaving, the share that crash without a word
    nat_share: float = 0.2  # volunteers behind NAT (client mode)
    join_spread: float = 60.0  # seconds over which the first volunteers arrive
    rejoin_seconds: float = 120.0  # mean seconds until a leaver's replacement arrives
    max_hours: float = 6.0  # fake time after which the run is cut short
    sets: list[str] = field(default_factory=list)  # --set overrides of the simulated run's config
    wire: RunConfig | None = None  # the run itself, in place of `wire_config`
    link_mbit: float | None = None  # every volunteer on this link each way (no latency to speak of) instead of home links
    coordinator_mbit: float = 1000.0
    exact: bool = False  # train the wire config's model itself (small models only: every step is real)


@dataclass
class Volunteer:
    name: str
    role: Trainer | Coordinator
    rt: Runtime
    step_seconds: float
    joined: float
    events: list = field(default_factory=list)
    left: float | None = None
    how: str = "running"  # running, finished, stopped, crashed, failed
    error: str | None = None
    train_seconds: float = 0.0
    head_seconds: float = 0.0


class _Events(EventLog):
    def __init__(self, clock: EventClock, into: list):
        super().__init__(None)
        self.clock, self.into = clock, into

    def emit(self, event: str, **fields) -> None:
        self.into.append({"event": event, "time": self.clock.t, **fields})


def simulated_config(sc: Scenario, wire: RunConfig) -> RunConfig:
    """The digits ViT shrunk to a millisecond step, with the wire config's heads, T, merge and
    protocol timings."""
    raw = yaml.safe_load((CONFIGS / "digits-vit-tiny.yaml").read_text())
    raw["model"]["args"].update(embed_dim=16, depth=1, num_heads=2)
    # heads and T set on the command line size the run's samples as the wire config's would
    wire = wire.with_overrides(parse_overrides([s for s in sc.sets if s.startswith("lte.")]))
    lte = wire.lte.model_dump()
    raw["lte"].update({k: lte[k] for k in ("heads", "merge_every", "variant", "fragments", "eager")
                       if k in lte}, rank=4)
    per_head = 4
    raw["train"].update(batch_size=per_head * wire.lte.heads, eval_every=max(1, sc.rounds),
                        samples=per_head * wire.lte.heads * wire.lte.merge_every * sc.rounds, warmup_steps=1)
    raw["data"]["shuffle_buffer"] = 64
    raw["swarm"] = wire.swarm.model_dump(exclude_unset=True)
    return parse_config(raw, origin="simulated run").with_overrides(parse_overrides(sc.sets))


def wire_scales(sim: RunConfig, wire: RunConfig) -> dict[str, float]:
    """How many bytes the wire config's model sends for each byte of the simulated one's: W (and
    its reduced parts, as large as W) and a head's contribution, at the run's precisions."""
    def sizes(cfg: RunConfig) -> tuple[int, int]:
        model = create_lte_model(cfg, [0])
        contribution = encode_contribution(model, [0], dtype=sim.swarm.contribution_dtype)[0]
        return len(encode_state(model, 0)), len(contribution)
    w_sim, c_sim = sizes(sim)
    w_wire, c_wire = sizes(wire)
    return {"state": w_wire / w_sim, "reduced": w_wire / w_sim, "contribution": c_wire / c_sim}


class SwarmSimulation:
    def __init__(self, sc: Scenario, workdir: Path, scales: dict[str, float] | None = None):
        self.sc, self.workdir = sc, Path(workdir)
        self.rng = random.Random(sc.seed)
        wire = sc.wire or load_config(sc.wire_config)
        if sc.exact:  # the wire config's own model trains: every byte is its own, nothing scaled
            self.cfg, self.scales = wire.with_overrides(parse_overrides(sc.sets)), {}
        else:
            self.cfg = simulated_config(sc, wire)
            self.scales = scales if scales is not None else wire_scales(self.cfg, wire)
        self.clock = EventClock()
        self.loop = self.clock.loop
        self.links = Links(self.loop)
        self.net = SimNetwork(self.clock, self.links, self.scales, seed=sc.seed)
        self.nodes: dict[str, Volunteer] = {}
        self.coordinator: Volunteer | None = None
        self.count = 0
        self.start = self.clock.t

    # ---- nodes ---------------------------------------------------------------------------------
    def _identity(self) -> Identity:
        return Identity(Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32)))

    def _runtime(self, name: str, identity: Identity, link: Link, reachable: bool, into: list) -> Runtime:
        dht = SimDHT(self.net, f"Qm{name}")
        peer = str(dht.peer_id)
        self.links.add(peer, link)
        self.net.join(peer, reachable)

        def blob_server(namespace: str) -> SimBlobServer:
            server = SimBlobServer(self.net, peer)
            server.unreachable = not reachable
            return server
        rt = Runtime(dht=dht, stop=threading.Event(), events=_Events(self.clock, into), clock=self.clock,
                     blob_server=blob_server, identity=identity, reachable=reachable)
        install_signing(dht, identity)
        return rt

    def _launch(self, node: Volunteer) -> None:
        def main() -> None:
            role, clock = node.role, self.clock
            try:
                if isinstance(role, Coordinator):
                    role.start()
                while not role.finished:
                    if node.rt.stop.is_set():
                        raise Stopped()
                    before, held, t0 = getattr(role, "trained_head_steps", 0), self._holds(role), clock.t
                    wait = role.step()
                    if getattr(role, "trained_head_steps", 0) > before:
                        node.train_seconds += node.step_seconds
                    if role.finished:
                        break
                    clock.sleep(max(wait, 1e-4))
                    if held:
                        node.head_seconds += clock.t - t0
                node.how = "finished"
            except Stopped:
                node.how = "stopped"
            except ConfigError as exc:
                node.how, node.error = "failed", str(exc)
            except Exception as exc:  # a bug: kept for the report, the swarm goes on
                node.how, node.error = "failed", f"{type(exc).__name__}: {exc}"
            node.left = clock.t
            role.close()
        self.loop.spawn(main, name=node.name, owner=node.name)

    @staticmethod
    def _holds(role) -> bool:
        return isinstance(role, Trainer) and bool(role.model.head_ids)

    def _as_wire_model(self, role: Trainer | Coordinator) -> Trainer | Coordinator:
        """A peer that waits for its downloads as a peer of the wire config's model would: their
        bytes on the wire are scaled, so must the time they are given be."""
        role.protocol.ctx.wire_scale = dict(self.scales)
        return role

    def add_coordinator(self) -> Volunteer:
        run_dir = self.workdir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        identity = self._identity()
        (run_dir / KEY_FILE).write_bytes(identity.to_bytes())
        events: list = []
        link = Link(up=self.sc.coordinator_mbit * MBIT, down=self.sc.coordinator_mbit * MBIT, latency=SERVER_LATENCY)
        rt = self._runtime("coordinator", identity, link, True, events)
        role = self._as_wire_model(Coordinator(self.cfg, run_dir, rt, run_id="sim-run"))
        node = Volunteer("coordinator", role, rt, 0.0, self.clock.t, events)
        self.coordinator = self.nodes[node.name] = node
        self._launch(node)
        return node

    def add_volunteer(self) -> None:
        name = f"v{self.count}"
        self.count += 1
        mbit = self.sc.link_mbit
        link = home_link(self.rng) if mbit is None else Link(up=mbit * MBIT, down=mbit * MBIT, latency=0.0005)
        reachable = self.rng.random() >= self.sc.nat_share
        step = self.sc.step_seconds * math.exp(self.rng.gauss(0.0, self.sc.step_spread))
        events: list = []
        rt = self._runtime(name, self._identity(), link, reachable, events)
        role = self._as_wire_model(Trainer(self.cfg, RunKeys(self.coordinator.role.keys.run_id), rt,
                                           TrainerOptions(heads=1, throttle=step, sync_timeout=3600.0)))
        node = self.nodes[name] = Volunteer(name, role, rt, step, self.clock.t, events)
        self._launch(node)
        if self.sc.churn_per_hour > 0:
            rate = -math.log(1 - min(self.sc.churn_per_hour, 0.999)) / 3600
            self.loop.call_at(self.clock.t + self.rng.expovariate(rate), lambda: self._depart(name))

    def _depart(self, name: str) -> None:
        node = self.nodes[name]
        if node.how != "running" or self.coordinator.how != "running":
            return
        if self.rng.random() < self.sc.crash_share:  # SIGKILL: nothing of it runs again
            self.loop.kill(name)
            node.how, node.left = "crashed", self.clock.t
            node.role.server.crash()
            node.rt.dht.shutdown()
            self.net.leave(str(node.rt.dht.peer_id))
        else:
            node.rt.stop.set()
        self.loop.call_at(self.clock.t + self.rng.expovariate(1 / self.sc.rejoin_seconds), self.add_volunteer)

    # ---- running ----------------------------------------------------------------------------------
    def run(self, real_seconds: float = 600.0, progress: Callable[[str], None] | None = None) -> dict:
        """Until the run's last round, `max_hours` of fake time or `real_seconds` of real time
        (Ctrl+C too: the figures of what was reached come back either way)."""
        began = time.monotonic()
        self.add_coordinator()
        for i in range(self.sc.volunteers):
            self.loop.call_at(self.start + self.sc.join_spread * i / max(1, self.sc.volunteers), self.add_volunteer)
        limit = self.start + self.sc.max_hours * 3600
        cut, told = None, 0
        try:
            while self.coordinator.how == "running" and self.clock.t < limit:
                self.loop.run(until=min(limit, self.clock.t + 5.0))
                rounds = [e for e in self.coordinator.events if e["event"] == "round"]
                for e in rounds[told:]:
                    if progress is not None:
                        progress(f"  round {e['new_round']} agreed at {e['time'] - self.start:7.1f}s fake, "
                                 f"{len(e['members'])} contributions, {time.monotonic() - began:6.1f}s real")
                told = len(rounds)
                if time.monotonic() - began > real_seconds:
                    cut = "real time"
                    break
        except KeyboardInterrupt:
            cut = "interrupted"
        if self.clock.t >= limit:
            cut = "fake time"
        return summarize(self, time.monotonic() - began, cut)


def _by_kind(totals: dict[str, tuple[dict, dict]], per: float) -> dict[str, list[int]]:
    """Per volunteer and round, [sent, received] bytes of each kind (DHT, W, contributions, reduced parts)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for sent, received in totals.values():
        for kind, nbytes in sent.items():
            out[kind][0] += nbytes
        for kind, nbytes in received.items():
            out[kind][1] += nbytes
    return {k: [round(v[0] / per), round(v[1] / per)] for k, v in sorted(out.items())}


def _alive(sim: SwarmSimulation, group: list[Volunteer], end: float) -> float:
    """How many of `group` were there on average, from the start to `end`."""
    return sum((n.left or end) - n.joined for n in group) / max(1e-9, end - sim.start)


def _split(sim: SwarmSimulation, volunteers: list[Volunteer], up, down, end: float, done: int) -> dict[str, int]:
    """A head holder's and a standby's bytes apart (per volunteer of each kind there, per round)."""
    out = {}
    for kind, group in (("holder", [n for n in volunteers if n.head_seconds > 0]),
                        ("standby", [n for n in volunteers if n.head_seconds == 0])):
        per = max(1e-9, _alive(sim, group, end) * done)
        out[f"{kind}_bytes_up_per_round"] = round(sum(up[n.name] for n in group) / per)
        out[f"{kind}_bytes_down_per_round"] = round(sum(down[n.name] for n in group) / per)
    return out


def summarize(sim: SwarmSimulation, real_seconds: float, cut: str | None) -> dict:
    """The figures of a run (`docs/benchmarks.md` says what each means)."""
    coord = sim.coordinator
    rounds = [e for e in coord.events if e["event"] == "round"]
    agreed = {e["new_round"]: e for e in rounds}
    volunteers = [n for n in sim.nodes.values() if n is not coord]
    end = sim.clock.t
    first = rounds[0]["time"] if rounds else end
    hours = max(1e-9, (end - sim.start) / 3600)
    lifetime = sum((n.left or end) - n.joined for n in volunteers)
    head_time = sum(n.head_seconds for n in volunteers)
    train_time = sum(n.train_seconds for n in volunteers)
    divergent = lost = doubled = 0
    closes: dict[int, float] = {}
    for n in volunteers:
        for e in n.events:
            if e["event"] == "ready":
                closes[e["round"]] = min(closes.get(e["round"], math.inf), e["time"])
            if e["event"] != "round":
                continue
            if e["new_round"] in agreed:  # the W it ended the round on, against the swarm's of that round
                divergent += int(e["digest"] != agreed[e["new_round"]]["digest"])
            if e["round"] + 1 in agreed:  # whether it counts its contribution as the swarm does
                member = n.role.peer in agreed[e["round"] + 1]["members"]
                lost += int(e["merged"] and not member)
                doubled += int(member and not e["merged"])
    to_agree = [agreed[r + 1]["time"] - t for r, t in closes.items() if r + 1 in agreed]
    totals = {n.name: sim.links.totals(str(n.rt.dht.peer_id)) for n in volunteers}
    up = {name: sum(sent.values()) for name, (sent, _) in totals.items()}  # blobs and DHT
    down = {name: sum(received.values()) for name, (_, received) in totals.items()}
    dht_up = sum(sent.get("dht", 0.0) for sent, _ in totals.values())
    dht_down = sum(received.get("dht", 0.0) for _, received in totals.values())
    done = max(1, len(rounds))
    per = max(1e-9, _alive(sim, volunteers, end) * done)
    c_sent, c_received = sim.links.totals(str(coord.rt.dht.peer_id))
    requests = sorted(sim.links.requests.values())
    return {
        "volunteers": sim.sc.volunteers,
        "heads": sim.cfg.lte.heads,
        "rounds": len(rounds),
        "fake_hours": round(hours, 3),
        "rounds_per_hour": round(len(rounds) / hours, 2),
        "first_round_after_s": round(first - sim.start, 1),
        "train_fraction": round(train_time / head_time, 3) if head_time else 0.0,
        "train_fraction_all": round(train_time / lifetime, 3) if lifetime else 0.0,
        "idle_fraction": round(1 - head_time / lifetime, 3) if lifetime else 1.0,
        "bytes_up_per_volunteer_round": round(sum(up.values()) / per),
        "bytes_down_per_volunteer_round": round(sum(down.values()) / per),
        "dht_bytes_up_per_volunteer_round": round(dht_up / per),
        "dht_bytes_down_per_volunteer_round": round(dht_down / per),
        **_split(sim, volunteers, up, down, end, done),
        "max_volunteer_bytes_per_round": round(max([up[k] + down[k] for k in up] or [0]) / done),
        "coordinator_bytes_per_round": round((sum(c_sent.values()) + sum(c_received.values())) / done),
        "coordinator_bytes_per_round_by_kind": {k: round((c_sent.get(k, 0) + c_received.get(k, 0)) / done)
                                                for k in sorted(set(c_sent) | set(c_received))},
        "volunteer_bytes_by_kind": _by_kind(totals, per),
        "dht_requests_max_node": requests[-1] if requests else 0,
        # the DHT bytes the busiest node sent per round: the nodes nearest to a round's keys answer every poll
        "dht_bytes_up_max_node_per_round": round(max([sim.links.sent[n].get("dht", 0.0) for n in sim.links.sent] or [0])
                                                 / done),
        "dht_requests_median_node": statistics.median(requests) if requests else 0,
        "seconds_close_to_agreement": round(statistics.median(to_agree), 1) if to_agree else None,
        "members_per_round": round(statistics.mean(len(e["members"]) for e in rounds), 1) if rounds else 0,
        # how volunteers that fell behind caught up: whole W downloads, rounds replayed from their reduced parts
        "w_downloads": sum(n.role.protocol.state.downloads for n in volunteers),
        "rounds_replayed": sum(n.role.protocol.state.rounds_replayed for n in volunteers),
        "divergent_w": divergent,
        "lost_contributions": lost,
        "doubled_contributions": doubled,
        "joined": len(volunteers),
        "left": sum(n.how in ("stopped", "crashed") for n in volunteers),
        "crashed": sum(n.how == "crashed" for n in volunteers),
        "failed": sorted({n.error for n in volunteers if n.how == "failed"})[:5],
        "nat": sum(not n.rt.reachable for n in volunteers),
        "accuracy": rounds[-1].get("accuracy") if rounds else None,
        "scales": {k: round(v, 1) for k, v in sim.scales.items()},
        "events": sim.loop.events,
        "real_seconds": round(real_seconds, 1),
        "cut_short": cut,
        "per_round": [{"round": e["new_round"], "time_s": round(e["time"] - sim.start, 1), "members": len(e["members"]),
                       "accuracy": e.get("accuracy")} for e in rounds],
    }
