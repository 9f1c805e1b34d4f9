"""Quantized W: merges accumulate in the fp32 master, the forward copy is quantize(master) exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch
import bitsandbytes.functional as bnbf

from swarm.quant import INT8_BLOCKSIZE, NF4_BLOCKSIZE, QuantizedWeight


def _digest(q: QuantizedWeight) -> str:
    h = hashlib.sha256()
    q.update_digest(h)
    return h.hexdigest()


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8", "nf4"])
def test_thousand_tiny_merges_are_not_lost(storage):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(48, 64, generator=g)
    store = QuantizedWeight(w0, storage)
    reference = w0.clone()
    total = torch.zeros(48, 64, dtype=torch.float64)
    for _ in range(1000):
        delta = torch.randn(48, 64, generator=g) * 1e-4 + 1e-5  # far below half a 4-bit (or bf16) step
        store.add_(delta, alpha=0.5)
        reference.add_(delta, alpha=0.5)
        total += 0.5 * delta.double()
    assert torch.equal(store.master, reference)  # exactly the fp32 running sum
    torch.testing.assert_close(store.master.double() - w0.double(), total, rtol=0, atol=1e-5)
    assert (store.master - w0).abs().mean() > 1e-3  # the master moved by the merges' total
    rebuilt = QuantizedWeight(reference, storage)  # quantize(master), computed independently
    assert _digest(store) == _digest(rebuilt)
    assert torch.equal(store.weight(), rebuilt.weight())


@pytest.mark.parametrize("storage", ["bf16", "nf4"])
def test_accumulating_into_the_quantized_copy_would_lose_the_merges(storage):
    """Why the master exists: re-quantizing W_q + delta rounds each tiny delta away, while the
    master-based copy moves by (nearly) the merges' total."""
    w0 = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    naive, kept = QuantizedWeight(w0, storage), QuantizedWeight(w0, storage)
    start = naive.weight().clone()
    for _ in range(100):
        naive = QuantizedWeight(naive.weight() + 1e-5, storage)
        kept.add_(torch.full_like(w0, 1e-5))
    total = 100 * 1e-5
    assert (naive.weight() - start).mean() < 0.1 * total
    assert (kept.weight() - start).mean() > 0.8 * total


def _max_gap(code: torch.Tensor) -> float:
    return code.sort().values.diff().max().item()


@pytest.mark.parametrize("storage,blocksize,code", [
    ("int8", INT8_BLOCKSIZE, lambda: bnbf.create_dynamic_map(signed=True)),
    ("nf4", NF4_BLOCKSIZE, lambda: bnbf.get_4bit_type("nf4", device="cpu")),
])
def test_round_trip_error_is_within_one_code_step(storage, blocksize, code):
    """Blockwise quantization maps each value to a neighbouring code * block absmax (bitsandbytes'
    CPU path does not always pick the nearest one), so the error is below the widest gap of the
    code book times the block's absmax."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 3
    back = QuantizedWeight(w, storage).weight()
    blocks = w.flatten().view(-1, blocksize)
    err = (back.flatten().view(-1, blocksize) - blocks).abs().max(1).values
    bound = _max_gap(code()) * blocks.abs().max(1).values
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0  # it is a lossy format


def test_bf16_round_trip_is_within_half_an_ulp():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    back = QuantizedWeight(w, "bf16").weight(torch.float32)
    assert ((back - w).abs() <= w.abs() * 2 ** -8).all()


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8", "nf4"])
def test_digest_follows_the_master(storage):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    a, b = QuantizedWeight(w, storage), QuantizedWeight(w.clone(), storage)
    assert _digest(a) == _digest(b)
    b.add_(torch.full_like(w, 0.5))
    assert _digest(a) != _digest(b)
    with pytest.raises(ValueError, match="shape"):
        a.add_(torch.zeros(3, 3))


def test_quantized_forward_copy_is_smaller():
    w = torch.randn(256, 256)
    sizes = {s: QuantizedWeight(w, s).forward_bytes() for s in ("fp32", "bf16", "int8", "nf4")}
    assert sizes["fp32"] == 4 * w.numel()
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
