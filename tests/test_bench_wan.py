"""`scripts/bench_wan.py`: its pure helpers (counters, per-round bytes, the table) on made-up
numbers, and, as root with `ip netns` and `tc`, a tiny emulated-WAN run (2 peers, one round of
lte-swarm's reduced merge) that must report plausible figures and leave no namespace, link or
process behind, also when Ctrl+C arrives mid-run (in the hivemind baseline's run, whose processes
are the other kind the benchmark starts). The DiLoCo baseline's peers are tests/test_diloco.py's."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "bench_wan.py"
# The smallest run that still trains: a 1-block ViT of width 32, T = 2, one round of 2 x 16 x 2 samples.
TINY = ["--peers", "2", "--samples", "64", "--mbit", "20", "--target-accuracy", "0.05",
        "--set", "model.args.embed_dim=32", "--set", "model.args.num_heads=2", "--set", "model.args.depth=1",
        "--set", "lte.merge_every=2", "--set", "train.warmup_steps=1"]


@functools.cache
def _bench():
    return load_script("bench_wan")


def _ip_json(links: dict[str, tuple[int, int]]) -> str:
    return json.dumps([{"ifname": name, "stats64": {"rx": {"bytes": rx}, "tx": {"bytes": tx}}}
                       for name, (rx, tx) in links.items()])


def test_counters_are_read_from_the_bridge_side():
    bench = _bench()
    text = _ip_json({"lo": (0, 0), "br0": (5, 5), "w1h0": (1000, 20), "w1h1": (30, 4000)})
    # the bridge's end receives what the node sends
    assert bench.parse_counters(text, {"coordinator": "w1h0", "peer0": "w1h1", "gone": "w1h9"}) == {
        "coordinator": (1000, 20), "peer0": (30, 4000)}
    assert bench.parse_counters("", {"peer0": "w1h1"}) == {}


def test_bytes_per_round_leave_out_joining_and_leaving():
    bench = _bench()
    samples = [(0.0, {"p": (0, 0)}), (1.0, {"p": (500, 900)}),   # joining: W downloaded
               (2.0, {"p": (600, 1000)}), (3.0, {"p": (700, 1100)}), (4.0, {"p": (800, 1200)}),
               (5.0, {"p": (2000, 2000)})]                          # leaving
    assert bench.per_round(samples, [1.5, 2.5, 3.5], "p") == (100.0, 100.0)  # ends read at 2.0 and 4.0
    assert bench.per_round(samples, [1.5], "p") == (2000.0, 2000.0)  # one round: the whole run
    assert bench.per_round(samples, [], "p") == (2000.0, 2000.0)


def test_tcp_counters_and_the_share_resent():
    bench = _bench()
    snmp = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm ActiveOpens InSegs OutSegs RetransSegs InErrs\nTcp: 1 29 162047 291385 44510 0\n"
            "Udp: InDatagrams\nUdp: 5\n")
    assert bench.parse_tcp(snmp) == (291385, 44510)
    before = {"a": (100, 10), "b": (1000, 0), "coordinator": (0, 0)}
    after = {"a": (300, 30), "b": (1800, 80), "coordinator": (5000, 4000)}
    assert bench.retransmitted(before, after, ["a", "b"]) == 100 / 1000
    assert bench.retransmitted(before, before, ["a"]) is None


def test_the_machines_busy_share_from_proc_stat():
    bench = _bench()
    before = bench.parse_cpu("cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 50 0 25 400 25 0 0 0 15 0\nintr 1\n")
    after = bench.parse_cpu("cpu  400 0 150 900 50 0 0 0 90 0\ncpu0 1 0 1 1 1 0 0 0 0 0\n")
    assert before == (150, 1000) and after == (550, 1500)  # guest time is inside user time: not added
    log = bench.CounterLog.__new__(bench.CounterLog)
    log.cpu = [before, after]
    assert log.cpu_busy() == 400 / 500


class _Log:
    """A peer's event log as the benchmark reads it back (`PeerProcess.of`)."""

    def __init__(self, events):
        self.events = events

    def of(self, kind):
        return [e for e in self.events if e["event"] == kind]


