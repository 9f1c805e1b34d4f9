"""The owner-reduced merge on the in-memory network: W cut into parts, two of the round's
contributors reduce each part, everyone applies the same reduced values. It must give every peer
the same W, exactly what the all-gather merge gives (in every precision on the wire), bytes per
peer that do not grow with the swarm, and survive owners that die or lie."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peers.trainer import Trainer
from swarm.rounds import collection as collection_module
from swarm.rounds import reduction as reduction_module
from swarm import dht_io
from swarm.rounds import MergeProtocol, owners, plan
from swarm.rounds.agreement import order
from swarm.rounds.reduction import Reduction
from swarm.schemas import PartRecord
from swarm.wire import factors_digest, part_factors, plan_parts
from tests.memswarm import MemorySwarm, tiny_config, with_protocol

pytestmark = pytest.mark.timeout(180)

ROUNDS = 4


def _swarm(tmp_path, name: str, peers: int, merge: str = "reduce", roles: dict | None = None, **swarm) -> MemorySwarm:
    cfg = tiny_config(heads=peers, merge_every=2, rounds=ROUNDS, min_heads=peers, merge=merge, **swarm)
    mem = MemorySwarm(cfg, tmp_path / name)
    mem.coordinator()
    for i in range(peers):
        mem.trainer(f"p{i}", role=(roles or {}).get(f"p{i}", Trainer))
    return mem


def _trainers(mem: MemorySwarm) -> list[str]:
    return [n for n in mem.nodes if n != "coordinator"]


def _received_per_peer_round(mem: MemorySwarm) -> float:
    """Bytes a peer downloads per round, mean over peers, from the second round on (the first
    includes fetching W on joining)."""
    totals = []
    for name in _trainers(mem):
        rounds = mem[name].events.of("round")
        totals += [b["bytes_received"] - a["bytes_received"] for a, b in zip(rounds, rounds[1:])]
    return sum(totals) / len(totals)


def test_parts_cover_every_target_once_and_are_balanced(tmp_path):
    mem = _swarm(tmp_path, "plan", 1)
    model = mem["p0"].role.model
    for n in (1, 3, 7, 1000):
        parts = plan_parts(model, n)
        names = [x for p in parts for x in p]
        assert sorted(names) == sorted(set(names)) and set(names) == set(model.layer_names) | set(model.replicated)
        assert all(parts) and len(parts) == min(n, len(names))
    members = ["a", "b", "c", "d"]
    assert [owners(i, members) for i in range(5)] == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a"), ("a", "b")]
    assert [owners(i, members, 1) for i in range(5)] == [("a",), ("b",), ("c",), ("d",), ("a",)]
    assert owners(3, ["a"]) == ("a",)


@pytest.mark.parametrize("wire", [("fp32", "fp32"), ("bf16", "int8")], ids=["fp32", "bf16-int8"])
def test_reduced_merge_agrees_everywhere_and_matches_the_gather(tmp_path, wire):
    dtypes = {"contribution_dtype": wire[0], "reduced_dtype": wire[1]}
    reduced = _swarm(tmp_path, "reduce", 4, **dtypes)
    reduced.run()
    gathered = _swarm(tmp_path, "gather", 4, merge="gather", **dtypes)
    gathered.run()
    for mem in (reduced, gathered):
        assert all(n.state == "finished" for n in mem.nodes.values())
        rounds = mem["coordinator"].events.of("round")
        assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
        assert all(len(r["members"]) == 4 for r in rounds)
        assert len(set(mem.digests().values())) == 1
    assert not any(r["resynced"] for n in _trainers(reduced) for r in reduced[n].events.of("round"))
    _each_owner_announced_its_parts_in_one_record(reduced)
    a = reduced["coordinator"].role.model.shared_state()
    b = gathered["coordinator"].role.model.shared_state()
    assert a.keys() == b.keys()
    for key in a:  # the same sums, rounded the same way whoever reduces them
        assert torch.equal(a[key], b[key]), key


def _each_owner_announced_its_parts_in_one_record(mem: MemorySwarm) -> None:
    """Every round's part key holds one record per owner (a read costs its records' signatures)
    that names every part the owner reduces, over the round's members."""
    dht, keys, n_parts = mem["coordinator"].rt.dht, mem["p0"].role.keys, len(mem["p0"].role.protocol.parts)
    for r in mem["coordinator"].events.of("round"):
        members = sorted(r["members"])
        found = dht_io.read(dht, keys.parts(r["round"]), PartRecord, mem.clock.now())
        assert {tag for tag, _ in found} == {""} and {who for _, who in found} == set(members)
        servers = plan.servers({m: SimpleNamespace(pushed=None) for m in members}, order(mem["coordinator"].role.protocol.ctx, r["round"]))
        for (_, who), (record, _) in found.items():
            mine = {i for i in range(n_parts) if who in owners(i, servers)}
            assert {part for part, _, _ in record.reduced()} == mine
            assert all(list(summed) == members for _, summed, _ in record.reduced())


