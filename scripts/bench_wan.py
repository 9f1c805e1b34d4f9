"""Measure lte-swarm against hivemind's data-parallel training and against DiLoCo over an emulated
WAN: every peer (and the coordinator) runs in a Linux network namespace of its own, joined to a
bridge by a veth pair whose two ends are capped by `tc tbf` at `--mbit` (each direction), on the
same model, data, per-peer batch and sample budget:

- `reduce`: lte-swarm with the owner-reduced merge (`swarm.merge: reduce`, the default);
- `gather`: lte-swarm with the all-gather merge (`swarm.merge: gather`);
- `hivemind`: `hivemind.Optimizer` data-parallel training of the full-rank model
  (`peers/dp_baseline.py`), 8-bit gradient and state compression, `use_local_updates=False`,
  one global step per `--hivemind-target` samples (default: the samples of one LTE merge round,
  so it communicates as often as LTE merges), evaluated by its first peer after every step;
- `diloco`: DiLoCo (`peers/diloco_baseline.py`): every peer trains the full-rank model with AdamW for
  H = T steps, then the peers average their changes with hivemind's all-reduce (8-bit by default,
  `--diloco-compression`) and take DiLoCo's outer Nesterov step; its rates are DILOCO_RATES unless
  `--set train.full_lr=... --set diloco.outer.lr=...` says otherwise; evaluated by its first peer
  after every sync.

    python scripts/bench_wan.py [--peers 4] [--mbit 4] [--coordinator-mbit M] [--samples N]
        [--modes reduce gather hivemind diloco] [--config FILE] [--set KEY=VALUE ...] [--target-accuracy 0.7]
        [--json] [--plot wan.png]

It reports per mode the bytes each peer sent and received per round, read from its veth's counters
(everything: DHT, state download, merges), the wall clock from launching the peers to the last one
leaving, the fraction of each peer's time (join to leave) spent in local forward/backward, the peak
memory of each peer's processes (their PSS, sampled every 2 s: hivemind's DHT, averager and p2pd
processes included), test accuracy against wall clock (the coordinator's evaluation after every
round; the first baseline peer's after every global step or sync) and the wall time to reach `--target-accuracy`, from the launch and
from the moment the last peer joined (processes starting at once on a few cores take far longer to
join than volunteers on machines of their own; that start costs every mode alike).

Why this model and cap. The paper's setting is ViT-S/32 on a modest GPU over a 20 Mbit/s home link:
about 1-3 s of compute per merge round of T = 10 local steps against about 36 s to move one fp32
W (~90 MB), a ratio of roughly 1:10 to 1:30 between compute per round and the transfer of one |W|.
What decides the comparison is that ratio, not the absolute sizes. The CPUs here train the shipped
digits ViT (0.14 M parameters) through 10 steps in about 0.1 s, and its W crosses 20 Mbit/s in
0.2 s: 1:2, compute-bound, nothing like the paper. The default model is therefore wider (embed 192,
4 blocks, MLP ratio 4, 4x4 patches: 1.8 M parameters, 7.1 MB fp32 W) and the default cap is 4 Mbit/s,
under which one |W| takes 14.3 s; with 4 peers and the coordinator sharing 2 cores a peer computed
a round of rank-16 heads in 1.0-1.35 s: 1:12 measured (1:11 to 1:14). The heads have the paper's
rank for the width (64 of 384 there, 32 of 192 here), so that one contribution weighs against W as
in the paper (reset-less, fp32: 3.2 MB against 7.1 MB; the paper's 42.9 MB against 88 MB). The
ratio measured in each run (compute per round from the LTE peers' own timings) is printed with the
results. More peers on the same cores compute slower (a smaller ratio); a faster machine computes
faster: lower `--mbit` to keep it.

The hivemind learning rate is tuned (see HIVEMIND_LR) for the default model, budget and global
batch; with other settings pass `--hivemind-lr`. Digits at the default budget tops out near 93 %
for LTE, so `--target-accuracy` defaults to 70 %, which every mode reached with 4 peers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_wan.py` from anywhere
    sys.path.insert(0, str(ROOT))

from peers.diloco_baseline import CODECS as DILOCO_CODECS  # noqa: E402
from peers.demo import DEMO_HEAD_BATCH, DEMO_MERGE_EVERY, DEMO_SWARM, demo_config  # noqa: E402
from peers.local_swarm import LocalSwarm, LocalSwarmError, PeerProcess, tree_pss  # noqa: E402
from peers.models import create_model  # noqa: E402
from peers.shipped import shipped_config  # noqa: E402
from swarm.config import RunConfig, load_config, parse_overrides  # noqa: E402
from swarm.errors import ConfigError  # noqa: E402

# The default model (see the docstring): the shipped digits ViT made wide enough for its W to
# weigh on the link as ViT-S/32's does on a home link, and heads of the paper's rank for its width
# (r = 64 on ViT-S's 384: one sixth), so that a contribution weighs against W as the paper's does.
WAN_MODEL = {"model.args.embed_dim": 192, "model.args.num_heads": 3, "model.args.depth": 4,
             "model.args.mlp_ratio": 4.0, "model.args.patch_size": 4, "lte.rank": 32}
# Tuned for hivemind's global batch of 640 (T x 64) and the default budget, one-process full-rank
# training on the same data (peers/simulate.py, train.batch_size 640, 12 steps, warm-up 2):
# test accuracy 78.1 % at 5e-4 and 1e-3, 77.8 % at 7e-4, 73.9 % at 1.5e-3, 70.0 % at 2e-3,
# 63.6 % at 3e-3 (the run's full_lr, tuned for batch 64), 56.4 % at 5e-3, 14 % at 1e-2.
HIVEMIND_LR = 1e-3
# DiLoCo's inner (AdamW) and outer rates for the default model, budget and T, tuned in the simulation
# (scripts/tune.py --arms diloco on this benchmark's config): see docs/benchmarks.md.
DILOCO_RATES = {"train.full_lr": 2.5e-4, "diloco.outer.lr": 0.7}
SUBNET = "10.77.0"  # every run has a bridge of its own, so concurrent runs may share the range
MODES = ("reduce", "gather", "hivemind", "diloco")


class Interrupted(Exception):
    """SIGTERM: unwind like Ctrl+C, through every `finally`."""


# ---- the emulated network --------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def parse_tcp(snmp: str) -> tuple[int, int]:
    """(segments sent, segments retransmitted) from the `Tcp:` lines of /proc/net/snmp."""
    names, values = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:")][:2]
    fields = dict(zip(names, values))
    return int(fields["OutSegs"]), int(fields["RetransSegs"])


def retransmitted(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], nodes: list[str]
                  ) -> float | None:
    """The share of the TCP segments `nodes` sent between two `tcp()` readings that were resent
    (what the capped queues dropped): veth bytes beyond the payload."""
    sent = sum(after[n][0] - before[n][0] for n in nodes if n in after and n in before)
    resent = sum(after[n][1] - before[n][1] for n in nodes if n in after and n in before)
    return resent / sent if sent > 0 else None


def parse_cpu(stat: str) -> tuple[int, int]:
    """(busy, all) CPU time of the whole machine since boot, in ticks, from /proc/stat's first line
    (user nice system idle iowait irq softirq steal; guest time is already in user)."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def parse_counters(ip_json: str, links: dict[str, str]) -> dict[str, tuple[int, int]]:
    """`ip -j -s link show` of the bridge's namespace -> {node: (bytes sent, bytes received)}.
    `links` maps node -> its veth end on the bridge: what the node sends, that end receives."""
    stats = {entry["ifname"]: entry["stats64"] for entry in json.loads(ip_json or "[]")}
    return {node: (int(stats[link]["rx"]["bytes"]), int(stats[link]["tx"]["bytes"]))
            for node, link in links.items() if link in stats}