def test_the_steady_train_fraction_runs_from_a_peers_first_offer_to_its_last():
    bench = _bench()
    offers = [{"event": "ready", "time": t, "compute_seconds": c} for t, c in ((100.0, 30.0), (140.0, 62.0), (180.0, 94.0))]
    start_and_end = [{"event": "joined", "time": 60.0}, {"event": "left", "time": 230.0, "compute_seconds": 94.0}]
    slow = [{"event": "ready", "time": 50.0, "compute_seconds": 10.0}, {"event": "ready", "time": 150.0, "compute_seconds": 60.0}]
    once = [{"event": "ready", "time": 70.0, "compute_seconds": 20.0}]
    assert bench.steady_fraction([_Log(offers + start_and_end)]) == 64.0 / 80.0
    assert bench.steady_fraction([_Log(offers), _Log(slow), _Log(once)]) == (0.8 + 0.5) / 2
    assert bench.steady_fraction([_Log(once)]) is None
    rows = [bench.ModeResult(mode="reduce", rounds=3, samples_per_round=640, wall_seconds=300.0,
                             bytes_sent_per_peer_round=1.0, bytes_received_per_peer_round=1.0,
                             coordinator_bytes_per_round=(1.0, 1.0), blob_bytes_per_peer_round=None,
                             retransmitted=None, total_bytes_per_peer=1.0, samples_trained=1, train_fraction=0.5,
                             compute_seconds_per_round=1.0, accuracy=None, seconds_to_target=None,
                             steady_train_fraction=0.8)]
    assert "reduce: from a peer's first offer to its last (start and final drain left out) 80.0% of the time" \
        in bench.table(rows, 0.7)


def test_time_to_target_and_table():
    bench = _bench()
    curve = [(10.0, 0.3), (20.0, 0.72), (30.0, 0.65), (40.0, 0.9)]
    assert bench.time_to(curve, 0.7) == 20.0 and bench.time_to(curve, 0.95) is None
    rows = [bench.ModeResult(mode=m, rounds=12, samples_per_round=640, wall_seconds=300.0,
                             bytes_sent_per_peer_round=2.5e6, bytes_received_per_peer_round=7.1e6,
                             coordinator_bytes_per_round=(1e6, 6e6), total_bytes_per_peer=1.2e8, samples_trained=7680,
                             train_fraction=0.1, blob_bytes_per_peer_round=blob, retransmitted=0.125,
                             compute_seconds_per_round=1.2, accuracy=0.9, seconds_to_target=reach, joined_seconds=12.4,
                             seconds_to_target_after_joined=None if reach is None else reach - 12.4, curve=curve)
            for m, reach, blob in (("reduce", 20.0, (1.25e6, 3.5e6)), ("hivemind", None, None))]
    text = bench.table(rows, 0.7)
    lines = text.splitlines()
    assert "s to 70%" in lines[0] and lines[0].split()[-2:] == ["s", "after"]
    assert lines[2].split() == ["reduce", "12", "7680", "2.50", "7.10", "1.25/3.50", "7.00", "12.5%", "300", "10.0%",
                                "1.20", "90.0%", "20", "12", "8"]
    assert lines[3].split()[-3:] == ["-", "12", "-"] and lines[3].split()[5] == "-"


def test_swarm_settings_given_with_set_survive_the_benchmark_timeouts():
    from peers.shipped import shipped_config
    from swarm.config import load_config

    bench = _bench()
    user = {"swarm.contribution_dtype": "int8", "swarm.part_owners": 1, "swarm.overlap": True}
    cfg = bench.wan_config(load_config(shipped_config()), 4, 2560, 4.0, "reduce", user)
    assert (cfg.swarm.contribution_dtype, cfg.swarm.part_owners, cfg.swarm.overlap) == ("int8", 1, True)
    assert cfg.swarm.merge == "reduce" and cfg.swarm.min_heads == 4  # the benchmark's own settings stay
    plain = bench.wan_config(load_config(shipped_config()), 4, 2560, 4.0, "gather")
    assert plain.swarm.contribution_dtype == "fp32" and plain.swarm.merge == "gather"


def test_names_of_concurrent_runs_never_share_a_prefix():
    bench = _bench()
    assert not bench.run_prefix(1234567).startswith(bench.run_prefix(123))
    assert bench.run_prefix(123) == "wan0000123"
    # interface names must fit IFNAMSIZ (15 characters) with the largest PID and node index
    assert len(bench.run_prefix(4194304) + "h99") <= 15


def _needs_network() -> None:
    missing = _bench().network_missing()
    if missing:
        pytest.skip(f"emulated WAN unavailable: {missing}")


