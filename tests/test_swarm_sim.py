"""The discrete-event swarm: its clock (tasks that overlap in fake time), its link model (fair
shares of each end's link), its DHT (records on the nodes nearest to their key) and a whole run
of the real protocol on them, replayed exactly from its seed."""

from __future__ import annotations

import pytest

from peers.swarm_sim import Scenario, SwarmSimulation
from swarm.discrete import EventClock
from swarm.dht_io import STORE_REPLICAS
from swarm.links import Link, Links
from swarm.simnet import SimDHT, SimNetwork, blob_kind
from tests.conftest import ROOT

MB = 1e6


def _run(clock: EventClock, *works) -> None:
    for work in works:
        clock.loop.spawn(work)
    clock.loop.run(until=clock.t + 1e6)


def test_gather_overlaps_in_fake_time_as_many_as_workers():
    clock = EventClock()
    ends: dict[int, list[float]] = {}

    def main(workers: int):
        start = clock.t

        def one(i):
            clock.sleep(1.0)
            return i * 10
        got = dict(clock.gather(one, [1, 2, 3], workers))
        assert got == {0: 10, 1: 20, 2: 30}
        ends.setdefault(workers, []).append(clock.t - start)

    _run(clock, lambda: main(3))
    _run(clock, lambda: main(1))
    assert ends[3] == [pytest.approx(1.0)]
    assert ends[1] == [pytest.approx(3.0)]  # one after another


def test_background_work_runs_beside_and_its_result_waits_in_fake_time():
    clock = EventClock()
    start, seen = clock.t, []

    def main():
        future = clock.background(lambda: (clock.sleep(5.0), "done")[1])
        clock.sleep(2.0)
        seen.append((future.done(), clock.t - start))
        seen.append((future.result(), clock.t - start))
    _run(clock, main)
    assert seen == [(False, pytest.approx(2.0)), ("done", pytest.approx(5.0))]


def test_a_flow_takes_its_bytes_over_the_slower_end_and_shares_a_busy_link():
    clock = EventClock()
    links = Links(clock.loop)
    links.add("a", Link(up=1 * MB, down=10 * MB, latency=0.01))
    links.add("b", Link(up=10 * MB, down=4 * MB, latency=0.02))
    links.add("c", Link(up=10 * MB, down=10 * MB, latency=0.03))
    start, landed = clock.t, {}

    def send(src, dst, nbytes, name):
        def work():
            done = links.send(src, dst, nbytes, "blob")
            clock.loop.wait(done)
            landed[name] = clock.t - start
        return work

    _run(clock, send("b", "a", 8 * MB, "alone"))  # 8 MB at min(10, 10) MB/s, then a round trip
    assert landed["alone"] == pytest.approx(0.8 + 2 * (0.02 + 0.01))
    start = clock.t = clock.t + 10
    # a's uplink (1 MB/s) carries two flows: each gets half until the small one lands, then all
    _run(clock, send("a", "b", 1 * MB, "small"), send("a", "c", 3 * MB, "big"))
    assert landed["small"] == pytest.approx(2.0 + 0.06)
    assert landed["big"] == pytest.approx(4.0 + 0.08)
    assert links.sent["a"]["blob"] == 4 * MB and links.received["c"]["blob"] == 3 * MB


def test_dht_records_live_on_the_nearest_reachable_nodes_and_leave_with_them():
    clock = EventClock()
    links = Links(clock.loop)
    net = SimNetwork(clock, links)
    nodes = []
    for i in range(12):
        name = f"n{i}"
        links.add(f"Qm{name}", Link(up=MB, down=MB, latency=0.01))
        net.join(f"Qm{name}", reachable=i % 4 != 0)  # every 4th behind NAT: a client, stores nothing
        nodes.append(SimDHT(net, f"Qm{name}"))
    found = []

    def main():
        assert nodes[0].store("k", {"v": 1}, clock.t + 100, subkey="s")  # a client can write
        holders = net.nearest("k")
        assert len(holders) == STORE_REPLICAS and all(int(h[3:]) % 4 != 0 for h in holders)
        assert all("k" in net.held[h] for h in holders)
        assert not any("k" in net.held[n] for n in net.held if n not in holders)
        found.append(nodes[5].get("k", beam_size=2).value["s"].value)
        for h in holders:  # every node that held it leaves: the record is gone
            net.leave(h)
        found.append(nodes[5].get("k"))
    _run(clock, main)
    assert found == [{"v": 1}, None]
    # the store at 5 nodes, the read of 2, the last read at the 4 reachable nodes left
    assert sum(links.requests.values()) == STORE_REPLICAS + 2 + 4
    assert links.sent["Qmn0"]["dht"] > 0