class WanNetwork:
    """Namespaces `<prefix>-<node>` each holding veth `<prefix>v<i>` (address SUBNET.<i+1>) whose
    other end `<prefix>h<i>` sits on a bridge in namespace `<prefix>-br`; tbf caps both ends at
    `mbit` (or the node's own rate in `rates`), so each node's upload and download are capped. Veths
    are created directly inside their namespaces: nothing of the run is ever in the root namespace.
    `close` kills whatever still runs in the namespaces (only this run's processes can be in them)
    and deletes them, which deletes the veths and the bridge with them."""

    def __init__(self, prefix: str, nodes: list[str], mbit: float, rates: dict[str, float] | None = None):
        self.prefix, self.nodes, self.mbit = prefix, list(nodes), mbit
        self.rates = {node: (rates or {}).get(node, mbit) for node in self.nodes}
        self.bridge_ns = f"{prefix}-br"
        self.created: list[str] = []
        self.inodes: list[int] = []  # of the namespaces: how to find a process still inside one
        self.host_links = {node: f"{prefix}h{i}" for i, node in enumerate(self.nodes)}

    def namespace(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def address(self, node: str) -> str:
        return f"{SUBNET}.{self.nodes.index(node) + 1}"

    def maddr(self, node: str) -> str:
        return f"/ip4/{self.address(node)}/tcp/0"

    def launcher(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node)]

    def _cap(self, namespace: str, link: str, mbit: float) -> None:
        # burst: at least a few ms at the rate (tbf needs rate / HZ); 200 ms of queue, as a home router.
        burst = max(32 * 1024, int(mbit * 1e6 / 8 / 50))
        subprocess.run(["tc", "-n", namespace, "qdisc", "add", "dev", link, "root", "tbf", "rate", f"{mbit}mbit",
                        "burst", str(burst), "latency", "200ms"], check=True, capture_output=True)

    def open(self) -> "WanNetwork":
        for ns in [self.bridge_ns, *map(self.namespace, self.nodes)]:
            _ip("netns", "add", ns)
            self.created.append(ns)
            self.inodes.append(os.stat(f"/run/netns/{ns}").st_ino)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            ns, inner, outer = self.namespace(node), f"{self.prefix}v{i}", self.host_links[node]
            _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            self._cap(ns, inner, self.rates[node])
            self._cap(self.bridge_ns, outer, self.rates[node])
        return self

    def counters(self) -> dict[str, tuple[int, int]]:
        return parse_counters(_ip("-n", self.bridge_ns, "-j", "-s", "link", "show"), self.host_links)

    def tcp(self) -> dict[str, tuple[int, int]]:
        """node -> (TCP segments sent, of which retransmitted), from the kernel of its namespace."""
        out = {}
        for node in self.nodes:
            done = subprocess.run(["ip", "netns", "exec", self.namespace(node), "cat", "/proc/net/snmp"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                out[node] = parse_tcp(done.stdout)
        return out

    def close(self) -> None:
        for ns in reversed(self.created):
            for _ in range(50):
                pids = [int(p) for p in _ip("netns", "pids", ns, check=False).split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            _ip("netns", "del", ns, check=False)
        self.created.clear()
        for link in leftovers(self.prefix)["links"]:  # only if creation was cut short mid-way
            _ip("link", "del", link, check=False)


class CounterLog:
    """The network's counters every `period` seconds, in a thread, from `start` to `stop`: the
    bytes of a stretch of the run are the difference of the samples around it. Every
    `memory_every` samples it also reads the memory of the processes given to `watch`, keeping
    each one's peak (`peak_memory`)."""

    def __init__(self, net: WanNetwork, period: float = 0.5, memory_every: int = 4):
        self.net, self.period, self.memory_every = net, period, memory_every
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.tcp: list[dict[str, tuple[int, int]]] = []  # the namespaces' TCP counters at start and stop
        self.cpu: list[tuple[int, int]] = []  # the machine's (busy, all) CPU time at start and stop
        self.watched: dict[str, int] = {}  # name -> PID
        self.peak_memory: dict[str, int] = {}  # name -> the most bytes its processes held (tree_pss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.watched[name] = pid

    def _sample_memory(self) -> None:
        for name, pid in list(self.watched.items()):
            self.peak_memory[name] = max(self.peak_memory.get(name, 0), tree_pss(pid))

    def _run(self) -> None:
        n = 0
        while True:
            self.samples.append((time.time(), self.net.counters()))
            if n % self.memory_every == 0:
                self._sample_memory()
            n += 1
            if self._stop.wait(self.period):
                return

    def start(self) -> "CounterLog":
        self.tcp.append(self.net.tcp())
        self.cpu.append(parse_cpu(Path("/proc/stat").read_text()))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), self.net.counters()))
        self.tcp.append(self.net.tcp())
        self.cpu.append(parse_cpu(Path("/proc/stat").read_text()))

    def cpu_busy(self) -> float | None:
        """Share of the machine's CPU time that was busy between start and stop."""
        (busy0, all0), (busy1, all1) = self.cpu[0], self.cpu[-1]
        return (busy1 - busy0) / (all1 - all0) if all1 > all0 else None


