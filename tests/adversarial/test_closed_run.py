"""A closed run on loopback: real coordinator and peer processes, invites made with the command
line, and a rogue hivemind node that claims every head (back-dated by the clock skew the run
allows) from before anyone joined. Only the invited peers hold heads and merge; a peer without an
invite is told how to get one."""

from __future__ import annotations

import time

import pytest

from peers.local_swarm import LocalSwarm
from swarm import dht_io
from swarm.keys import RunKeys
from swarm.schemas import LeaseRecord
from tests.conftest import run_cli
from tests.harness import last, rogue_node, write_config

pytestmark = pytest.mark.timeout(300)


def test_a_closed_run_merges_its_invited_peers_only(tmp_path):
    config = write_config(tmp_path / "run.yaml", heads=2, merge_every=2, rounds=3, min_heads=2, closed=True)
    swarm = LocalSwarm(tmp_path, config)
    try:
        coordinator = swarm.start_coordinator()
        keys = RunKeys(swarm.run_id)

        def claim_every_head(dht, identity):
            for head in range(2):
                dht_io.store(dht, keys.leases, identity, LeaseRecord(head=head, claimed_at=time.time() - 9),
                              time.time() + 5, tag=str(head))

        with rogue_node(swarm, claim_every_head) as (rogue, identity):
            run_dir = tmp_path / "run"
            fingerprint = run_cli("key", tmp_path / "peer1.key").stdout.strip()
            for args in (["--out", tmp_path / "bearer.json"],
                         ["--member", fingerprint, "--out", tmp_path / "peer1.json"]):
                made = run_cli("invite", "--run-dir", run_dir, *args)
                assert made.exit_code == 0, made.stderr
            outsider = swarm.join("outsider")
            peers = [swarm.join("peer0", "--invite", str(tmp_path / "bearer.json"), "--throttle", "0.1"),
                     swarm.join("peer1", "--invite", str(tmp_path / "peer1.json"), "--signing-key",
                                str(tmp_path / "peer1.key"), "--throttle", "0.1")]
            assert outsider.wait(120) == 2 and "--invite" in outsider.tail(), outsider.tail()
            for p in peers:
                assert p.wait(240) == 0, p.tail()
            assert coordinator.wait(60) == 0, coordinator.tail()
            claimants = {who for (_, who) in dht_io.read(rogue, keys.leases, LeaseRecord, time.time())}
            assert identity.fingerprint in claimants
    finally:
        swarm.close()

    rounds = coordinator.of("round")
    honest = {last(p, "joined")["peer"] for p in peers}
    assert fingerprint in honest
    assert [r["new_round"] for r in rounds] == list(range(1, 4))
    assert all(set(r["members"]) == honest for r in rounds), [r["members"] for r in rounds]
    final = {p.name: last(p, "left")["digest"] for p in (*peers, coordinator)}
    assert len(set(final.values())) == 1, final
