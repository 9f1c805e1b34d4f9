"""`lte-swarm status` against a live loopback swarm, in a real terminal, and the signed records.

The live swarm is a closed run (real coordinator and peer processes, invites made with the command
line) that a rogue hivemind node attacks from before anyone joined, claiming every head back-dated
by the clock skew the run allows, which in an open run wins them (tests/adversarial/
test_membership.py). Only the invited peers hold heads and merge, a peer without an invite is
told how to get one, and the status view shows the members alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from hivemind.utils import get_dht_time

from peers.local_swarm import LocalSwarm
from swarm import dht_io
from swarm.keys import RunKeys
from swarm.schemas import LeaseRecord, PeerStatus
from tests.conftest import CLI, ROOT, run_cli
from tests.harness import last, rogue_node, write_config

pytestmark = pytest.mark.timeout(420)
processes = pytest.mark.xdist_group("processes")


@pytest.fixture(scope="module")
def live_swarm(tmp_path_factory):
    """A closed run of 3 heads: peer0 with a bearer invite, peer1 with an invite for the key it
    signs with, an outsider without one; a rogue node claiming every head throughout."""
    tmp = tmp_path_factory.mktemp("status")
    swarm = LocalSwarm(tmp, write_config(tmp / "run.yaml", heads=3, merge_every=2, rounds=400, min_heads=2, closed=True))
    try:
        swarm.start_coordinator()
        keys = RunKeys(swarm.run_id)

        def claim_every_head(dht, identity):
            for head in range(3):
                dht_io.store(dht, keys.leases, identity, LeaseRecord(head=head, claimed_at=time.time() - 9),
                              time.time() + 5, tag=str(head))

        with rogue_node(swarm, claim_every_head) as (rogue, rogue_identity):
            fingerprint = run_cli("key", tmp / "peer1.key").stdout.strip()
            for args in (["--out", tmp / "bearer.json"], ["--member", fingerprint, "--out", tmp / "peer1.json"]):
                made = run_cli("invite", "--run-dir", tmp / "run", *args)
                assert made.exit_code == 0, made.stderr
            outsider = swarm.join("outsider")
            peers = [swarm.join("peer0", "--invite", str(tmp / "bearer.json"), "--throttle", "0.3"),
                     swarm.join("peer1", "--invite", str(tmp / "peer1.json"), "--signing-key", str(tmp / "peer1.key"),
                                "--throttle", "0.3")]
            for p in peers:
                p.wait_for(lambda es: any(e["event"] == "round" for e in es), 180, "a merge round")
            swarm.coordinator.wait_for(lambda es: any(e["event"] == "round" for e in es), 60, "a merge round")
            yield swarm, peers, dict(outsider=outsider, fingerprint=fingerprint, rogue=rogue,
                                     rogue_fingerprint=rogue_identity.fingerprint)
    finally:
        swarm.close()


def _status(swarm, *args):
    return run_cli("status", "--initial-peers", *swarm.maddrs, *args)


@processes
def test_the_closed_run_merges_its_invited_peers_only(live_swarm):
    swarm, peers, extra = live_swarm
    outsider = extra["outsider"]
    assert outsider.wait(120) == 2 and "--invite" in outsider.tail(), outsider.tail()
    swarm.coordinator.wait_for(lambda es: any(e["event"] == "round" and e["new_round"] >= 3 for e in es), 120,
                               "round 3")
    keys = RunKeys(swarm.run_id)
    claimants = {who for (_, who) in dht_io.read(extra["rogue"], keys.leases, LeaseRecord, time.time())}
    assert extra["rogue_fingerprint"] in claimants  # the attack was real: its claims are in the DHT
    honest = {last(p, "joined")["peer"] for p in peers}
    assert extra["fingerprint"] in honest  # peer1 signs with the key its invite names
    rounds = swarm.coordinator.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, len(rounds) + 1)), rounds
    assert all(set(r["members"]) == honest for r in rounds), [r["members"] for r in rounds]
    agreed = {r["new_round"]: r["digest"] for r in rounds}
    for p in peers:
        merged = [r for r in p.of("round") if r["new_round"] in agreed]
        assert len(merged) >= 3 and all(r["digest"] == agreed[r["new_round"]] for r in merged), (p.name, merged)


@processes
def test_status_json_reports_both_peers_their_heads_and_the_round(live_swarm):
    swarm, peers, _ = live_swarm
    before = max(e["new_round"] for e in swarm.coordinator.of("round"))
    result = _status(swarm, "--json")
    after = max(e["new_round"] for e in swarm.coordinator.of("round"))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    snap = json.loads(result.stdout.strip().splitlines()[-1])
    ids = {p.of("joined")[0]["peer"] for p in peers}
    assert snap["run_id"] == swarm.run_id
    assert {s["peer"] for s in snap["peers"]} == ids
    held = {p.of("joined")[0]["peer"]: p.of("heads")[-1]["heads"] for p in peers}
    for s in snap["peers"]:
        assert s["heads"] == held[s["peer"]]
    by_head = {h["head"]: h for h in snap["heads"]}
    for peer, heads in held.items():
        for h in heads:
            assert by_head[h]["peer"] == peer and by_head[h]["state"] != "free"
    assert [h["state"] for h in snap["heads"]].count("free") == 1  # 3 heads, 2 peers
    assert 1 <= before <= snap["round"] <= after + 1
    assert snap["history"] and snap["agree"] in (True, None)


@processes
@pytest.mark.parametrize("columns", [80, 200])
def test_status_once_renders_at_any_width(live_swarm, columns, monkeypatch):
    swarm, peers, _ = live_swarm
    monkeypatch.setenv("COLUMNS", str(columns))  # what rich sizes a console that is not a terminal by
    result = _status(swarm, "--once")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    text = result.stdout
    assert f"run {swarm.run_id}" in text and "heads" in text and "peers (2)" in text
    for p in peers:
        assert p.of("joined")[0]["peer"][-8:] in text


@processes
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_live_view_in_a_real_terminal(live_swarm, tmp_path):
    swarm, peers, _ = live_swarm
    session = f"lte-status-{os.getpid()}"
    command = " ".join([*CLI, "status", "--interval", "1", "--initial-peers", *swarm.maddrs])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", f"cd {ROOT} && {command}"], check=True)
    try:
        deadline = time.monotonic() + 90
        pane = ""
        while time.monotonic() < deadline:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            if "peers (2)" in pane and all(p.of("joined")[0]["peer"][-8:] in pane for p in peers):
                break
            time.sleep(1)
        assert "heads" in pane and "free" in pane and "orphaned" in pane, pane  # the head map and its legend
        assert "peers (2)" in pane, pane
        for p in peers:
            assert p.of("joined")[0]["peer"][-8:] in pane, pane
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        time.sleep(3)
        pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        assert "Traceback" not in pane, pane
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_no_reachable_peer_is_one_line_and_nonzero():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRzhwoMVtyVwTj6gRYNKTqUryrE8Ru1rgsyZNUZfzi78w"
    result = run_cli("status", "--once", "--initial-peers", dead)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.stderr[-2000:], result.exception)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]


RUN = "run-a-" + "0" * 20


@pytest.fixture
def two_nodes():
    import hivemind

    from peers.node import install_run_validators, install_signing
    from swarm.identity import Identity

    loopback = ["/ip4/127.0.0.1/tcp/0"]
    a = hivemind.DHT(start=True, host_maddrs=loopback)
    b = hivemind.DHT(start=True, host_maddrs=loopback, initial_peers=a.get_visible_maddrs())
    identities = [Identity(), Identity()]
    for dht, identity in zip((a, b), identities):
        install_signing(dht, identity)
        install_run_validators(dht, RUN)
    yield (a, b), identities
    b.shutdown()
    a.shutdown()


def _status_record(run_id=RUN, **changes):
    record = dict(run_id=run_id, peer="0" * 20, state="training", heads=[0], round=1, step=2, last_merged_round=0,
                  loss=1.5, samples_per_second=10.0, bytes_sent=1, bytes_received=2, device="cpu", storage="nf4",
                  digest="d" * 64, time=time.time())
    record.update(changes)
    return record


def test_forged_malformed_and_foreign_status_records_are_rejected(two_nodes):
    from swarm.keys import RunKeys
    from swarm.dht_io import publish_status, read_statuses

    (a, b), (id_a, id_b) = two_nodes
    keys = RunKeys(RUN)
    key = keys.peers
    expiration = get_dht_time() + 30
    honest = PeerStatus.model_validate(_status_record(peer=id_a.fingerprint))
    assert publish_status(a, keys, id_a, honest, expiration, roster_expiration=expiration)
    # forged: a writes under b's public key
    assert not a.store(key, _status_record(peer=id_b.fingerprint), expiration, subkey=id_b.subkey())
    # wrong schema (a missing field, a mistyped field, an unknown state), written raw, bypassing
    # PeerStatus as a stranger would: the DHT's own validators reject them
    bad = _status_record(peer=id_b.fingerprint)
    del bad["digest"]
    for record in (bad, _status_record(peer=id_b.fingerprint, round="1"),
                   _status_record(peer=id_b.fingerprint, state="sleeping")):
        assert not b.store(key, record, expiration, subkey=id_b.subkey())
    # another run's record under this run's key
    assert not b.store(key, _status_record(run_id="run-b", peer=id_b.fingerprint), expiration, subkey=id_b.subkey())
    # a well-formed status that names another peer than its writer is stored, but never believed
    assert publish_status(b, keys, id_b, PeerStatus.model_validate(_status_record(peer=id_a.fingerprint)),
                          expiration, roster_expiration=expiration)
    time.sleep(0.5)
    for node in (a, b):
        assert [s.peer for s in read_statuses(node, keys, get_dht_time())] == [id_a.fingerprint]


def test_a_peers_own_live_record_is_shown_when_newer_than_its_copy_in_the_list(two_nodes):
    """The live record supersedes the listed copy only when it is newer and its own: another
    writer's record under a peer's live key, or another run's, is never shown."""
    from swarm.keys import RunKeys
    from swarm.dht_io import publish_status, read_statuses

    (a, b), (id_a, id_b) = two_nodes
    keys = RunKeys("run-c-" + "0" * 20)
    expiration = get_dht_time() + 30
    listed = PeerStatus.model_validate(_status_record(run_id=keys.run_id, peer=id_a.fingerprint, step=1))
    assert publish_status(a, keys, id_a, listed, expiration, roster_expiration=expiration)
    time.sleep(0.3)
    assert [s.step for s in read_statuses(b, keys, get_dht_time())] == [1]
    # b writes records of its own under a's live key: newer, naming a or another run; never shown
    forged = _status_record(run_id=keys.run_id, peer=id_a.fingerprint, step=9, time=time.time() + 5)
    assert b.store(keys.status(id_a.fingerprint), forged, expiration, subkey=id_b.subkey())
    foreign = _status_record(run_id="run-b", peer=id_a.fingerprint, step=8, time=time.time() + 5)
    assert a.store(keys.status(id_a.fingerprint), foreign, expiration + 1, subkey=id_a.subkey())
    time.sleep(0.3)
    assert [s.step for s in read_statuses(b, keys, get_dht_time())] == [1]
    # a's own newer live record (not in the list) is what the view shows
    live = PeerStatus.model_validate(_status_record(run_id=keys.run_id, peer=id_a.fingerprint, step=2,
                                                    time=time.time() + 10))
    assert publish_status(a, keys, id_a, live, expiration + 2)  # a record replaces one that expires sooner
    time.sleep(0.3)
    assert [s.step for s in read_statuses(b, keys, get_dht_time())] == [2]


