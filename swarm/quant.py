"""The main weight W of one layer: an fp32 master in host memory and a quantized copy for the forward.

Merges add deltas far smaller than half a 4-bit (or even bf16) step, so they must accumulate in the
high-precision master; the forward copy is re-quantized from the master after every merge. Peers
compare hashes of the quantized copies, so quantization is a pure function of the master's bytes.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

import torch


def _import_bitsandbytes():
    """`bitsandbytes.functional`, without building torch's compiler. On import bitsandbytes wraps
    its generic fallback kernels in `torch.compile`, which imports dynamo and inductor: about 3 s
    of CPU in every process, half of a peer's start-up, paid nine times over when a swarm starts on
    one machine. The CPU and CUDA have kernels of their own; the fallbacks run as written."""
    # bitsandbytes warns at import that an optional CPU kernel package is missing; the fallback is fine.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    compile_ = torch.compile
    torch.compile = lambda model=None, **_: model if model is not None else (lambda fn: fn)
    try:
        import bitsandbytes.functional as functional
    finally:
        torch.compile = compile_
    return functional


bnbf = _import_bitsandbytes()

Storage = Literal["fp32", "bf16", "int8", "nf4"]
STORAGES: tuple[Storage, ...] = ("fp32", "bf16", "int8", "nf4")

NF4_BLOCKSIZE = 64
INT8_BLOCKSIZE = 256


class QuantizedWeight:
    """Master copy plus forward copy of one weight matrix.

    `fp32` keeps the forward copy unquantized in the master's dtype (float32, or float64 when a test
    runs the whole model in double precision); `bf16` rounds to bfloat16; `int8` is bitsandbytes'
    blockwise dynamic 8-bit; `nf4` is bitsandbytes' 4-bit NormalFloat with blocks of 64.
    """

    def __init__(self, weight: torch.Tensor, storage: Storage, device: torch.device | str = "cpu"):
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGES)}")
        self.storage: Storage = storage
        self.device = torch.device(device)
        self.shape = tuple(weight.shape)
        self.master = weight.detach().to("cpu", copy=True).contiguous()
        self._packed: torch.Tensor
        self._state: object = None
        self.requantize()

    @property
    def numel(self) -> int:
        return self.master.numel()

    def requantize(self) -> None:
        """Rebuild the forward copy from the master; deterministic for a given master."""
        source = self.master.to(self.device)
        if self.storage == "fp32":
            # On the CPU this aliases the master: nothing to save by keeping a second copy.
            self._packed = source
        elif self.storage == "bf16":
            self._packed = source.to(torch.bfloat16)
        elif self.storage == "int8":
            self._packed, self._state = bnbf.quantize_blockwise(source.float(), blocksize=INT8_BLOCKSIZE)
        else:
            self._packed, self._state = bnbf.quantize_4bit(
                source.float(), blocksize=NF4_BLOCKSIZE, quant_type="nf4"
            )

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The forward weight (dequantized when stored in int8 or nf4), cast to `dtype` if given."""
        if self.storage in ("fp32", "bf16"):
            w = self._packed
        elif self.storage == "int8":
            w = bnbf.dequantize_blockwise(self._packed, self._state, blocksize=INT8_BLOCKSIZE)
        else:
            w = bnbf.dequantize_4bit(self._packed, self._state).reshape(self.shape)
        return w if dtype is None else w.to(dtype)

    @torch.no_grad()
    def add_(self, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """master += alpha * delta, then re-quantize. The delta is applied in the master's dtype."""
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"delta of shape {tuple(delta.shape)} for a weight of shape {self.shape}")
        self.master.add_(delta.to(device="cpu", dtype=self.master.dtype), alpha=alpha)
        self.requantize()

    @torch.no_grad()
    def load_(self, master: torch.Tensor) -> None:
        """Replace the master (state sync from another peer or a checkpoint) and re-quantize."""
        if tuple(master.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(master.shape)} for a layer of shape {self.shape}")
        self.master.copy_(master.to(dtype=self.master.dtype, device="cpu"))
        self.requantize()

    def forward_bytes(self) -> int:
        """Bytes the forward copy occupies (packed data plus quantization constants)."""
        total = self._packed.numel() * self._packed.element_size()
        absmax = getattr(self._state, "absmax", None)
        if absmax is not None:
            total += absmax.numel() * absmax.element_size()
        return total

    def update_digest(self, hasher: "hashlib._Hash") -> None:
        """Feed the forward copy's exact bytes (and scales) into `hasher`."""
        hasher.update(_tensor_bytes(self._packed))
        absmax = getattr(self._state, "absmax", None)
        if absmax is not None:
            hasher.update(_tensor_bytes(absmax))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
