"""Members steering the merge within what each check looks at: contributions that pull the robust
clip's reference down, reduced parts forged by the owners that reduce them (two colluding owners
publish one digest, so the digest alone proves nothing about the values), and a member taking
more heads than the run allows."""

from __future__ import annotations

import pytest
import torch

from swarm.lora import merge_scale
from swarm.lte_model import LTEModel, LTESpec
from swarm.wire import (Contribution, ContributionError, ReducedBound, decode_contribution, decode_reduced,
                        encode_contribution, encode_reduced, reduce_contributions, reduced_digest, reduced_tensors)
from tests.conftest import randomize_heads, tiny_vit

SPEC = LTESpec(n_heads=4, rank=2, alpha=8.0, nonlinear="replicate")


def _contribution(peer: str, heads: tuple[int, ...], values: dict[str, torch.Tensor]) -> Contribution:
    return Contribution(peer=peer, heads=heads, weights=values, replicas={}, nbytes=0)


@pytest.mark.parametrize("zeros, total", [(2, 4), (3, 6)])
def test_a_minority_sending_nothing_cannot_scale_everyone_else_to_nothing(zeros, total):
    """The robust clip's reference is an upper median: fewer than half the contributions, however
    small, cannot pull it below an honest change, so honest changes pass unscaled and W moves."""
    names = LTEModel(tiny_vit(), SPEC, []).layer_names
    shapes = {n: tuple(LTEModel(tiny_vit(), SPEC, []).layer(n).weight_store.shape) for n in names}
    g = torch.Generator().manual_seed(0)
    honest = [_contribution(f"h{i}", (i,), {n: torch.randn(shapes[n], generator=g) for n in names})
              for i in range(total - zeros)]
    silent = [_contribution(f"z{i}", (total - zeros + i,), {n: torch.zeros(shapes[n]) for n in names})
              for i in range(zeros)]
    layers = frozenset(names)
    clipped = reduce_contributions(LTEModel(tiny_vit(), SPEC, []), honest + silent, robust_clip=8.0, part=layers)
    plain = reduce_contributions(LTEModel(tiny_vit(), SPEC, []), honest + silent, robust_clip=0.0, part=layers)
    for n in names:
        assert clipped[n].norm() > 0
        torch.testing.assert_close(clipped[n], plain[n], rtol=1e-12, atol=0.0)


def _honest_part():
    """A part of W reduced honestly from two members' contributions (one head each)."""
    model = LTEModel(tiny_vit(), SPEC, [])
    part = frozenset(model.layer_names[:3])
    contributions = []
    for head in (0, 1):
        peer = LTEModel(tiny_vit(), SPEC, [head])
        randomize_heads(peer, seed=head, scale=0.05)
        blob, _ = encode_contribution(peer, [head])
        contributions.append(decode_contribution(blob, f"m{head}", model, max_update=10.0, max_relative_update=1.0,
                                                 part=part))
    return model, part, reduce_contributions(model, contributions, part=part)


BOUND = ReducedBound(heads=2, contributions=2, max_update=10.0, max_relative_update=1.0)


def _served(totals, dtype="fp32"):
    served = reduced_tensors(totals, dtype)
    return encode_reduced(served), reduced_digest(served, ["m0", "m1"])


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_an_honest_reduced_part_passes_its_members_bound(dtype):
    model, part, totals = _honest_part()
    blob, digest = _served(totals, dtype)
    got = decode_reduced(blob, model, part, ["m0", "m1"], digest, dtype, BOUND)
    assert set(got) == set(part)


@pytest.mark.parametrize("forgery", ["scaled", "reversed", "spike"])
def test_a_forged_reduced_part_is_refused_though_it_hashes_to_the_digest_its_owners_published(forgery):
    """Whatever the owners agree on, a part may add to W only what its members could: the family
    of forgeries (a whole part blown up, a layer turned around, one weight set far off)."""
    model, part, totals = _honest_part()
    coef = merge_scale(SPEC.scale, SPEC.n_heads)
    name = sorted(part)[0]
    forged = {n: t.clone() for n, t in totals.items()}
    if forgery == "scaled":
        forged = {n: t * 50 for n, t in totals.items()}
    elif forgery == "reversed":  # W += coef * total = -4 W: further than two heads may move it (1.0 each)
        forged[name] = -4 * model.layer(name).weight_store.master.double() / coef
    else:
        forged[name].view(-1)[7] = 100.0 / coef  # one weight moved by 100
    blob, digest = _served(forged)
    decode_reduced(blob, model, part, ["m0", "m1"], digest, "fp32")  # the digest alone lets it through
    with pytest.raises(ContributionError, match="further than its 2 contributions could"):
        decode_reduced(blob, model, part, ["m0", "m1"], digest, "fp32", BOUND)