def _ours(workdir: Path) -> list[psutil.Process]:
    """Processes started for a run: every one names a file in its workdir on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(workdir) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _assert_clean(bench, prefix: str, inodes: list[int], workdir: Path) -> None:
    assert bench.leftovers(prefix) == {"namespaces": [], "links": []}
    assert bench.processes_in(inodes) == []
    assert _ours(workdir) == []


@pytest.mark.xdist_group("wan")
@pytest.mark.timeout(60)
def test_a_node_may_have_a_cap_of_its_own():
    """--coordinator-mbit: the coordinator's link (both ends) at its own rate, the others at --mbit."""
    _needs_network()
    bench = _bench()
    net = bench.WanNetwork(bench.run_prefix(os.getpid()), ["coordinator", "peer0"], 4.0, {"coordinator": 40.0})
    try:
        net.open()
        for i, (node, rate) in enumerate((("coordinator", "40Mbit"), ("peer0", "4Mbit"))):
            for ns, link in ((net.namespace(node), f"{net.prefix}v{i}"), (net.bridge_ns, net.host_links[node])):
                shown = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", link], capture_output=True,
                                       text=True, check=True).stdout
                assert f"rate {rate} " in shown, (node, ns, shown)
    finally:
        net.close()
    assert bench.leftovers(net.prefix) == {"namespaces": [], "links": []}


@pytest.mark.xdist_group("wan")
@pytest.mark.timeout(240)
def test_tiny_wan_run_reports_and_cleans_up(tmp_path):
    _needs_network()
    bench = _bench()
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--modes", "reduce", "--json",
                           "--workdir", str(tmp_path), "--plot", str(tmp_path / "wan.png")],
                          capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m["mode"] for m in out["modes"]] == ["reduce"]
    assert out["weight_bytes"] > 0 and out["compute_to_transfer"] > 0 and len(out["netns_inodes"]) == 4
    for mode in out["modes"]:
        assert mode["rounds"] >= 1 and mode["wall_seconds"] > 0
        assert mode["bytes_sent_per_peer_round"] > 0 and mode["bytes_received_per_peer_round"] > 0
        assert mode["total_bytes_per_peer"] > 0 and mode["samples_trained"] >= 64
        assert 0.0 < mode["train_fraction"] < 1.0
        assert mode["curve"] and all(0.0 <= acc <= 1.0 for _, acc in mode["curve"]), (mode["mode"], done.stderr[-3000:])
        assert 0.0 <= mode["accuracy"] <= 1.0
        # a peer is at least its Python process with torch imported, and far less than the machine
        assert 50e6 < mode["peak_memory_per_peer"] <= mode["peak_memory_max"] < 8e9
        assert 0.0 < mode["joined_seconds"] < mode["wall_seconds"]
        reach, after = mode["seconds_to_target"], mode["seconds_to_target_after_joined"]
        assert (after is None) == (reach is None)
        assert reach is None or after == max(0.0, reach - mode["joined_seconds"])
    blob_sent, blob_received = out["modes"][0]["blob_bytes_per_peer_round"]  # lte-swarm's own counters
    assert 0 < blob_sent <= out["modes"][0]["bytes_sent_per_peer_round"]
    assert 0 < blob_received <= out["modes"][0]["bytes_received_per_peer_round"]
    assert all(0.0 <= mode["retransmitted"] < 1.0 for mode in out["modes"])
    assert all(0.0 < mode["cpu_busy"] <= 1.0 for mode in out["modes"])
    assert "compute per round : transfer of one |W|" in done.stderr
    assert (tmp_path / "wan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_clean(bench, out["prefix"], out["netns_inodes"], tmp_path)


@pytest.mark.xdist_group("wan")
@pytest.mark.timeout(180)
def test_ctrl_c_mid_run_cleans_up(tmp_path):
    _needs_network()
    bench = _bench()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--modes", "hivemind", "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    prefix = bench.run_prefix(proc.pid)
    try:
        inodes: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # until the roles run in their namespaces
            if not inodes and len(bench.leftovers(prefix)["namespaces"]) == 4:
                inodes = [os.stat(f"/run/netns/{ns}").st_ino for ns in bench.leftovers(prefix)["namespaces"]]
            if inodes and len(bench.processes_in(inodes)) >= 3:  # the bare DHT node and both peers
                break
            time.sleep(0.2)
        assert inodes and proc.poll() is None, "the run never got going"
        assert bench.processes_in(inodes)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "cleaned up" in err
    _assert_clean(bench, prefix, inodes, tmp_path)


def test_a_peers_memory_counts_the_processes_it_started():
    """tree_pss: a child holding 200 MB adds about that much to its parent's figure."""
    bench = _bench()
    alone = bench.tree_pss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(200 * 2**20); "
                              "b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        together = bench.tree_pss(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert alone > 10e6 and together - alone > 180 * 2**20
    assert bench.tree_pss(child.pid) == 0  # gone: nothing, not an error