def per_round(samples: list[tuple[float, dict[str, tuple[int, int]]]], round_ends: list[float],
              node: str) -> tuple[float, float]:
    """(sent, received) bytes of `node` per round in the steady state: from the end of the first
    round to the end of the last (joining, downloading W and leaving left out), each end read at
    the first sample taken after it. With fewer than two rounds: the whole run over its rounds."""
    def at(t: float) -> tuple[int, int]:
        return next((c[node] for s, c in samples if s >= t), samples[-1][1][node])

    if len(round_ends) < 2:
        first, last = samples[0][1][node], samples[-1][1][node]
        n = max(1, len(round_ends))
    else:
        first, last, n = at(round_ends[0]), at(round_ends[-1]), len(round_ends) - 1
    return (last[0] - first[0]) / n, (last[1] - first[1]) / n


def leftovers(prefix: str) -> dict[str, list[str]]:
    """Namespaces and root-namespace links whose names start with `prefix` (a run's, after it)."""
    namespaces = [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(_ip("-j", "link", "show", check=False) or "[]")]
    return {"namespaces": [n for n in namespaces if n.startswith(prefix)],
            "links": [name for name in links if name.startswith(prefix)]}


def processes_in(inodes: list[int]) -> list[int]:
    """PIDs of the processes inside any of the network namespaces with these inode numbers (a
    namespace lives on, nameless, while a process is inside it)."""
    wanted = {f"net:[{i}]" for i in inodes}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") in wanted:
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return found


def run_prefix(pid: int) -> str:
    """Names of one run: `wan` and the benchmark's PID, zero-padded so no run's prefix starts another's."""
    return f"wan{pid:07d}"