def test_blob_kinds_follow_the_names_the_protocol_gives_them():
    assert blob_kind("run/state") == "state"
    assert blob_kind("run/reduced/3/1/abc") == "reduced"
    assert blob_kind("run/contribution/3/peer/2/compact") == "contribution"


SMALL = dict(rounds=3, join_spread=10.0, churn_per_hour=0.9, step_seconds=0.2,
             wire_config=ROOT / "configs" / "vit-s32-imagenet100.yaml",
             sets=["lte.heads=4", "swarm.merge_grace=20"])
SCALES = {"state": 2000.0, "reduced": 2000.0, "contribution": 500.0}


def test_a_swarm_on_modelled_links_runs_the_real_protocol_and_replays_from_its_seed(tmp_path):
    runs = []
    for i in range(2):
        sim = SwarmSimulation(Scenario(volunteers=6, seed=3, **SMALL), tmp_path / str(i), scales=SCALES)
        report = sim.run(real_seconds=120)
        report.pop("real_seconds")
        runs.append(report)
    report = runs[0]
    assert report["cut_short"] is None and report["rounds"] == 3
    assert report["divergent_w"] == 0 and report["lost_contributions"] == 0 and report["doubled_contributions"] == 0
    assert report["members_per_round"] >= 1
    # blobs crossed modelled links: a round took seconds of fake time, and merges moved at their scaled size
    assert report["fake_hours"] * 3600 > 10
    assert report["volunteer_bytes_by_kind"]["reduced"][1] > 0 and report["volunteer_bytes_by_kind"]["contribution"][1] > 0
    assert 0 < report["train_fraction"] <= 1
    assert runs[1] == report  # the same seed, the same run, figure for figure


def test_the_command_reports_the_figures_others_script_against(capsys):
    """`scripts/simulate_swarm.py --json`, here in the emulated WAN's scenario (equal links, one head
    per volunteer): one JSON object per run with the documented fields."""
    import json

    from tests.conftest import load_script

    script = load_script("simulate_swarm")
    assert script.main(["--wan", "--volunteers", "2", "--samples", "2560", "--step-seconds", "0.05", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("volunteers", "rounds_per_hour", "train_fraction", "bytes_up_per_volunteer_round",
                 "bytes_down_per_volunteer_round", "coordinator_bytes_per_round", "divergent_w",
                 "lost_contributions", "doubled_contributions", "idle_fraction"):
        assert name in report, name
    assert report["volunteers"] == report["heads"] == 2 and report["rounds"] == 2 and report["cut_short"] is None
    assert report["members_per_round"] == 2 and report["bytes_up_per_volunteer_round"] > 1e6
    assert report["divergent_w"] == report["lost_contributions"] == report["doubled_contributions"] == 0


def test_a_download_of_w_is_waited_for_as_long_as_its_size_takes_on_a_slow_link():
    """ViT-S/32's 90 MB W to a newcomer on a 4 Mbit/s downlink takes three minutes: a bound that
    ignores W's size (four request timeouts, one minute) cuts every try short, for good."""
    from swarm.rounds.state_transfer import state_timeout
    from swarm.simnet import SimBlobServer

    clock = EventClock()
    links = Links(clock.loop)
    w_bytes = 90_100_000
    net = SimNetwork(clock, links, scales={"state": w_bytes / 1000})
    links.add("Qmdonor", Link(up=1000 * MB / 8, down=1000 * MB / 8, latency=0.01))
    links.add("Qmnew", Link(up=1 * MB / 8, down=4 * MB / 8, latency=0.05))
    servers = {}
    for name in ("Qmdonor", "Qmnew"):
        net.join(name, True)
        servers[name] = SimBlobServer(net, name)
    name = "run/state"
    assert blob_kind(name) == "state"
    servers["Qmdonor"].publish(name, b"w" * 1000)  # stands for 90.1 MB on the wire
    outcomes = []

    def fetch(timeout):
        def work():
            try:
                servers["Qmnew"].fetch("Qmdonor", name, timeout, 2000)
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 - the transport's error, as a peer sees it
                outcomes.append(type(exc).__name__)
        return work

    _run(clock, fetch(4 * 15.0))
    _run(clock, fetch(state_timeout(15.0, w_bytes)))
    assert outcomes == ["TransferError", "ok"]