def test_bytes_per_peer_do_not_grow_with_the_swarm(tmp_path):
    received = {}
    for merge, owners_ in (("reduce", 2), ("reduce", 1), ("gather", 2)):
        for peers in (4, 8):
            mem = _swarm(tmp_path, f"{merge}{owners_}-{peers}", peers, merge=merge, parts=32, part_owners=owners_)
            mem.run()
            assert len(set(mem.digests().values())) == 1
            received[merge, owners_, peers] = _received_per_peer_round(mem)
    assert received["gather", 2, 8] > 1.8 * received["gather", 2, 4]  # (peers - 1) contributions
    assert received["reduce", 2, 8] < 1.3 * received["reduce", 2, 4], received
    assert received["reduce", 1, 8] < 1.2 * received["reduce", 1, 4], received  # (P - 1) / P of one W and C
    assert received["reduce", 1, 8] < 0.8 * received["reduce", 2, 8], received
    assert received["reduce", 2, 8] < received["gather", 2, 8] / 2, received


def _count_dht_calls(mem: MemorySwarm) -> dict[str, list[str]]:
    """'get' / 'store' -> the keys every node of `mem` reads and writes from now on."""
    calls: dict[str, list[str]] = {"get": [], "store": []}
    for name in mem.nodes:
        dht = mem[name].role.dht
        for verb in calls:
            def counted(key, *args, _real=getattr(dht, verb), _log=calls[verb], **kw):
                _log.append(key)
                return _real(key, *args, **kw)
            setattr(dht, verb, counted)
    return calls


@pytest.mark.parametrize("part_owners", [1, 2])
def test_with_one_owner_per_part_only_the_coordinators_record_of_the_parts_is_read(tmp_path, part_owners):
    """One owner's sum is checked by the coordinator's alone, so its one record is all a peer reads
    to trust and find every part, and the owners announce nothing (every read of a key carries
    a record per owner). Two owners check each other: their records are read, none of the
    coordinator's. Either way every part comes from both of its sources and W agrees."""
    peers = 6
    mem = _swarm(tmp_path, f"sums{part_owners}", peers, parts=12, part_owners=part_owners)
    calls = _count_dht_calls(mem)
    log = _record_fetches(mem)
    mem.run()
    assert all(mem[n].state == "finished" for n in mem.nodes)
    assert len(set(mem.digests().values())) == 1
    parts_read = [k for k in calls["get"] if k.endswith("_parts")]
    sums_read = [k for k in calls["get"] if k.endswith("_sums")]
    parts_stored = [k for k in calls["store"] if k.endswith("_parts")]
    sums_stored = [k for k in calls["store"] if k.endswith("_sums")]
    if part_owners == 1:
        assert not parts_read and not parts_stored, (parts_read[:3], parts_stored[:3])
        assert len(set(sums_read)) >= ROUNDS - 1 and len(set(sums_stored)) >= ROUNDS - 1
    else:
        assert not sums_read, sums_read[:3]
        assert len(set(parts_read)) >= ROUNDS - 1 and len(set(parts_stored)) >= ROUNDS - 1
    sources: dict[tuple[str, str], set[str]] = {}
    for f in log:
        what = f["blob"].split("/")
        if what[1] == "reduced":
            sources.setdefault((what[2], what[3]), set()).add(f["to"])
    assert len(sources) >= 12 * (ROUNDS - 1) and all(len(s) == 2 for s in sources.values()), sources
    for name in _trainers(mem):
        assert not any(r.get("resynced") for r in mem[name].events.of("round")), name