def network_missing() -> str | None:
    """Why the emulated network cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    return None


# ---- the runs ----------------------------------------------------------------------------------
@dataclass
class ModeResult:
    mode: str
    rounds: int
    samples_per_round: int
    wall_seconds: float
    bytes_sent_per_peer_round: float
    bytes_received_per_peer_round: float
    coordinator_bytes_per_round: tuple[float, float]
    # what the blob transfers themselves moved (the peers' own counters; lte-swarm only): the rest
    # of the veth bytes is the DHT (records, polling), the transports' framing and resent segments
    blob_bytes_per_peer_round: tuple[float, float] | None
    retransmitted: float | None  # share of the peers' TCP segments that were resent (drops at the caps)
    total_bytes_per_peer: float  # sent + received over the whole run, joining and leaving included
    samples_trained: int  # forward/backward over all peers (hivemind's peers go on while a step is matched)
    train_fraction: float
    compute_seconds_per_round: float
    accuracy: float | None
    seconds_to_target: float | None
    # from launching the peers until the last one joined: 9 processes importing torch at once on a
    # few cores make it longer than on volunteers' own machines; the same for every mode
    joined_seconds: float = 0.0
    seconds_to_target_after_joined: float | None = None  # seconds_to_target - joined_seconds
    # lte-swarm: median seconds from a peer entering a merge round to each step of it (RoundResult.phases)
    round_phases: dict[str, float] | None = None
    dht_reads_per_round: float | None = None  # lte-swarm: median DHT keys a peer read in a round (its polls)
    # share of the machine's CPU time busy from launch to the end: near 1, every process of the run
    # (training and merging alike) waited for a core, and the figures measure this machine's CPUs
    cpu_busy: float | None = None
    # lte-swarm: the train fraction from each peer's first offer to its last, as in a run of many
    # rounds: its start (joining, claiming a head) and the last round's bytes (nothing left to
    # train beside them) left out
    steady_train_fraction: float | None = None
    # bytes each peer's processes held at their peak (tree_pss, sampled every 2 s): mean and max over peers
    peak_memory_per_peer: float | None = None
    peak_memory_max: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds since launch, test accuracy)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wan_config(base: RunConfig, peers: int, samples: int, mbit: float, merge: str,
               overrides: dict[str, Any] | None = None) -> RunConfig:
    """One head per peer at the demo's per-head batch (32) and T (20, or `lte.merge_every` when the
    user sets it), rounds enough for `samples`, and the protocol's timeouts sized for moving a few W
    over the capped link; then the user's `--set` overrides of `swarm.*` keys (e.g. the precision
    on the wire), which win."""
    overrides = overrides or {}
    t = int(overrides.get("lte.merge_every", DEMO_MERGE_EVERY))
    cfg = demo_config(base, peers, max(1, round(samples / (DEMO_HEAD_BATCH * peers * t))), merge_every=t)
    w_seconds = transfer_seconds(weight_bytes(cfg), mbit)
    # A newcomer whose W0 came out different, or a peer re-syncing, downloads W through one donor's
    # link, maybe with the whole swarm at once.
    request = 15.0 + (peers + 1) * w_seconds
    # DHT records polled 10 times a second (the loopback demo's pace) would take a share of links
    # where one W takes seconds: poll as a home link affords.
    return cfg.with_overrides({"swarm": {
        **DEMO_SWARM, "poll_seconds": 0.5, "min_heads": peers, "merge": merge, "request_timeout": request,
        "round_timeout": max(40.0 + 6 * w_seconds, request + 30.0), "merge_grace": 15.0 + w_seconds,
        "lease_seconds": 30.0 + 2 * w_seconds, "checkpoint_every": 1000}}).with_overrides(
        {k: v for k, v in overrides.items() if k.startswith("swarm.")})


def sync_timeout(cfg: RunConfig, peers: int, mbit: float) -> float:
    """How long a volunteer may take to get W at the start: every peer's copy through one link."""
    return 60.0 + 2 * (peers + 1) * transfer_seconds(weight_bytes(cfg), mbit)


def weight_bytes(cfg: RunConfig) -> int:
    """|W| in fp32: every parameter of the model, as the paper's ~90 MB for ViT-S/32."""
    return 4 * sum(p.numel() for p in create_model(cfg.model).parameters())


def transfer_seconds(nbytes: float, mbit: float) -> float:
    return nbytes * 8 / (mbit * 1e6)


def _write(cfg: RunConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _first(proc: PeerProcess, kind: str) -> dict:
    found = proc.of(kind)
    if not found:
        raise LocalSwarmError(f"{proc.name} logged no {kind!r} event:\n{proc.tail()}")
    return found[0]


def _wait_all(procs: list[PeerProcess], timeout: float) -> None:
    """Until every process exited 0; the first failure ends the wait (the others would wait for
    the failed peer until their own timeouts)."""
    deadline = time.monotonic() + timeout
    while any(p.handle.poll() is None for p in procs):
        failed = [p for p in procs if p.handle.poll() not in (None, 0)]
        if failed:
            raise LocalSwarmError(f"{failed[0].name} failed ({failed[0].handle.returncode}):\n{failed[0].tail()}")
        if time.monotonic() > deadline:
            late = next(p for p in procs if p.handle.poll() is None)
            raise LocalSwarmError(f"{late.name} did not finish within {timeout:.0f}s:\n{late.tail()}")
        time.sleep(0.5)
    failed = [p for p in procs if p.handle.returncode != 0]
    if failed:
        raise LocalSwarmError(f"{failed[0].name} failed ({failed[0].handle.returncode}):\n{failed[0].tail()}")


def _let_finish(proc: PeerProcess, timeout: float) -> None:
    """Give a process that ends by itself (the coordinator, once the volunteers left) up to
    `timeout` to do so: stopped at once, it could still be voting on the last round, which its
    evaluation would then miss."""
    try:
        proc.handle.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"  {proc.name} still running {timeout:.0f}s after the peers left; stopping it", file=sys.stderr, flush=True)


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the test accuracy first reached `target`, None if it never did."""
    return next((t for t, acc in curve if acc >= target), None)


def blob_per_round(peers: list[PeerProcess]) -> tuple[float, float] | None:
    """(sent, received) blob bytes per peer and round, from the end of each peer's first round to
    the end of its last (as `per_round`; over the whole run with fewer than two rounds), from the
    counters in its round events."""
    spans = []
    for p in peers:
        rounds = p.of("round")
        if len(rounds) >= 2:
            n = len(rounds) - 1
            spans.append(((rounds[-1]["bytes_sent"] - rounds[0]["bytes_sent"]) / n,
                          (rounds[-1]["bytes_received"] - rounds[0]["bytes_received"]) / n))
        elif rounds:
            spans.append((rounds[0]["bytes_sent"], rounds[0]["bytes_received"]))
    if not spans:
        return None
    return statistics.mean(s for s, _ in spans), statistics.mean(r for _, r in spans)


def round_phases(peers: list[PeerProcess]) -> dict[str, float] | None:
    """Median over the peers' rounds of the seconds from entering the round to each step it reached,
    in the order the steps come."""
    marks: dict[str, list[float]] = {}
    for p in peers:
        for e in p.of("round"):
            for step, seconds in (e.get("phases") or {}).items():
                marks.setdefault(step, []).append(seconds)
    if not marks:
        return None
    medians = {step: statistics.median(v) for step, v in marks.items()}
    return dict(sorted(medians.items(), key=lambda kv: kv[1]))


def dht_reads(peers: list[PeerProcess]) -> float | None:
    """Median over the peers' rounds of the DHT keys read in one (RoundResult.dht_reads)."""
    reads = [e["dht_reads"] for p in peers for e in p.of("round") if "dht_reads" in e]
    return statistics.median(reads) if reads else None