def test_a_merge_of_in_bound_contributions_always_fits_the_bound_of_its_members():
    """The bound is the sum of what each contribution may carry: contributions at the very edge
    of their own checks reduce to a part that still passes."""
    model = LTEModel(tiny_vit(), SPEC, [])
    coef = merge_scale(SPEC.scale, SPEC.n_heads)
    part = frozenset(model.layer_names[:2])
    edge = []
    for i in range(3):
        values = {}
        for n in part:
            w = model.layer(n).weight_store.master.double()
            values[n] = (w / w.norm() * 0.999 * w.norm() / coef * (-1) ** i).float()  # per head: 0.999 of the layer
        edge.append(_contribution(f"m{i}", (i,), values))
    totals = reduce_contributions(model, edge, part=part)
    served = reduced_tensors(totals)
    bound = ReducedBound(heads=3, contributions=3, max_update=float("inf"), max_relative_update=1.0)
    decode_reduced(encode_reduced(served), model, part, ["m0", "m1", "m2"], reduced_digest(served, ["m0", "m1", "m2"]),
                   "fp32", bound)


def test_a_member_claiming_every_head_holds_no_more_than_the_run_allows_in_anyones_view():
    """`max_heads_per_peer` is the readers' rule, not the claimant's courtesy: a member whose own
    code claims every head (earliest of all) is seen holding its cap, and every other head goes
    to the next claimant, the same in every reader's view."""
    from swarm import dht_io
    from swarm.identity import Identity
    from swarm.keys import RunKeys, make_run_id
    from swarm.leases import HeadLeases
    from swarm.memnet import MemoryDHT, MemoryNetwork
    from swarm.schemas import LeaseRecord
    from peers.node import install_signing
    from swarm.clock import FakeClock

    clock = FakeClock()
    net = MemoryNetwork(clock)
    keys = RunKeys(make_run_id("greedy", "0" * 20))
    views = []
    for name in ("greedy", "honest", "reader"):
        dht, identity = MemoryDHT(net, name), Identity()
        install_signing(dht, identity)
        views.append(HeadLeases(dht, keys, identity, 6, lease_seconds=30.0, settle_seconds=1.0, clock=clock,
                                max_per_holder=2))
    greedy, honest, reader = views
    now = clock.now()
    for head in range(6):  # written past its own cap, dated before anyone else's claim
        dht_io.store(greedy.dht, keys.leases, greedy.identity, LeaseRecord(head=head, claimed_at=now - 10), now + 30,
                     tag=RunKeys.lease_tag(head))
    clock.advance(0.1)
    won = sorted(honest.claim(2))  # heads the greedy member cannot hold are free to claim
    assert len(won) == 2 and set(won) <= {2, 3, 4, 5}
    seen = [v.holders(max_age=0.0) for v in views]
    assert seen[0] == seen[1] == seen[2] == {0: greedy.peer, 1: greedy.peer, **{h: honest.peer for h in won}}
    assert reader.free_heads() == sorted({2, 3, 4, 5} - set(won))


def test_a_tied_vote_is_broken_by_nothing_a_voter_fills_in():
    """With the coordinator down, two colluders voting a forged digest against two honest peers
    cannot win the tie by listing more members (or by grinding a larger digest): each honest peer
    keeps the W it computed, which is the one every honest peer computed."""
    from swarm.rounds import agreed_vote
    from swarm.schemas import HashRecord

    honest, forged = "a" * 64, "f" * 64
    fingerprints = [f"{i:020x}" for i in range(6)]
    votes = {"h1": HashRecord(round=3, digest=honest, members=fingerprints[:2]),
             "h2": HashRecord(round=3, digest=honest, members=fingerprints[:2]),
             "x1": HashRecord(round=3, digest=forged, members=fingerprints),
             "x2": HashRecord(round=3, digest=forged, members=fingerprints)}
    assert agreed_vote(votes, own=honest).digest == honest
    assert agreed_vote(votes, own=forged).digest == forged  # the colluders keep theirs: no one is moved
    assert agreed_vote(votes).digest == honest  # a tie we are not in: the smallest digest, for everyone
    votes["h3"] = HashRecord(round=3, digest=honest, members=fingerprints[:2])
    assert agreed_vote(votes, own=forged).digest == honest  # a plurality still decides
