"""Precision on the wire: contributions in bf16, reduced parts in bf16 or blockwise 8-bit. Every peer
must add the same rounded values, the simulation must round the same way (so the swarm still
reproduces it), and a blob of another precision than the run's is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from peers.simulate import simulate
from swarm.lora import delta_sum
from swarm.lte_model import LTEModel, LTESpec, _as_double
from swarm.wire import (BASE, FORMAT, INT4_BLOCK, INT8_BLOCK, ContributionError, compact_part, decode_contribution,
                        decode_reduced, dequantized, encode_contribution, encode_reduced, expand_part, factors_digest,
                        part_factors, plan_parts, quantize, reduced_digest, reduced_tensors, shapes_of,
                        split_contribution)
from tests.conftest import randomize_heads, tiny_vit
from tests.memswarm import run_swarm, tiny_config

pytestmark = pytest.mark.timeout(240)

SPEC = LTESpec(n_heads=4, rank=2, alpha=8.0, nonlinear="replicate")


def _model(heads) -> LTEModel:
    m = LTEModel(tiny_vit(), SPEC, heads)
    randomize_heads(m, seed=1, scale=0.05)
    return m


def _payload(blob: bytes) -> int:
    """Bytes of a safetensors blob past its header (on a model this small the header dominates)."""
    return len(blob) - 8 - int.from_bytes(blob[:8], "little")


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_rounded_contribution_shrinks_and_carries_exactly_its_rounded_factors(dtype):
    peer = _model([0, 2])
    full, _ = encode_contribution(peer, [0, 2], form="factors")
    half, _ = encode_contribution(peer, [0, 2], form="factors", dtype=dtype)
    if dtype == "bf16":
        assert _payload(half) == _payload(full) // 2
    else:  # a quarter, plus a float32 scale per block (one per small tensor here)
        assert _payload(half) < _payload(full) * 0.4
    receiver = LTEModel(tiny_vit(), SPEC, [])
    got = decode_contribution(half, "peer", receiver, max_update=10.0, dtype=dtype)
    idx = peer.local_indices([0, 2])
    for name in peer.layer_names:
        f = peer.factors[name.replace(".", ":")]
        keys = ("A", "B", "A0", "B0")
        rounded = dequantized(quantize({k: t for k, t in zip(keys, (f.A, f.B, f.A0, f.B0))}, dtype), dtype)
        want = delta_sum(*_as_double(*(rounded[k] for k in keys)), idx).float()
        torch.testing.assert_close(got.weights[name], want, rtol=0, atol=0)
        exact = decode_contribution(full, "peer", receiver, max_update=10.0).weights[name]
        assert not torch.equal(got.weights[name], exact)  # the rounding is real, not a relabelled fp32
    # A run that sends rounded contributions refuses fp32 ones, and the other way round.
    with pytest.raises(ContributionError, match="expected bfloat16" if dtype == "bf16" else "expected int8"):
        decode_contribution(full, "peer", receiver, max_update=10.0, dtype=dtype)
    with pytest.raises(ContributionError, match="expected float32"):
        decode_contribution(half, "peer", receiver, max_update=10.0)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_the_reset_less_roundings_cancel_from_round_to_round(dtype):
    """Two rounds of bf16 factors add bf16(B2)bf16(A2) - bf16(B0)bf16(A0) in all: no drift. (A layer
    sent dense carries its delta rounded once per round instead.)"""
    peer = _model([1])
    receiver = LTEModel(tiny_vit(), SPEC, [])
    start = {n: t.clone() for n, t in receiver.shared_state().items()}
    f0 = {n: [t.clone() for t in (f.A, f.B, f.A0, f.B0)] for n, f in
          ((name, peer.factors[name.replace(".", ":")]) for name in peer.layer_names)}
    for seed in (2, 3):
        blob = encode_contribution(peer, [1], form="factors", dtype=dtype)[0]
        c = decode_contribution(blob, "p", receiver, 10.0, dtype=dtype)
        receiver.apply_merge({n: w.double() for n, w in c.weights.items()},
                             {n: r.double() for n, r in c.replicas.items()})
        peer.mark_merged([1])
        randomize_heads(peer, seed=seed, scale=0.05)  # the next round's training
    coef = SPEC.scale / SPEC.n_heads
    for name in peer.layer_names:
        f = peer.factors[name.replace(".", ":")]
        a0, b0 = f0[name][2], f0[name][3]
        last = [_rounded(t, dtype) for t in (f.A0, f.B0)]  # the factors of the last round sent
        first = [_rounded(t, dtype) for t in (a0, b0)]
        want = start[f"{name}.weight"].double() + coef * (last[1][0] @ last[0][0] - first[1][0] @ first[0][0])
        torch.testing.assert_close(receiver.shared_state()[f"{name}.weight"].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, ratio", [("bf16", 0.5), ("int8", 0.25), ("int4", 0.141)])
def test_a_reduced_part_rounds_to_its_precision_within_its_step(dtype, ratio):
    gen = torch.Generator().manual_seed(0)
    totals = {"big": torch.randn(37, 300, generator=gen, dtype=torch.float64) * 1e-3,
              "odd": torch.randn(5, generator=gen, dtype=torch.float64),
              "zero": torch.zeros(3, 4, dtype=torch.float64)}
    served = reduced_tensors(totals, dtype)
    values = dequantized(served, dtype, shapes_of(totals))
    assert set(values) == set(totals)
    for name, t in totals.items():
        err = (values[name].double() - t).abs()
        if dtype == "bf16":
            assert (err <= t.abs() * 2 ** -8 + 1e-30).all(), name
        else:  # at most half a step of the value's block
            block, top = (INT8_BLOCK, 127) if dtype == "int8" else (INT4_BLOCK, 7)
            flat = t.reshape(-1)
            blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).reshape(-1, block)
            step = (blocks.abs().amax(1) / top).repeat_interleave(block)[:flat.numel()]
            assert (err.reshape(-1) <= step * 0.5 + 1e-7 * step + 1e-12).all(), name
            assert err.max() > 0 or name == "zero"  # it really rounds
        assert values[name].dtype == torch.float32 and values[name].shape == t.shape
    assert torch.equal(values["zero"], torch.zeros(3, 4))
    fp32 = _payload(encode_reduced(reduced_tensors(totals)))
    assert _payload(encode_reduced(served)) < fp32 * (ratio + 0.02)


def test_a_reduced_part_of_the_wrong_precision_or_tampered_is_refused():
    model = LTEModel(tiny_vit(), SPEC, [])
    part = frozenset(model.layer_names[:2])
    gen = torch.Generator().manual_seed(1)
    totals = {name: torch.randn(model.layer(name).weight_store.shape, generator=gen, dtype=torch.float64)
              for name in part}
    served = reduced_tensors(totals, "int8")
    digest = reduced_digest(served, ["a", "b"])
    blob = encode_reduced(served)
    got = decode_reduced(blob, model, part, ["a", "b"], digest, "int8")
    assert all(torch.equal(got[n], v) for n, v in dequantized(served, "int8").items())
    with pytest.raises(ContributionError, match="part's tensors"):  # 8-bit values come with their scales
        decode_reduced(blob, model, part, ["a", "b"], digest, "fp32")
    half = reduced_tensors(totals, "bf16")
    with pytest.raises(ContributionError, match="expected float32"):
        decode_reduced(encode_reduced(half), model, part, ["a", "b"], reduced_digest(half, ["a", "b"]), "fp32")
    packed = reduced_tensors(totals, "int4")  # 4-bit: flat codes two a byte, their scales, the same checks
    got = decode_reduced(encode_reduced(packed), model, part, ["a", "b"], reduced_digest(packed, ["a", "b"]), "int4")
    assert all(torch.equal(got[n], v) for n, v in dequantized(packed, "int4", shapes_of(totals)).items())
    assert all(got[n].shape == totals[n].shape for n in part)
    with pytest.raises(ContributionError, match="expected uint8|shape"):
        decode_reduced(blob, model, part, ["a", "b"], digest, "int4")
    flipped = dict(packed)
    flipped[sorted(part)[0]] = packed[sorted(part)[0]] ^ 0x11  # other codes, the same scales
    with pytest.raises(ContributionError, match="digest"):
        decode_reduced(encode_reduced(flipped), model, part, ["a", "b"], reduced_digest(packed, ["a", "b"]), "int4")
    scaled = dict(served)
    name = sorted(part)[0]
    scaled[name + "#scale"] = served[name + "#scale"] * 2  # the same int8 values, every step doubled
    with pytest.raises(ContributionError, match="digest"):
        decode_reduced(encode_reduced(scaled), model, part, ["a", "b"], digest, "int8")
    del scaled[name + "#scale"]
    with pytest.raises(ContributionError, match="part's tensors"):
        decode_reduced(encode_reduced(scaled), model, part, ["a", "b"], digest, "int8")


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t.pop(k + "#scale"), "lacks its float32 scales"),
    (lambda t, k: t.__setitem__(k + "#scale", torch.full_like(t[k + "#scale"], float("nan"))), "NaN or inf scales"),
    (lambda t, k: t.__setitem__(k + "#scale", t[k + "#scale"][:0]), "lacks its float32 scales"),
    (lambda t, k: t.pop(k), "without values"),
    (lambda t, k: t.__setitem__("w/ghost/A#scale", t[k + "#scale"].clone()), "outside the round's merge"),
])
def test_a_hostile_8bit_contribution_is_refused(damage, message):
    from safetensors.torch import load as st_load, save as st_save

    blob, _ = encode_contribution(_model([0]), [0], form="factors", dtype="int8")
    tensors = st_load(blob)
    damage(tensors, sorted(k for k in tensors if not k.endswith("#scale"))[0])
    bad = st_save(tensors, metadata={"format": "lte-swarm/contribution/1", "heads": "[0]"})
    with pytest.raises(ContributionError, match=message):
        decode_contribution(bad, "p", LTEModel(tiny_vit(), SPEC, []), 10.0, dtype="int8")


def _rounded(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return dequantized(quantize({"t": t}, dtype), dtype)["t"].double()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_stochastic_rounding_is_the_same_everywhere_and_right_on_average(dtype):
    """A small steady change beside a large one in its block: nearest rounding drops it every
    time, stochastic rounding (a seed per round) adds it on average; one seed, one set of codes."""
    t = torch.full((256,), 1e-3, dtype=torch.float64)
    large = torch.arange(256) % 64 == 0
    t[large] = 1.0  # each block's scale: a step of 1/127 or 1/7, far above 1e-3
    nearest = dequantized(quantize({"t": t}, dtype), dtype, {"t": (256,)})["t"]
    assert nearest[~large].abs().max() == 0
    rounds = [dequantized(quantize({"t": t}, dtype, dither=r), dtype, {"t": (256,)})["t"] for r in range(400)]
    mean = torch.stack(rounds).double().mean(0)
    assert abs(mean[~large].mean().item() - 1e-3) < 2e-4 and torch.allclose(mean[large], torch.ones(4).double())
    again = quantize({"t": t}, dtype, dither=7)
    assert all(torch.equal(v, again[k]) for k, v in quantize({"t": t}, dtype, dither=7).items())
    assert not torch.equal(quantize({"t": t}, dtype, dither=8)["t"], again["t"])
    assert not torch.equal(quantize({"u": t}, dtype, dither=7)["u"], again["t"])  # each tensor draws its own


@pytest.mark.parametrize("contribution, reduced, rounding", [("bf16", "int8", "nearest"), ("int8", "bf16", "nearest"),
                                                             ("bf16", "int4", "nearest"), ("bf16", "int4", "stochastic")])
def test_the_swarm_reproduces_the_simulation_in_every_precision_on_the_wire(tmp_path, contribution, reduced, rounding):
    cfg = tiny_config(heads=3, merge_every=2, rounds=4, min_heads=3, contribution_dtype=contribution,
                      reduced_dtype=reduced, reduced_rounding=rounding, robust_clip=0.0)
    mem = run_swarm(cfg, tmp_path, 3)
    assert all(n.state == "finished" for n in mem.nodes.values())
    assert len(set(mem.digests().values())) == 1
    rounds = mem["p0"].events.of("round")
    assert [r["new_round"] for r in rounds] == [1, 2, 3, 4] and all(len(r["members"]) == 3 for r in rounds)
    sim = simulate(cfg)
    exact = simulate(cfg.with_overrides({"swarm.contribution_dtype": "fp32", "swarm.reduced_dtype": "fp32"}))
    assert exact.model.state_digest() != sim.model.state_digest()  # the wire's precision changes W ...
    if rounding == "stochastic":
        nearest = simulate(cfg.with_overrides({"swarm.reduced_rounding": "nearest"}))
        assert nearest.model.state_digest() != sim.model.state_digest()
    # ... and the swarm rounds exactly as the simulation does, every round
    assert [r["digest"] for r in mem["coordinator"].events.of("round")] == [p.digest for p in sim.history]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_compact_part_leaves_out_the_baseline_its_owner_holds_and_decodes_alike(dtype):
    """A fresh head's baseline factors are zero, and after a merged round they are, bit for bit, the
    factors its last contribution carried: a part travels without them and is rebuilt with zeros
    or by an owner that kept them; an owner that did not gets nothing it could misread; a head
    whose work was not merged sends the full part."""
    peer = _model([1, 3])
    parts = plan_parts(peer, 4)
    first = split_contribution(encode_contribution(peer, [1, 3], form="factors", dtype=dtype)[0], parts)
    peer.mark_merged([1, 3])
    randomize_heads(peer, seed=5, scale=0.05)
    second = split_contribution(encode_contribution(peer, [1, 3], form="factors", dtype=dtype)[0], parts)
    receiver = LTEModel(tiny_vit(), SPEC, [])

    def same(a: bytes, b: bytes, part) -> None:
        want = decode_contribution(a, "p", receiver, 10.0, part=part, dtype=dtype)
        got = decode_contribution(b, "p", receiver, 10.0, part=part, dtype=dtype)
        for name in want.weights:
            assert torch.equal(got.weights[name], want.weights[name]), name

    for old, part in zip(first, parts):  # nothing merged yet: the baseline is zero
        compact, _, base = compact_part(old, None)
        if not part_factors(old)[1]:
            assert (compact, base) == (old, None)
            continue
        assert base == "zero" and len(compact) < len(old)
        assert expand_part(compact, None) is None
        same(old, expand_part(compact, None, zero=True), part)
    for old, new, part in zip(first, second, parts):
        held = part_factors(old)
        compact, current, base = compact_part(new, held[1])
        assert factors_digest(current) == part_factors(new)[0]
        if not held[1]:  # a part of replicated parameters alone: nothing to leave out
            assert compact == new and base is None
            continue
        assert base == "previous"
        assert expand_part(compact, None, zero=True) is None  # its baseline is not zero
        # exactly the baseline's bytes fewer (the names and the digest are header)
        assert _payload(compact) == _payload(new) - sum(t.numel() * t.element_size() for t in held[1].values())
        same(new, expand_part(compact, held), part)
        assert expand_part(compact, None) is None
        assert expand_part(compact, (factors_digest({}), {})) is None  # factors it does not name
        assert expand_part(new, None) == new  # a full part is taken as it is
        with pytest.raises(ContributionError, match="baseline factors too"):
            tensors = st_load(new)
            expand_part(st_save(tensors, metadata={"format": FORMAT, "heads": "[1, 3]", BASE: held[0]}), held)
    # The work of round two was not merged: its baseline is still round one's, not what it sent.
    randomize_heads(peer, seed=6, scale=0.05)
    third = split_contribution(encode_contribution(peer, [1, 3], form="factors", dtype=dtype)[0], parts)
    for sent, new in zip(second, third):
        assert compact_part(new, part_factors(sent)[1])[::2] == (new, None)
    # bytes that are no contribution are served as they are (their readers reject them)
    assert compact_part(b"\0" * 64, None) == (b"\0" * 64, {}, None)


@pytest.mark.parametrize("zero", [False, True])
def test_hostile_compact_blobs_are_contribution_errors(zero):
    """Whatever a compact blob or the full blob behind it holds, reading it raises nothing but
    ContributionError (or gives None: fetch the full blob)."""
    meta = {"format": FORMAT, "heads": "[0]", BASE: "0" * 64}
    odd = [{"w/l/A": torch.tensor(1.5)},                                   # a 0-dim factor
           {"w/l/A": torch.zeros(2, 3, dtype=torch.complex64)},            # a dtype no peer sends
           {"w/l/A": torch.zeros(0, 4)},                                    # an empty one
           {"w/l/A#scale": torch.ones(2), "w/l/B": torch.zeros(3, 1)}]      # scales without values
    for tensors in odd:
        blob = st_save(tensors, metadata=meta)
        for call in (lambda: expand_part(blob, None, zero=zero), lambda: part_factors(blob)):
            try:
                call()
            except ContributionError:
                pass


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_the_parts_of_a_whole_contribution_decode_from_one_parse_each_as_on_its_own(monkeypatch, dtype):
    """A peer checking every part of a whole contribution (the coordinator) parses it once, and
    gets per part what decoding that part alone gives: a damaged layer rejects its part only."""
    import swarm.wire as wire

    peer = _model([0, 2])
    parts = plan_parts(peer, 4)
    tensors = st_load(encode_contribution(peer, [0, 2], form="factors", dtype=dtype)[0])
    victim = sorted(k for k in tensors if k.startswith("w/"))[0]
    broken = next(i for i, part in enumerate(parts) if wire._target(victim) in part)
    key = victim if dtype == "fp32" else victim.removesuffix("#scale") + "#scale"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    blob = st_save(tensors, metadata={"format": FORMAT, "heads": "[0, 2]"})
    receiver = LTEModel(tiny_vit(), SPEC, [])
    alone = []
    for part in parts:
        try:
            alone.append(decode_contribution(blob, "p", receiver, 10.0, part=part, dtype=dtype))
        except ContributionError as exc:
            alone.append(exc)
    parses = []
    monkeypatch.setattr(wire, "st_load", lambda data: parses.append(len(data)) or st_load(data))
    together = wire.decode_contribution_parts(blob, "p", receiver, 10.0, float("inf"), parts, dtype)
    assert parses == [len(blob)]
    for i, (a, b) in enumerate(zip(alone, together)):
        assert isinstance(a, ContributionError) == isinstance(b, ContributionError) == (i == broken), i
        if i == broken:
            assert str(a) == str(b) and "NaN or inf" in str(b)
        else:
            assert set(a.weights) == set(b.weights) and set(a.replicas) == set(b.replicas)
            assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
            assert all(torch.equal(a.replicas[n], b.replicas[n]) for n in a.replicas)
    garbage = wire.decode_contribution_parts(b"garbage", "p", receiver, 10.0, float("inf"), parts, dtype)
    assert all(isinstance(g, ContributionError) and "not a valid safetensors" in str(g) for g in garbage)