def steady_fraction(peers: list[PeerProcess]) -> float | None:
    """Mean over the peers that offered twice or more of the share of wall time in forward/backward
    between their first and last offer (each `ready` event carries the compute seconds so far)."""
    shares = []
    for p in peers:
        offers = p.of("ready")
        if len(offers) >= 2 and offers[-1]["time"] > offers[0]["time"]:
            shares.append((offers[-1]["compute_seconds"] - offers[0]["compute_seconds"])
                          / (offers[-1]["time"] - offers[0]["time"]))
    return statistics.mean(shares) if shares else None


def summarize(mode: str, counters: CounterLog, launched: float, peers: list[PeerProcess], round_ends: list[float],
              samples_per_round: int, samples_trained: int, curve: list[tuple[float, float]],
              train_seconds: list[float], target: float, blobs: tuple[float, float] | None = None) -> ModeResult:
    """Bytes per peer and round from the veth counters, time fractions from the peers' events."""
    rounds = max(1, len(round_ends))
    traffic = [per_round(counters.samples, round_ends, p.name) for p in peers]
    first, last = counters.samples[0][1], counters.samples[-1][1]
    spans = [p.of("left")[-1]["time"] - _first(p, "joined")["time"] for p in peers]
    left = max(p.of("left")[-1]["time"] for p in peers)
    joined = max(_first(p, "joined")["time"] for p in peers) - launched
    reach = time_to(curve, target)
    peaks = [counters.peak_memory[p.name] for p in peers if counters.peak_memory.get(p.name)]
    return ModeResult(
        mode=mode, rounds=rounds, samples_per_round=samples_per_round, wall_seconds=left - launched,
        bytes_sent_per_peer_round=statistics.mean(t[0] for t in traffic),
        bytes_received_per_peer_round=statistics.mean(t[1] for t in traffic),
        coordinator_bytes_per_round=per_round(counters.samples, round_ends, "coordinator"),
        blob_bytes_per_peer_round=blobs,
        retransmitted=retransmitted(counters.tcp[0], counters.tcp[-1], [p.name for p in peers]),
        total_bytes_per_peer=statistics.mean(sum(last[p.name]) - sum(first[p.name]) for p in peers),
        samples_trained=samples_trained,
        train_fraction=statistics.mean(t / s for t, s in zip(train_seconds, spans)),
        compute_seconds_per_round=statistics.mean(train_seconds) / rounds,
        accuracy=curve[-1][1] if curve else None, seconds_to_target=reach, joined_seconds=joined,
        cpu_busy=counters.cpu_busy(),
        peak_memory_per_peer=statistics.mean(peaks) if peaks else None, peak_memory_max=max(peaks, default=None),
        seconds_to_target_after_joined=None if reach is None else max(0.0, reach - joined), curve=curve)


def run_lte(net: WanNetwork, cfg: RunConfig, workdir: Path, target: float, timeout: float) -> ModeResult:
    """A coordinator and one single-head peer per node, each in its namespace."""
    swarm = LocalSwarm(workdir, _write(cfg, workdir / "run.yaml"), launcher=net.launcher)
    peers = [n for n in net.nodes if n != "coordinator"]
    counters = CounterLog(net).start()
    try:
        launched = time.time()
        swarm.start_coordinator("--host-maddrs", net.maddr("coordinator"), timeout=timeout)
        wait_w = f"{sync_timeout(cfg, len(peers), net.mbit):.0f}"
        procs = [swarm.join(n, "--host-maddrs", net.maddr(n), "--sync-timeout", wait_w) for n in peers]
        for p in procs:
            counters.watch(p.name, p.handle.pid)
        _wait_all(procs, timeout)
        _let_finish(swarm.coordinator, 2 * cfg.swarm.round_timeout)
    finally:
        counters.stop()
        swarm.close()
    rounds = [e for e in swarm.coordinator.of("round") if not e.get("idle")]
    curve = [(e["time"] - launched, e["accuracy"]) for e in rounds if e.get("accuracy") is not None]
    train = [p.of("left")[-1]["compute_seconds"] for p in procs]  # forward/backward alone (see bench_swarm)
    trained = sum(p.of("left")[-1]["trained_head_steps"] for p in procs) * cfg.head_batch
    result = summarize(cfg.swarm.merge, counters, launched, procs, [e["time"] for e in rounds],
                       cfg.train.batch_size * cfg.lte.merge_every, trained, curve, train, target, blob_per_round(procs))
    result.round_phases, result.dht_reads_per_round = round_phases(procs), dht_reads(procs)
    result.steady_train_fraction = steady_fraction(procs)
    return result