class _SilentOwner(Reduction):
    """Contributes, then never reduces or publishes the parts it owns."""

    def reduce_part(self, mr, work, i, members, publish):
        return super().reduce_part(mr, work, i, members, publish=False)


class _LyingOwner(Reduction):
    """Publishes reductions with every value doubled (its own W is merged from them too)."""

    def reduce_part(self, mr, work, i, members, publish):
        original = reduction_module.reduced_tensors
        reduction_module.reduced_tensors = lambda totals, dtype, dither=None: original(
            {k: 2 * v for k, v in totals.items()}, dtype, dither)
        try:
            return super().reduce_part(mr, work, i, members, publish)
        finally:
            reduction_module.reduced_tensors = original


@pytest.mark.parametrize("part_owners", [2, 1])
@pytest.mark.parametrize("owner", [_SilentOwner, _LyingOwner], ids=["silent", "lying"])
def test_an_owner_that_stays_silent_or_lies_changes_nothing(tmp_path, owner, part_owners):
    """Checked by the part's other owner, or (one owner per part) by the coordinator's sum."""
    baseline = _swarm(tmp_path, "baseline", 4, part_owners=part_owners)
    baseline.run()
    attacked = _swarm(tmp_path, "attacked", 4, roles={"p1": with_protocol(owner, "reduction")}, part_owners=part_owners)
    attacked.run()
    honest = ("coordinator", "p0", "p2", "p3")
    assert all(attacked[n].state == "finished" for n in attacked.nodes)
    rounds = attacked["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(len(r["members"]) == 4 for r in rounds)  # its contribution still counts
    assert attacked.digests(*honest) == baseline.digests(*honest)


def test_an_owner_killed_mid_round_loses_and_doubles_nothing(tmp_path):
    mem = _swarm(tmp_path, "crash", 4)
    victim = mem["p2"]

    def victim_is_reducing(s):
        mr = victim.role.mr
        return mr is not None and mr.round == 1 and mr.step.value == "reducing"

    mem.run(until=victim_is_reducing)
    mem.crash("p2")
    mem.run()
    rounds = mem["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    alive = ("coordinator", "p0", "p1", "p3")
    assert all(mem[n].state == "finished" for n in alive)
    assert len(set(mem.digests(*alive).values())) == 1
    # every surviving peer's work went in exactly once per round it took part in
    for name in ("p0", "p1", "p3"):
        for r in mem[name].events.of("round"):
            assert r["merged"] or r["missed"], r


def test_with_one_owner_per_part_a_coordinator_killed_mid_round_costs_one_grace(tmp_path):
    """Only the coordinator's record vouches for a part then: once it is gone, the peers wait one
    grace from when they began collecting the parts, fetch every part raw, and agree."""
    mem = _swarm(tmp_path, "coordinator-crash", 4, part_owners=1)
    grace = mem["p0"].role.protocol.cfg.merge_grace

    def reducing(s):
        mr = s["p0"].role.mr
        return mr is not None and mr.round == 1 and mr.step.value == "reducing"

    def round_one_done(s):
        return all(any(r["round"] == 1 for r in s[n].events.of("round")) for n in _trainers(s))

    mem.run(until=reducing)
    mem.crash("coordinator")
    mem.run(until=round_one_done)
    ends = {n: next(r for r in mem[n].events.of("round") if r["round"] == 1) for n in _trainers(mem)}
    assert all(r["merged"] and not r["resynced"] for r in ends.values()), ends
    assert all(r["raw_parts"] > 0 for r in ends.values()), ends  # the coordinator's sums never came
    assert len({mem[n].role.protocol.model.state_digest() for n in _trainers(mem)
                if mem[n].role.protocol.round == 2}) == 1
    for name, r in ends.items():
        phases = r["phases"]
        assert phases["final"] - phases["reduced_own"] < grace + 3.0, (name, phases)


def test_two_colluding_owners_cannot_change_the_agreed_w(tmp_path):
    """Both owners of some parts double them alike, so their digests agree and the other peers
    apply those parts; the coordinator reduces every part itself, its W is the agreed one, and
    whoever applied the doubled parts re-syncs to it. (The liars are two members that own a part
    together in the epoch's order, which only the coordinator's beacon tells.)"""
    baseline = _swarm(tmp_path, "baseline", 4)
    baseline.run()
    liars = set(co_owners(baseline, [f"p{i}" for i in range(4)], 0)[0])
    attacked = _swarm(tmp_path, "attacked", 4, roles={n: with_protocol(_LyingOwner, "reduction") for n in liars})
    attacked.run()
    assert all(attacked[n].state == "finished" for n in attacked.nodes)
    rounds = attacked["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert attacked.digests() == baseline.digests()
    fooled = [n for n in _trainers(attacked) if n not in liars]
    assert all(r["resynced"] for n in fooled for r in attacked[n].events.of("round"))


def co_owners(mem: MemorySwarm, names: list[str], r: int) -> list[tuple[str, ...]]:
    """Who owns each part of round r together, were `names` its members (all reachable): in the
    order the coordinator's beacon of the round's epoch draws."""
    from tests.memswarm import named_identity

    by_fp = {named_identity(n).fingerprint: n for n in names}
    protocol = mem["coordinator"].role.protocol
    servers = plan.servers({fp: SimpleNamespace(pushed=None) for fp in by_fp}, order(protocol.ctx, r))
    return [tuple(sorted(by_fp[o] for o in owners(i, servers))) for i in range(len(protocol.parts))]


def test_a_round_waiting_on_a_silent_owner_polls_the_dht_less_and_less(tmp_path):
    """While the parts' records are awaited (here, a silent owner's until the grace ends), polls
    back off up to swarm.poll_max_seconds: the same W, with far fewer DHT reads."""
    reads, digests = {}, {}
    for cap in (0.1, 2.0):  # 0.1 = poll_seconds: no back-off
        mem = _swarm(tmp_path, f"cap{cap}", 4, roles={"p1": with_protocol(_SilentOwner, "reduction")}, poll_max_seconds=cap)
        dht = mem["p0"].role.dht
        calls = []
        real_get = dht.get

        def counting_get(key, *args, _real=real_get, _calls=calls, **kw):
            _calls.append(key)
            return _real(key, *args, **kw)

        dht.get = counting_get
        mem.run()
        assert all(mem[n].state == "finished" for n in mem.nodes)
        reads[cap], digests[cap] = len(calls), mem.digests("coordinator", "p0", "p2", "p3")
    assert digests[0.1] == digests[2.0]
    assert reads[2.0] < 0.6 * reads[0.1], reads


def test_a_download_cut_short_once_is_fetched_again_and_leaves_nobody_out(tmp_path):
    """One of p0's downloads of p2's contribution fails once (a stream reset on a busy link): p0
    fetches it again, so every part's owners agree and no peer falls back or re-syncs."""
    baseline = _swarm(tmp_path, "baseline", 4)
    baseline.run()
    mem = _swarm(tmp_path, "flaky", 4)
    server, victim = mem["p0"].role.server, mem["p2"].rt.p2p
    fetch, failed = server.fetch, []

    def flaky_fetch(peer, name, timeout, max_bytes):
        if str(peer) == victim and "/contribution/" in name and not failed:
            failed.append(name)
            raise collection_module.TransferError(f"{str(peer)[-8:]} sent 0 of 100 bytes for {name}")
        return fetch(peer, name, timeout, max_bytes)

    server.fetch = flaky_fetch
    mem.run()
    assert failed, "the failure was never injected"
    for name in _trainers(mem):
        for r in mem[name].events.of("round"):
            assert r["merged"] and len(r["members"]) == 4 and not r["resynced"] and r["raw_parts"] == 0, (name, r)
    assert mem.digests() == baseline.digests()


def _record_fetches(mem: MemorySwarm) -> list[dict]:
    """Every blob request of every peer, in order: who asked whom for what, and whether the asking
    peer knew its round's final set of contributors at the time."""
    log: list[dict] = []
    by_p2p = {mem[n].rt.p2p: n for n in mem.nodes}
    for name in _trainers(mem):
        node = mem[name]
        fetch = node.role.server.fetch

        def recording(peer, blob, timeout, max_bytes, _name=name, _node=node, _fetch=fetch):
            mr = _node.role.mr
            final = None if mr is None or mr.work is None else mr.work.final
            log.append(dict(by=_name, to=by_p2p.get(str(peer)), blob=blob, final_known=final is not None))
            return _fetch(peer, blob, timeout, max_bytes)

        node.role.server.fetch = recording
    return log


def test_peers_spread_their_first_requests_over_the_uplinks(tmp_path):
    """Were every peer to ask the same member for its contribution first, and the same owner for
    the same reduced part first, those few uplinks would carry the whole swarm while the others
    idle: each peer starts with a different member and a different part."""
    peers = 8
    mem = _swarm(tmp_path, "spread", peers, parts=16)
    log = _record_fetches(mem)
    mem.run()
    assert len(set(mem.digests().values())) == 1
    first_member, first_part = {}, {}
    for f in log:
        what = f["blob"].split("/")
        if what[1] == "contribution" and len(what) >= 5 and what[2] == "1":
            first_member.setdefault(f["by"], f["to"])
        if what[1] == "reduced" and what[2] == "1":
            first_part.setdefault(f["by"], int(what[3]))
    assert len(first_member) == peers and len(first_part) == peers, (first_member, first_part)
    assert max(list(first_member.values()).count(m) for m in set(first_member.values())) == 1, first_member
    assert len(set(first_part.values())) >= peers // 2, first_part


@pytest.mark.parametrize("part_owners", [1, 2])
def test_each_source_of_a_reduced_part_serves_about_half_its_readers(tmp_path, part_owners):
    """A reduced part comes from either of its two sources (two owners, or an owner and the
    coordinator); were each reader to pick one by a hash of its name, one source could serve most
    readers of every part (its uplink carrying twice its share) in one run and few in the next.
    Consecutive readers ask different sources first: each serves every part to half its readers."""
    peers = 8
    mem = _swarm(tmp_path, f"halves{part_owners}", peers, parts=16, part_owners=part_owners)
    log = _record_fetches(mem)
    mem.run()
    assert len(set(mem.digests().values())) == 1
    served: dict[tuple[str, str], dict[str, int]] = {}
    for f in log:
        what = f["blob"].split("/")
        if what[1] == "reduced":
            by_source = served.setdefault((what[2], what[3]), {})
            by_source[f["to"]] = by_source.get(f["to"], 0) + 1
    assert len(served) >= 16 * (ROUNDS - 1), sorted(served)
    for (r, part), by_source in served.items():
        assert len(by_source) == 2 and max(by_source.values()) - min(by_source.values()) <= 1, (r, part, by_source)
    if part_owners == 1:
        assert any("coordinator" in by_source for by_source in served.values())


class _SlowOwner(MergeProtocol):
    """Reduces and publishes the parts it owns only after a few seconds: the others can already
    download every other part."""

    def _start_reducing(self, mr):
        if mr.work is None and not getattr(mr, "slowed", False):
            mr.slowed = True
            mr.wait = 2.0
            return
        super()._start_reducing(mr)


def test_reduced_parts_are_downloaded_while_the_last_owners_still_reduce(tmp_path):
    """A peer downloads every part agreed over the contributors the parts known so far accepted
    before the last owners published theirs; the W is the same as without the slow owner."""
    baseline = _swarm(tmp_path, "baseline", 4)
    baseline.run()
    mem = _swarm(tmp_path, "slow", 4, roles={"p1": with_protocol(_SlowOwner)})
    log = _record_fetches(mem)
    mem.run()
    assert mem.digests() == baseline.digests()
    early = [f for f in log if "/reduced/" in f["blob"] and not f["final_known"] and f["by"] != "p1"]
    assert early, "no reduced part was downloaded before the final set was known"
    for name in _trainers(mem):
        for r in mem[name].events.of("round"):
            assert r["merged"] and r["raw_parts"] == 0 and not r["resynced"], (name, r)
            assert r["phases"]["final"] <= r["phases"]["merged"] <= r["phases"]["done"], r["phases"]


@pytest.mark.parametrize("merge", ["reduce", "gather"])
def test_contributions_travel_compact_and_merge_the_same_w(tmp_path, monkeypatch, merge):
    """From the second round on, a peer that kept a member's last factors (an owner its parts, the
    coordinator and all-gathering peers the whole contribution) fetches it without the baseline
    factors: fewer bytes per round, the same W as with full blobs; a peer that lost what it kept
    fetches the full blob and still merges the same W."""
    mem = _swarm(tmp_path, "compact", 4, merge=merge, parts=8)
    log = _record_fetches(mem)
    mem.run()
    compact = [f for f in log if f["blob"].endswith("/compact")]
    # round 0 too: fresh heads' baselines are zero, which anyone can put back
    assert compact and {f["blob"].split("/")[2] for f in compact} == {str(r) for r in range(ROUNDS)}
    forgetful = _swarm(tmp_path, "forgetful", 4, merge=merge, parts=8)
    p0 = forgetful["p0"].role.protocol
    collection = p0.collection
    fetch = collection._contribution
    tried: list[int] = []

    def contribution(mr, peer, index, name, bound):  # it kept other factors than the ones named
        if (peer, index) in collection._bases:
            r, _, factors = collection._bases[(peer, index)]
            other = {k: t * 2 for k, t in factors.items()}
            collection._bases[(peer, index)] = (r, factors_digest(other), other)
            tried.append(index)
        return fetch(mr, peer, index, name, bound)

    collection._contribution = contribution
    forgetful.run()
    assert tried
    with monkeypatch.context() as m:  # control: every blob travels in full
        m.setattr(collection_module, "compact_part",
                  lambda blob, previous: (blob, part_factors(blob)[1], None))
        control = _swarm(tmp_path, "full", 4, merge=merge, parts=8)
        control.run()
    assert mem.digests() == control.digests() == forgetful.digests()
    for swarm_ in (mem, forgetful):
        for name in _trainers(swarm_):
            for r in swarm_[name].events.of("round"):
                assert r["merged"] and r["raw_parts"] == 0 and not r["resynced"], (name, r)
    received, full = _received_per_peer_round(mem), _received_per_peer_round(control)
    assert received < 0.85 * full, (received, full)


@pytest.mark.parametrize("forged", [False, True], ids=["honest", "forged"])
def test_a_peer_that_missed_a_round_adds_its_reduced_parts_instead_of_downloading_w(tmp_path, monkeypatch, forged):
    """A slow peer misses rounds of four others; it takes each missed round from the parts the
    owners and the coordinator still serve, never a whole W. Parts that hash to what a writer
    named but add up to another W than the coordinator decided (`forged`: every value it fetches
    doubled) are never kept: it downloads the agreed W instead."""
    if forged:
        from swarm.rounds import replay
        honest = replay.download_part
        monkeypatch.setattr(replay, "download_part", lambda *a, **kw: {
            k: 2 * v for k, v in (honest(*a, **kw) or {}).items()} or None)
    cfg = tiny_config(heads=5, merge_every=2, rounds=5, min_heads=5, merge="reduce")
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(4):
        mem.trainer(f"p{i}")
    slow = mem.trainer("slow", throttle=2.0)  # 4 s of steps a round against a 3 s window
    mem.run()
    assert all(mem[n].state == "finished" for n in mem.nodes)
    assert len(set(mem.digests().values())) == 1
    rounds = slow.events.of("round")
    assert any(r["missed"] for r in rounds) and any(r["merged"] for r in rounds), rounds
    state = slow.role.protocol.state
    if forged:
        assert state.rounds_replayed == 0 and state.downloads >= 1
    else:
        assert state.rounds_replayed >= 1 and state.downloads == 0 and state.bytes_downloaded == 0
