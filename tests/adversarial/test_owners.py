"""Members steering who merges what. Owners are consecutive in the order of an epoch's seed, which
only the coordinator's beacon sets: keys chosen to sort next to each other, or a beacon written by
anyone else, buy nothing. And a member that serves its contribution to everyone but the coordinator
is left out by everyone, as the coordinator says whom it fetched: nobody's W differs from the
agreed one for it."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

from swarm import dht_io
from swarm.identity import Identity
from swarm.rounds import owners, plan
from swarm.rounds.agreement import order
from swarm.schemas import BeaconRecord
from tests.memswarm import named_identity
from tests.test_reduce import ROUNDS, _swarm, _trainers

PARTS = 16


def _together(servers: list[str], pair: set[str]) -> bool:
    return any(set(owners(i, servers)) == pair for i in range(PARTS))


def test_keys_chosen_to_sort_together_own_parts_together_only_by_chance():
    """Two colluders grind keys that sort next to each other among 8 members. In fingerprint order
    they would own parts together in every epoch; in the beacon's order, as often as any two
    members do (2 of 7 epochs), with or without a beacon (the coordinator down)."""
    fps = sorted(Identity().fingerprint for _ in range(8))
    pair = {fps[3], fps[4]}
    ready = {fp: SimpleNamespace(pushed=None) for fp in fps}
    assert _together(plan.servers(ready), pair)  # what the order was before: always together
    epochs = 400
    for beacon in (lambda: secrets.token_hex(32), lambda: None):
        together = sum(_together(plan.servers(ready, plan.seed("run", e, beacon())), pair) for e in range(epochs))
        assert 0.18 < together / epochs < 0.40, together


def test_an_epochs_order_holds_for_its_rounds_and_the_next_epoch_draws_another():
    """Owners keep each member's factors of their parts from one turn to the next (compact
    contributions): the order changes only from one epoch to the next, with fragments too."""
    for fragments in (1, 4):
        rounds = plan.OWNER_TURNS * fragments
        assert {plan.epoch(r, fragments) for r in range(rounds)} == {0}
        assert plan.epoch(rounds, fragments) == 1
    fps = [Identity().fingerprint for _ in range(6)]
    orders = {tuple(plan.ordered(fps, plan.seed("run", e, "ab" * 32))) for e in range(6)}
    assert len(orders) > 1


def test_only_the_coordinators_beacon_orders_the_owners(tmp_path):
    """A member that writes its own beacon under the epoch's key (a value it could grind a key
    against) changes nobody's order: every peer orders by the coordinator's, which it published
    before the epoch's first round settled."""
    mem = _swarm(tmp_path, "beacon", 4)
    member = mem["p0"]
    forged = BeaconRecord(epoch=0, seed="00" * 32)
    dht_io.store(member.rt.dht, member.role.keys.beacon(0), named_identity("p0"), forged, mem.clock.now() + 600)
    settled = {}

    def record(name):
        protocol = mem[name].role.protocol
        begin = protocol._start_reducing

        def spy(mr):
            settled[(name, mr.round)] = mr.order
            begin(mr)
        protocol._start_reducing = spy

    for name in ("p0", "p1", "p2", "p3", "coordinator"):
        record(name)
    mem.run()
    found = dht_io.by_writer(dht_io.read(member.rt.dht, member.role.keys.beacon(0), BeaconRecord, mem.clock.now()))
    coordinator = named_identity("coordinator").fingerprint
    assert set(found) == {coordinator, named_identity("p0").fingerprint}
    expected = plan.seed(member.role.keys.run_id, 0, found[coordinator].seed)
    assert settled and set(settled.values()) == {expected}, settled
    assert expected != plan.seed(member.role.keys.run_id, 0, forged.seed)
    assert expected == order(mem["p1"].role.protocol.ctx, 0)


def test_a_member_serving_everyone_but_the_coordinator_is_left_out_by_everyone(tmp_path):
    """The owners could fetch its parts and the coordinator could not fetch it: were the owners to
    merge it in, every other peer's W would differ from the coordinator's (the agreed one) and
    each would re-sync in every round. The coordinator says whom it fetched before the others
    settle their final set, so they leave it out too; its change waits, and nobody re-syncs."""
    mem = _swarm(tmp_path, "selective", 4)
    coordinator = mem["coordinator"].rt.p2p
    mem["p3"].role.server.serves = lambda peer: peer != coordinator
    mem.run()
    rounds = mem["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    selective = named_identity("p3").fingerprint
    assert all(selective not in r["members"] and len(r["members"]) == 3 for r in rounds), rounds
    honest = ["p0", "p1", "p2"]
    assert not [r for n in honest for r in mem[n].events.of("round") if r["resynced"]]
    assert all(r["merged"] for n in honest for r in mem[n].events.of("round"))
    assert not any(r["merged"] for r in mem["p3"].events.of("round"))
    assert len(set(mem.digests(*_trainers(mem), "coordinator").values())) == 1