def start_bootstrap(swarm: LocalSwarm, net: WanNetwork, timeout: float) -> list[str]:
    """A bare DHT node where the coordinator would be; its multiaddrs, for the peers to join."""
    boot = swarm.spawn("coordinator", ["-m", "peers.dp_baseline", "bootstrap", "--host", net.maddr("coordinator"),
                                       "--events", "{events}"])
    maddrs = boot.wait_for(lambda es: any(e["event"] == "maddrs" for e in es), timeout, "the DHT to start")
    return next(e for e in maddrs if e["event"] == "maddrs")["maddrs"]


def run_baseline(net: WanNetwork, cfg: RunConfig, workdir: Path, timeout: float,
                 start: Callable[[LocalSwarm, list[str], float], list[PeerProcess]]
                 ) -> tuple[CounterLog, float, list[PeerProcess]]:
    """A baseline's run: its peer processes, one per node but the coordinator's, started by
    `start(swarm, nodes, seconds to move one W)`, their memory watched, until all exited; the
    counters, the launch time and the processes."""
    swarm = LocalSwarm(workdir, _write(cfg, workdir / "run.yaml"), launcher=net.launcher)
    nodes = [n for n in net.nodes if n != "coordinator"]
    counters = CounterLog(net).start()
    try:
        launched = time.time()
        procs = start(swarm, nodes, transfer_seconds(weight_bytes(cfg), net.mbit))
        for p in procs:
            counters.watch(p.name, p.handle.pid)
        _wait_all(procs, timeout)
    finally:
        counters.stop()
        swarm.close()
    return counters, launched, procs


def baseline_figures(cfg: RunConfig, launched: float, procs: list[PeerProcess]
                     ) -> tuple[list[tuple[float, float]], list[float], int]:
    """(accuracy curve of the first peer's evaluations, each peer's seconds in forward/backward,
    samples trained over all peers) from a baseline's events."""
    curve = [(e["time"] - launched, e["accuracy"]) for e in procs[0].of("eval")]
    train = [p.of("left")[-1]["seconds_train"] for p in procs]
    trained = sum(p.of("left")[-1]["steps"] for p in procs) * cfg.head_batch
    return curve, train, trained


def run_hivemind(net: WanNetwork, cfg: RunConfig, workdir: Path, target: float, timeout: float,
                 hm_target: int, lr: float) -> ModeResult:
    """A bare DHT node where the coordinator would be and one `hivemind.Optimizer` peer per node."""
    def start(swarm: LocalSwarm, nodes: list[str], w_seconds: float) -> list[PeerProcess]:
        initial = start_bootstrap(swarm, net, timeout)
        return [swarm.spawn(n, ["-m", "peers.dp_baseline", "train", "--config", str(swarm.config), "--index", str(i),
                                "--peers", str(len(nodes)), "--initial-peers", *initial, "--host", net.maddr(n),
                                "--target", str(hm_target), "--lr", str(lr), "--events", "{events}",
                                "--evaluate-every", "1" if i == 0 else "0",
                                # 8-bit gradients, then 8-bit parameters: about |W| / 2 each way per step
                                "--matchmaking-time", str(5.0 + w_seconds / 10),
                                "--averaging-timeout", str(60.0 + 2 * w_seconds)])
                for i, n in enumerate(nodes)]

    counters, launched, procs = run_baseline(net, cfg, workdir, timeout, start)
    curve, train, trained = baseline_figures(cfg, launched, procs)
    return summarize("hivemind", counters, launched, procs, [e["time"] for e in procs[0].of("epoch")], hm_target,
                     trained, curve, train, target)


