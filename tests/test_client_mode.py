"""Peers that cannot accept connections (behind NAT, hivemind's client mode) on the in-memory
network, where nobody can fetch from them: they push their contributions to peers that can, never
own a part of W, never hand out W, and the swarm merges exactly what it merges without them
behind NAT."""

from __future__ import annotations

import hashlib

import pytest

from swarm import dht_io
from swarm.schemas import DonorRecord, PartRecord
from swarm.transport import Inbox
from tests.memswarm import MemorySwarm, tiny_config

pytestmark = pytest.mark.timeout(240)

ROUNDS = 3


def _run(tmp_path, name: str, reachable: list[bool], **swarm) -> MemorySwarm:
    peers = len(reachable)
    cfg = tiny_config(heads=peers, merge_every=2, rounds=ROUNDS, min_heads=peers, **swarm)
    mem = MemorySwarm(cfg, tmp_path / name)
    mem.coordinator()
    for i, ok in enumerate(reachable):
        mem.trainer(f"p{i}", reachable=ok)
    mem.run()
    assert all(n.state == "finished" for n in mem.nodes.values()), {k: n.state for k, n in mem.nodes.items()}
    assert len(set(mem.digests().values())) == 1, mem.digests()
    for i in range(peers):  # every peer's contribution is in every round
        rounds = mem[f"p{i}"].events.of("round")
        assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1)), rounds
        assert all(r["merged"] and len(r["members"]) == peers and not r["resynced"] for r in rounds), rounds
    return mem


@pytest.mark.parametrize("merge", ["reduce", "gather"])
def test_peers_behind_nat_contribute_by_pushing_and_the_merge_is_unchanged(tmp_path, merge):
    behind = _run(tmp_path, "nat", [True, False, True, False, True], merge=merge)
    direct = _run(tmp_path, "direct", [True] * 5, merge=merge)
    # The same contributions summed in the same order: the same W, whoever could be reached.
    assert set(behind.digests().values()) == set(direct.digests().values())
    clients = {behind[f"p{i}"].rt.peer for i in (1, 3)}
    for node in ("p1", "p3"):
        assert behind[node].role.server.bytes_sent > 0  # what it sent, it pushed: nobody can fetch from it
    reader = behind["coordinator"].rt.dht
    now = behind.clock.now()
    for r in range(ROUNDS if merge == "reduce" else 0):
        writers = {w for (_, w) in dht_io.read(reader, behind["p0"].role.keys.parts(r), PartRecord, now)}
        assert writers and not writers & clients, writers  # never an owner
    donors = dht_io.by_writer(dht_io.read(reader, behind["p0"].role.keys.donors, DonorRecord, now))
    assert not set(donors) & clients  # never hands out W


def test_peers_all_behind_nat_merge_through_the_coordinator(tmp_path):
    """No volunteer can be reached: each pushes its contribution to the coordinator, and fetches
    the others' from it."""
    _run(tmp_path, "all", [False, False, False])


def test_the_inbox_keeps_pushes_by_digest_within_its_budgets():
    now = [0.0]
    inbox = Inbox(limit_bytes=10, keep_seconds=60, clock=lambda: now[0], per_sender_bytes=7)
    first = inbox.put(b"abcdef", "a")
    assert first == hashlib.sha256(b"abcdef").hexdigest() and inbox.get(first) == b"abcdef"
    assert inbox.put(b"ghijkl", "b") is None  # over the budget of all senders: refused, the first one kept
    assert inbox.put(b"abcdef", "b") == first  # the same blob again costs nothing
    assert inbox.put(b"12345678", "b") is None  # more than one sender may hold
    newer = inbox.put(b"mnop", "a")  # a sender's own older push makes room for its newer one
    assert newer is not None and inbox.get(first) is None and inbox.get(newer) == b"mnop"
    assert inbox.put(b"1234567", "b") is None and inbox.get(newer) == b"mnop"  # never at another sender's cost
    now[0] = 61.0
    assert inbox.put(b"ghijkl", "b") is not None and inbox.get(newer) is None  # old pushes expire


def test_the_inbox_admits_by_its_rule_and_caps_each_senders_streams():
    inbox = Inbox(limit_bytes=100, max_streams=2)
    inbox.admits = lambda sender: sender.startswith("member")
    assert inbox.admit("member-1") and not inbox.admit("stranger")

    def broken(sender):
        raise RuntimeError("no DHT")
    inbox.admits = broken
    assert not inbox.admit("member-1")  # a rule that fails admits nobody
    assert inbox.open_stream("m") and inbox.open_stream("m") and not inbox.open_stream("m")
    assert inbox.open_stream("n")  # per sender
    inbox.close_stream("m")
    assert inbox.open_stream("m")


def test_a_peer_behind_nat_contributes_round_after_round(tmp_path):
    """The digits model of the loopback swarm tests (tests/harness.py), 7 quick rounds: the peer
    behind NAT is a member of every one of them (its older pushes make room for its newer ones in
    the inboxes of the peers it pushes to)."""
    from swarm.config import load_config
    from tests.harness import write_config

    rounds = 7
    cfg = load_config(write_config(tmp_path / "run.yaml", heads=3, merge_every=2, rounds=rounds, min_heads=3))
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i, ok in enumerate([True, True, False]):
        mem.trainer(f"p{i}", reachable=ok)
    mem.run()
    assert all(n.state == "finished" for n in mem.nodes.values())
    members = [len(r["members"]) for r in mem["coordinator"].events.of("round")]
    assert members == [3] * rounds, members
