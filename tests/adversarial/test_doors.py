"""Who may push into a peer's inbox: only a member that says in a counted ready record that it
pushes (its address is the libp2p peer id the transport authenticates). A stranger, or a member
that does not push, is refused at once, whatever it sends, and a member behind NAT still merges
in every round (the real transport's side of this is in tests/test_transport.py)."""

from __future__ import annotations

import pytest

from swarm.memnet import MemoryBlobServer
from swarm.transport import TransferError
from tests.memswarm import MemorySwarm

pytestmark = pytest.mark.timeout(240)


def test_strangers_and_members_that_do_not_push_cannot_fill_an_inbox(tmp_path):
    from swarm.config import load_config
    from tests.harness import write_config

    rounds = 4
    cfg = load_config(write_config(tmp_path / "run.yaml", heads=3, merge_every=2, rounds=rounds, min_heads=3))
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i, ok in enumerate([True, True, False]):
        mem.trainer(f"p{i}", reachable=ok)
    stranger = MemoryBlobServer(mem.net, "QmStranger")
    reachable = {n: mem[n].rt.dht.peer_id for n in ("coordinator", "p0", "p1")}
    refused = []

    def flood(swarm) -> bool:
        """Push junk to every reachable node, as a stranger and as member p0 (which is reachable
        and pushes nothing), whenever the swarm is in a round."""
        rounds = [n.role.protocol.round for n in swarm.running() if getattr(n.role, "protocol", None) is not None]
        if len(rounds) == 4 and min(rounds) >= 1 and not refused:
            for name, peer in reachable.items():
                for who in (stranger, mem["p0"].role.server):
                    if who is mem["p0"].role.server and name == "p0":
                        continue
                    try:
                        who.push(str(peer), b"junk" * 1000, timeout=5)
                    except TransferError:
                        refused.append((who.peer, name))
        return False

    with pytest.raises(AssertionError, match="every node ended"):
        mem.run(until=flood)
    assert len(refused) == 5  # 3 nodes by the stranger, 2 by p0 (not itself)
    assert all(n.state == "finished" for n in mem.nodes.values())
    for name in reachable:
        senders = {who for _, _, who in mem[name].role.server.inbox._blobs.values()}
        assert senders <= {str(mem["p2"].rt.dht.peer_id)}
    members = [len(r["members"]) for r in mem["coordinator"].events.of("round")]
    assert members == [3] * rounds, members


def test_a_member_that_trickles_costs_each_peer_one_timeout_a_round_not_one_per_part(tmp_path):
    """A member whose every fetch runs into the request timeout (it answers, then trickles) is
    asked once a round by each peer that needs its blobs, then skipped for its other parts; the
    others merge without it."""
    from swarm.config import load_config
    from tests.harness import write_config

    rounds = 3
    cfg = load_config(write_config(tmp_path / "run.yaml", heads=4, merge_every=2, rounds=rounds, min_heads=4,
                                   part_owners=1, parts=16))
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(4):
        mem.trainer(f"p{i}")
    slow = mem["p3"].role.server
    slow.stall = 1e9
    mem.run()
    assert all(n.state == "finished" for n in mem.nodes.values())
    merged = [r for r in mem["coordinator"].events.of("round") if r["members"]]
    assert merged and all(len(r["members"]) == 3 for r in merged)  # merged without it
    # each of the other 4 nodes asked it at most once a round (parts: 16, so it owns several)
    assert 0 < slow.stalled_fetches <= 4 * rounds, slow.stalled_fetches