def run_diloco(net: WanNetwork, cfg: RunConfig, workdir: Path, target: float, timeout: float,
               compression: str) -> ModeResult:
    """One DiLoCo worker per node (`peers/diloco_baseline.py`; nothing runs where the coordinator
    would be), the first the others' initial peer and the evaluator of the global model after
    every sync."""
    from peers.diloco_baseline import inner_steps

    def start(swarm: LocalSwarm, nodes: list[str], w_seconds: float) -> list[PeerProcess]:
        def worker(i: int, initial: list[str]) -> PeerProcess:
            return swarm.spawn(nodes[i], ["-m", "peers.diloco_baseline", "--config", str(swarm.config),
                                          "--index", str(i), "--peers", str(len(nodes)), "--initial-peers", *initial,
                                          "--host", net.maddr(nodes[i]), "--compression", compression,
                                          "--events", "{events}", "--evaluate-every", "1" if i == 0 else "0",
                                          "--matchmaking-time", str(5.0 + w_seconds / 10),
                                          "--averaging-timeout", str(60.0 + 2 * w_seconds)])

        first = worker(0, [])  # the others' initial peer: DiLoCo needs no node of its own
        started = first.wait_for(lambda es: any(e["event"] == "maddrs" for e in es), timeout, "the first worker's DHT")
        initial = next(e for e in started if e["event"] == "maddrs")["maddrs"]
        return [first, *(worker(i, initial) for i in range(1, len(nodes)))]

    counters, launched, procs = run_baseline(net, cfg, workdir, timeout, start)
    curve, train, trained = baseline_figures(cfg, launched, procs)
    result = summarize("diloco", counters, launched, procs, [e["time"] for e in procs[0].of("round")],
                       cfg.train.batch_size * inner_steps(cfg), trained, curve, train, target)
    partial = sum(e["members"] < len(procs) for p in procs for e in p.of("round"))
    if partial:
        print(f"  diloco: {partial} worker-rounds averaged without every worker", file=sys.stderr, flush=True)
    return result


# ---- reporting ----------------------------------------------------------------------------------
def table(results: list[ModeResult], target: float) -> str:
    """One row per mode: bytes per peer and round, wall clock, training fraction, accuracy."""
    head = (f"{'mode':9s} {'rounds':>6s} {'samples':>7s} {'MB sent':>8s} {'MB recv':>8s} {'blob MB':>11s} "
            f"{'coord MB':>9s} {'resent':>6s} {'wall s':>7s} {'train %':>7s} {'s/round':>7s} {'test acc':>8s} "
            f"{f's to {target:.0%}':>8s} {'joined s':>8s} {'after':>6s}")
    lines = [head, "(samples: forward/backward over all peers; MB per peer per round, from the veth counters; "
                   "blob: sent/received by the blob transfers alone; coord: the coordinator's sent+received; "
                   "resent: share of the peers' TCP segments sent again after drops at the caps; joined s: "
                   "from launch until the last peer joined; after: seconds to the target accuracy from then)"]
    for r in results:
        reach = "-" if r.seconds_to_target is None else f"{r.seconds_to_target:.0f}"
        after = "-" if r.seconds_to_target_after_joined is None else f"{r.seconds_to_target_after_joined:.0f}"
        acc = "-" if r.accuracy is None else f"{r.accuracy:.1%}"
        resent = "-" if r.retransmitted is None else f"{r.retransmitted:.1%}"
        blob = "-" if r.blob_bytes_per_peer_round is None else "{:.2f}/{:.2f}".format(
            *(b / 1e6 for b in r.blob_bytes_per_peer_round))
        lines.append(f"{r.mode:9s} {r.rounds:6d} {r.samples_trained:7d} {r.bytes_sent_per_peer_round / 1e6:8.2f} "
                     f"{r.bytes_received_per_peer_round / 1e6:8.2f} {blob:>11s} "
                     f"{sum(r.coordinator_bytes_per_round) / 1e6:9.2f} {resent:>6s} "
                     f"{r.wall_seconds:7.0f} {r.train_fraction:7.1%} {r.compute_seconds_per_round:7.2f} "
                     f"{acc:>8s} {reach:>8s} {r.joined_seconds:8.0f} {after:>6s}")
    for r in results:
        if r.steady_train_fraction is not None:
            lines.append(f"{r.mode}: from a peer's first offer to its last (start and final drain left out) "
                         f"{r.steady_train_fraction:.1%} of the time in forward/backward")
        if r.peak_memory_per_peer is not None:
            lines.append(f"{r.mode}: peak memory per peer (its processes' PSS) {r.peak_memory_per_peer / 2**20:.0f} MiB "
                         f"(max {r.peak_memory_max / 2**20:.0f})")
        if r.cpu_busy is not None:
            lines.append(f"{r.mode}: the machine's {os.cpu_count()} cores were busy {r.cpu_busy:.0%} of the time")
        if r.round_phases:
            lines.append(f"{r.mode}: a merge round's steps, median seconds after entering it: "
                         + ", ".join(f"{step} {seconds:.1f}" for step, seconds in r.round_phases.items())
                         + (f"; {r.dht_reads_per_round:.0f} DHT reads" if r.dht_reads_per_round is not None else ""))
    return "\n".join(lines)