def test_the_status_record_and_its_dht_side_twin_agree_field_for_field():
    from pydantic import ValidationError

    from swarm.schemas import PeerStatusV1

    assert set(PeerStatus.model_fields) == set(PeerStatusV1.__fields__)
    good = _status_record()
    PeerStatus.model_validate(good), PeerStatusV1.parse_obj(good)
    for change in ({"round": "1"}, {"state": "sleeping"}, {"heads": [-1]}, {"samples_per_second": -1.0},
                   {"bytes_sent": 1.5}, {"extra": 1}):
        with pytest.raises(ValidationError):
            PeerStatus.model_validate({**good, **change})
        with pytest.raises(Exception):
            PeerStatusV1.parse_obj({**good, **change})


@processes
def test_export_from_a_live_swarm_loads_into_timm(live_swarm, tmp_path):
    from tests.test_demo import _evaluate_export

    swarm, _, _ = live_swarm
    out = tmp_path / "live.safetensors"
    refused = run_cli("export", "--initial-peers", *swarm.maddrs, "--out", out)  # a closed run serves members only
    assert refused.exit_code != 0 and "--invite" in refused.stderr, refused.stderr
    made = run_cli("invite", "--run-dir", swarm.workdir / "run", "--out", tmp_path / "export.json")
    assert made.exit_code == 0, made.stderr
    result = run_cli("export", "--initial-peers", *swarm.maddrs, "--invite", tmp_path / "export.json", "--out", out)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    accuracy, meta = _evaluate_export(out)
    assert meta["round"] >= 1 and 0.0 <= accuracy <= 1.0
