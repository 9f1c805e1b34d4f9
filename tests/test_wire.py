"""Contributions and state on the wire: exact, form-independent, and hostile input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from swarm.lte_model import LTEModel, LTESpec
from swarm.wire import (ContributionError, decode_contribution, decode_state, encode_contribution, encode_state,
                        merge_contributions)
from tests.conftest import randomize_heads, tiny_vit

SPEC = LTESpec(n_heads=4, rank=2, alpha=8.0, nonlinear="replicate")


def _model(heads, seed=0) -> LTEModel:
    m = LTEModel(tiny_vit(), SPEC, heads)
    randomize_heads(m, seed=seed, scale=0.05)
    return m


def _state(m: LTEModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.shared_state().items()}


@pytest.mark.parametrize("form", ["factors", "dense", "auto"])
def test_contribution_round_trip_equals_the_local_deltas(form):
    peer = _model([1, 3])
    blob, counts = encode_contribution(peer, [1, 3], form=form)
    if form != "auto":
        assert counts[f"{'factor' if form == 'factors' else 'dense'}_layers"] == len(peer.layer_names)
    c = decode_contribution(blob, "peer", LTEModel(tiny_vit(), SPEC, []), max_update=10.0)
    assert c.heads == (1, 3)
    for name, delta in peer.weight_deltas().items():
        torch.testing.assert_close(c.weights[name], delta.float(), rtol=0, atol=0)
    for name, delta in peer.replica_deltas().items():
        torch.testing.assert_close(c.replicas[name], delta.float(), rtol=0, atol=0)


def test_both_wire_forms_give_the_same_bits():
    peer = _model([0])
    receiver = LTEModel(tiny_vit(), SPEC, [])
    a = decode_contribution(encode_contribution(peer, [0], form="factors")[0], "p", receiver, 10.0)
    b = decode_contribution(encode_contribution(peer, [0], form="dense")[0], "p", receiver, 10.0)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    # and the forms really differ in size: one head of rank 2 is cheaper as factors
    assert len(encode_contribution(peer, [0], form="factors")[0]) < len(encode_contribution(peer, [0], form="dense")[0])


def test_merge_is_independent_of_arrival_order_and_matches_local_merge():
    peers = [_model([h], seed=h) for h in range(3)]
    receiver = LTEModel(tiny_vit(), SPEC, [])
    contributions = [decode_contribution(encode_contribution(p, p.head_ids)[0], f"peer{i}", receiver, 10.0)
                     for i, p in enumerate(peers)]
    digests = []
    for order in ([0, 1, 2], [2, 0, 1]):
        m = LTEModel(tiny_vit(), SPEC, [])
        merge_contributions(m, [contributions[i] for i in order])
        digests.append(m.state_digest())
    assert digests[0] == digests[1]
    # the same heads merged in one process land on the same W (float rounding aside)
    together = LTEModel(tiny_vit(), SPEC, [0, 1, 2])
    for h, p in enumerate(peers):
        for name, f in together.factors.items():
            f.A.data[h], f.B.data[h] = p.factors[name].A[0], p.factors[name].B[0]
        for name, rep in together.replicas.items():
            rep.data[h] = p.replicas[name][0]
    together.merge()
    m = LTEModel(tiny_vit(), SPEC, [])
    merge_contributions(m, contributions)
    for key, value in together.shared_state().items():
        torch.testing.assert_close(m.shared_state()[key], value, rtol=1e-5, atol=1e-6)


def _tamper(blob: bytes, edit) -> bytes:
    tensors = st_load(blob)
    meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    edit(tensors, meta)
    return st_save(tensors, metadata=meta)


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("edit,message", [
    (lambda t, m: t.__setitem__(_first_key(t, "/B"), t[_first_key(t, "/B")] * float("nan")), "NaN or inf"),
    (lambda t, m: t.__setitem__(_first_key(t, "/B"), t[_first_key(t, "/B")][:, :-1]), "has shape"),
    (lambda t, m: t.__setitem__(_first_key(t, "/B"), t[_first_key(t, "/B")].double()), "expected float32"),
    (lambda t, m: t.__setitem__(_first_key(t, "/B"), t[_first_key(t, "/B")] * 1e6), "would move a weight"),
    (lambda t, m: t.pop(_first_key(t, "/A")), "missing tensor"),
    (lambda t, m: t.__setitem__("w/extra/A", torch.zeros(1)), "outside the round.s merge"),
    (lambda t, m: m.__setitem__("heads", "[7]"), "bad head ids"),
    (lambda t, m: m.__setitem__("heads", "[1, 1]"), "bad head ids"),
    (lambda t, m: m.__setitem__("heads", "oops"), "not valid JSON"),
    (lambda t, m: m.__setitem__("format", "other/1"), "unknown format"),
])
def test_hostile_contributions_are_rejected_and_change_nothing(edit, message):
    peer = _model([1])
    blob = _tamper(encode_contribution(peer, [1], form="factors")[0], edit)
    receiver = LTEModel(tiny_vit(), SPEC, [])
    before = receiver.state_digest()
    with pytest.raises(ContributionError, match=message):
        decode_contribution(blob, "evil", receiver, max_update=10.0)
    assert receiver.state_digest() == before


@pytest.mark.parametrize("blob", [b"", b"garbage" * 10, (10**9).to_bytes(8, "little") + b"{}"])
def test_garbage_is_rejected(blob):
    with pytest.raises(ContributionError, match="not a valid safetensors blob"):
        decode_contribution(blob, "evil", LTEModel(tiny_vit(), SPEC, []), max_update=10.0)


def test_state_round_trip_and_tampered_state_is_refused():
    source = _model([0])
    source.merge()
    blob = encode_state(source, round_=7)
    target = LTEModel(tiny_vit(seed=5), SPEC, [])
    assert decode_state(blob, target, expect_digest=source.state_digest()) == 7
    assert target.state_digest() == source.state_digest()

    other = LTEModel(tiny_vit(seed=6), SPEC, [])
    before = _state(other)
    forged = _tamper(blob, lambda t, m: t.__setitem__("head.bias", t["head.bias"] + 1))
    with pytest.raises(ContributionError, match="do not match the digest"):
        decode_state(forged, other)
    assert all(torch.equal(before[k], v) for k, v in other.shared_state().items())
    with pytest.raises(ContributionError, match="expected"):
        decode_state(blob, other, expect_digest="0" * 64)


def _dense(name: str, heads: tuple[int, ...], weights: dict[str, torch.Tensor]):
    from swarm.wire import Contribution

    return Contribution(peer=name, heads=heads, weights=weights, replicas={}, nbytes=0)


def test_robust_clip_scales_an_outlier_to_a_multiple_of_the_median_per_head():
    spec = LTESpec(n_heads=4, rank=2, alpha=8.0, nonlinear="freeze")
    layer = LTEModel(tiny_vit(), spec, []).layer_names[0]

    def merged(contributions, clip):
        m = LTEModel(tiny_vit(), spec, [])
        before = {n: m.layer(n).weight_store.master.double().clone() for n in m.layer_names}
        merge_contributions(m, contributions, robust_clip=clip)
        return {n: (m.layer(n).weight_store.master.double() - before[n]) for n in m.layer_names}

    g = torch.Generator().manual_seed(0)
    names = LTEModel(tiny_vit(), spec, []).layer_names
    shapes = {n: tuple(LTEModel(tiny_vit(), spec, []).layer(n).weight_store.master.shape) for n in names}
    base = {n: torch.randn(shapes[n], generator=g) for n in names}
    honest = [_dense(f"h{i}", (i,), {n: base[n] * (1 + 0.1 * i) for n in names}) for i in range(3)]
    # two heads' worth of work, 100x an honest head: clipped to 4x the upper median per head (of
    # 1.0, 1.1, 1.2 and 100: 1.2), times 2 heads
    attacker = _dense("x", (3, 4), {n: base[n] * 200 for n in names})
    clipped = merged([*honest, attacker], clip=4.0)
    expected = merged([*honest, _dense("x", (3, 4), {n: base[n] * 2 * 4 * 1.2 for n in names})], clip=0.0)
    torch.testing.assert_close(clipped[layer], expected[layer], rtol=1e-6, atol=1e-9)
    # honest spreads below the multiple are untouched, and two contributions are never clipped
    assert torch.equal(merged(honest, clip=4.0)[layer], merged(honest, clip=0.0)[layer])
    assert torch.equal(merged([honest[0], attacker], clip=4.0)[layer], merged([honest[0], attacker], clip=0.0)[layer])


def test_a_change_too_large_for_the_layer_is_refused_however_its_entries_are_spread():
    peer = _model([0])
    receiver = LTEModel(tiny_vit(), SPEC, [])
    blob, _ = encode_contribution(peer, [0], form="dense")
    tensors = st_load(blob)
    name = next(k for k in tensors if k.endswith("/D"))
    layer = name.split("/")[1]
    norm = receiver.layer(layer).weight_store.master.norm().item()
    coef = SPEC.alpha / SPEC.rank / SPEC.n_heads
    spike = torch.zeros_like(tensors[name]).reshape(-1)
    spike[::64] = 1.0
    tensors[name] = (spike * (2 * norm / coef / spike.norm())).reshape(tensors[name].shape)  # twice the layer's norm
    bad = st_save(tensors, metadata={"format": "lte-swarm/contribution/1", "heads": "[0]"})
    assert max(tensors[name].abs().max().item() * coef, 0) < 10.0  # every entry within the per-entry bound
    with pytest.raises(ContributionError, match="of its norm"):
        decode_contribution(bad, "evil", receiver, max_update=10.0, max_relative_update=1.0)
    decode_contribution(bad, "evil", receiver, max_update=10.0, max_relative_update=3.0)  # a looser bound takes it


def test_a_replica_change_too_large_for_the_parameter_is_refused():
    peer = LTEModel(tiny_vit(), SPEC, [0])  # untrained: every other change is zero
    receiver = LTEModel(tiny_vit(), SPEC, [])
    blob, _ = encode_contribution(peer, [0])
    tensors = st_load(blob)
    name = next(k for k in tensors if k.startswith("r/") and "norm" in k and k.endswith("weight"))
    param = dict(receiver.model.named_parameters())[name[2:]]
    # every entry moves by 0.5 (far within max_update), which is 50 % of a LayerNorm weight of ones
    tensors[name] = torch.full_like(tensors[name], 0.5 * SPEC.n_heads)
    assert param.norm().item() > 0 and 0.5 < 10.0
    bad = st_save(tensors, metadata={"format": "lte-swarm/contribution/1", "heads": "[0]"})
    with pytest.raises(ContributionError, match=f"parameter {name[2:]}.*of its norm"):
        decode_contribution(bad, "evil", receiver, max_update=10.0, max_relative_update=0.25)
    decode_contribution(bad, "evil", receiver, max_update=10.0, max_relative_update=1.0)


def test_bytes_that_break_the_parsers_are_contribution_errors_and_leave_w_untouched():
    receiver = LTEModel(tiny_vit(), SPEC, [])
    before = receiver.state_digest()
    good_state = encode_state(_model([0]), 3)
    header_len = int.from_bytes(good_state[:8], "little")
    header = json.loads(good_state[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F4"  # a dtype safetensors does not know
    raw = json.dumps(header).encode()
    unknown_dtype = len(raw).to_bytes(8, "little") + raw + good_state[8 + header_len:]
    with pytest.raises(ContributionError):
        decode_state(unknown_dtype, receiver)
    assert receiver.state_digest() == before
    deep = "[" * 100_000 + "]" * 100_000  # a head list nested past any recursion limit
    blob = st_save({"x": torch.zeros(1)}, metadata={"format": "lte-swarm/contribution/1", "heads": deep})
    with pytest.raises(ContributionError):
        decode_contribution(blob, "evil", receiver, max_update=10.0)


def test_a_fresh_models_honest_round_passes_the_bounds_and_what_lies_beyond_the_reach_does_not():
    """The bounds are relative to the larger of a parameter's norm and how far one round of AdamW at
    the run's rates can move it: a freshly initialised ViT's layers are small next to an honest
    round (a bound on the norm alone refused every head of the demo from its first round), and a
    change past the reach is still refused."""
    from tests.memswarm import tiny_config
    from peers.data import DataSource, ImageShape
    from peers.models import create_lte_model
    from peers.training import HeadTrainer

    cfg = tiny_config(heads=2, merge_every=20, rounds=1).with_overrides({"train.lr": 5e-3, "train.replica_lr": 2e-2})
    peer = create_lte_model(cfg, [0], torch.device("cpu"))
    receiver = create_lte_model(cfg, [], torch.device("cpu"))
    trainer = HeadTrainer(peer, cfg.train, cfg.steps)
    batches = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels)).batches(0, 2, cfg.head_batch)
    for step in range(cfg.lte.merge_every):
        x, y = next(batches)
        trainer.step(x[None], y[None], step)
    reach = receiver.update_reach(cfg.lte.merge_every, cfg.train.lr, cfg.train.replica_rate)
    assert set(reach) == set(receiver.layer_names) | set(receiver.replicated) and min(reach.values()) > 0
    blob, _ = encode_contribution(peer, [0])
    with pytest.raises(ContributionError, match="of its norm"):  # the norm alone: an honest head refused
        decode_contribution(blob, "honest", receiver, max_update=10.0, max_relative_update=1.0)
    decode_contribution(blob, "honest", receiver, max_update=10.0, max_relative_update=1.0, reach=reach)

    # the same head's change of one layer, stretched to 1.5 times the layer's reach
    tensors = st_load(encode_contribution(peer, [0], form="dense")[0])
    name = max(receiver.layer_names, key=lambda n: reach[n] / receiver.layer(n).weight_store.master.norm().item())
    assert reach[name] > receiver.layer(name).weight_store.master.norm().item()
    coef = cfg.lte.alpha / cfg.lte.rank / cfg.lte.heads
    delta = tensors[f"w/{name}/D"]
    tensors[f"w/{name}/D"] = delta * (1.5 * reach[name] / coef / delta.norm())
    loud = st_save(tensors, metadata={"format": "lte-swarm/contribution/1", "heads": "[0]"})
    with pytest.raises(ContributionError, match=f"layer {name}: per head it would move the layer by 1.5 of its norm or reach"):
        decode_contribution(loud, "loud", receiver, max_update=10.0, max_relative_update=1.0, reach=reach)