def plot(results: list[ModeResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([t for t, _ in r.curve], [100 * a for _, a in r.curve], "-o", markersize=3, label=r.mode)
    ax.set(xlabel="wall clock since launching the peers (s)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl+C, through every `finally`. Ctrl+C gets Python's own handler
    back: a process started in the background by a shell inherits SIGINT ignored."""
    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ctrl+C and SIGTERM wait until the cleanup inside is done: a second Ctrl+C must not leave
    half the namespaces behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="peers (one LoRA head each; one hivemind peer each)")
    parser.add_argument("--mbit", type=float, default=4.0, help="cap of every link, each direction (Mbit/s)")
    parser.add_argument("--coordinator-mbit", type=float,
                        help="the coordinator's own cap (default: --mbit), as for a run started from a server")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--samples", type=int, default=30720,
                        help="training budget over all peers (default: 12 rounds of 4 peers x 32 samples x T = 20)")
    parser.add_argument("--config", type=Path, help="base config (default: the shipped digits config, widened; see above)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. lte.rank=8 (YAML value)")
    parser.add_argument("--target-accuracy", type=float, default=0.7, help="report the wall time to reach this")
    parser.add_argument("--hivemind-target", type=int, help="hivemind's target_batch_size (default: one LTE round's samples)")
    parser.add_argument("--hivemind-lr", type=float, default=HIVEMIND_LR,
                        help="its AdamW learning rate (default: tuned for the default model and budget, see above)")
    parser.add_argument("--diloco-compression", choices=DILOCO_CODECS, default="8bit",
                        help="DiLoCo's codec for the averaged changes (hivemind's; it has no 4-bit one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on each mode's run (s)")
    parser.add_argument("--workdir", type=Path, help="where the runs' logs and events go (default: a new temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--plot", type=Path, help="write test accuracy against wall clock to this PNG")
    args = parser.parse_args(argv)

    missing = network_missing()
    if missing:
        raise SystemExit(f"bench_wan: cannot emulate the network: {missing}")
    overrides = {} if args.config else dict(WAN_MODEL)
    try:
        user = parse_overrides(args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"bench_wan: {exc}") from None
    overrides.update(user)
    base = load_config(args.config or shipped_config()).with_overrides(overrides)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lte-wan-"))).resolve()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    prefix = run_prefix(os.getpid())
    nodes = ["coordinator", *(f"peer{i}" for i in range(args.peers))]
    coordinator_mbit = args.coordinator_mbit or args.mbit
    net = WanNetwork(prefix, nodes, args.mbit, {"coordinator": coordinator_mbit})
    results: list[ModeResult] = []
    with term_as_interrupt():
        try:
            net.open()
            log(f"network {prefix}: {len(nodes)} namespaces on a bridge, every link capped at {args.mbit:g} Mbit/s"
                + (f" (the coordinator's at {coordinator_mbit:g})" if coordinator_mbit != args.mbit else ""))
            for mode in args.modes:
                cfg = wan_config(base, args.peers, args.samples, args.mbit, "gather" if mode == "gather" else "reduce",
                                 user)
                where = workdir / mode
                where.mkdir(parents=True, exist_ok=True)
                log(f"{mode}: {args.peers} peers, {cfg.rounds} rounds of {cfg.train.batch_size * cfg.lte.merge_every} "
                    f"samples ... (logs in {where})")
                if mode == "hivemind":
                    hm_target = args.hivemind_target or cfg.train.batch_size * cfg.lte.merge_every
                    result = run_hivemind(net, cfg, where, args.target_accuracy, args.timeout, hm_target,
                                          args.hivemind_lr)
                elif mode == "diloco":
                    rates = {k: v for k, v in DILOCO_RATES.items() if k not in user}
                    result = run_diloco(net, cfg.with_overrides(rates), where, args.target_accuracy, args.timeout,
                                        args.diloco_compression)
                else:
                    result = run_lte(net, cfg, where, args.target_accuracy, args.timeout)
                results.append(result)
                (where / "result.json").write_text(json.dumps(result.to_json()))  # kept if a later mode fails
                log(f"  {result.wall_seconds:.0f}s, test accuracy {result.accuracy}")
        finally:
            with shielded():
                net.close()
    w_bytes = weight_bytes(base)
    w_seconds = transfer_seconds(w_bytes, args.mbit)
    lte_compute = [r.compute_seconds_per_round for r in results if r.mode not in ("hivemind", "diloco")] or \
        [r.compute_seconds_per_round for r in results]
    ratio = w_seconds / statistics.mean(lte_compute)
    shown = wan_config(base, args.peers, args.samples, args.mbit, "reduce", user)
    log(f"\n{args.peers} peers, {base.model.name} ({w_bytes / 4e6:.2f}M params, |W| {w_bytes / 1e6:.1f} MB fp32), "
        f"links capped at {args.mbit:g} Mbit/s, {shown.train.samples} samples, T={shown.lte.merge_every}, "
        f"per-peer batch {shown.head_batch}")
    log(f"compute per round : transfer of one |W| = 1 : {ratio:.1f} ({statistics.mean(lte_compute):.2f}s : "
        f"{w_seconds:.1f}s; the paper's ViT-S/32 at 20 Mbit/s: about 1 : 10 to 1 : 30)")
    log(table(results, args.target_accuracy))
    if args.plot:
        plot(results, args.plot, f"{args.peers} peers over {args.mbit:g} Mbit/s links")
        log(f"plot: {args.plot}")
    if args.json:
        print(json.dumps({"peers": args.peers, "mbit": args.mbit, "coordinator_mbit": coordinator_mbit,
                          "samples": args.samples, "prefix": prefix,
                          "netns_inodes": net.inodes, "weight_bytes": w_bytes, "weight_transfer_seconds": w_seconds,
                          "compute_to_transfer": 1 / ratio, "target_accuracy": args.target_accuracy,
                          "workdir": str(workdir), "modes": [r.to_json() for r in results]}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted):
        print("bench_wan: interrupted; network and processes cleaned up", file=sys.stderr)
        sys.exit(130)
