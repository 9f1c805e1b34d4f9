"""A model whose every `nn.Linear` is W plus LoRA heads, with the LTE merge over those heads.

`LTEModel` holds H local heads (all N of a run in the one-process simulation, a peer's K heads in
the swarm). Their factors are stacked along a leading head dimension. A head runs by plugging its
slices into the wrapped model (`plugged`) and calling the model itself; several heads run in a loop
of those, or vectorised with `vmap` over `torch.func.functional_call`; both give the same numbers.
The wrapped model, called on its own, is the merged model: W plus the shared non-linear parameters.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Collection, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from swarm.lora import InitScale, LTELinear, delta_sum, head_seed, merge_scale, outer_step_, semi_orthogonal
from swarm.quant import QuantizedWeight, Storage

Variant = Literal["reset", "reset_less"]
Nonlinear = Literal["freeze", "replicate"]
Outer = Literal["average", "nesterov"]
MOMENTUM = "momentum/"  # shared-state key prefix of the outer optimizer's momentum buffers


@dataclass(frozen=True)
class LTESpec:
    """The LTE hyper-parameters a model is converted with (resolved from the run's config)."""

    n_heads: int
    rank: int
    alpha: float
    variant: Variant = "reset_less"
    nonlinear: Nonlinear = "freeze"
    storage: Storage = "fp32"
    seed: int = 0
    vectorised: bool = False
    split_qkv: bool = False
    init_scale: InitScale = "spectral"
    # The outer step a merge takes with the heads' mean change d (`LTEModel._merge_into`):
    # "average" adds outer_lr * d (1.0: plain averaging); "nesterov" keeps a momentum buffer m per
    # shared tensor, m = mu m + d, and adds outer_lr * (d + mu m), DiLoCo's outer Nesterov step
    # with d as the negative pseudo-gradient.
    outer: Outer = "average"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def own_weight(self) -> float:
        """The weight, relative to a head's own s, that a merge gives the head's change: 1/N of the
        outer step's coefficient on the round's mean change (outer_lr, times 1 + mu for Nesterov)."""
        momentum = self.outer_momentum if self.outer == "nesterov" else 0.0
        return self.outer_lr * (1.0 + momentum) / self.n_heads


class HeadFactors(nn.Module):
    """The stacked factors of the local heads for one layer; A0/B0 hold each head's factors at its
    last merge (reset-less variant only), As/Bs at its last contribution, which is a round ahead of
    its last merge when merges apply one round late (`LTEModel.delayed`)."""

    def __init__(self, a: torch.Tensor, out_features: int, with_baseline: bool, blocks: int = 1):
        super().__init__()
        h, r, _ = a.shape
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(h, out_features, r, dtype=a.dtype, device=a.device))
        self.register_buffer("A0", torch.zeros_like(a) if with_baseline else None)
        self.register_buffer("B0", torch.zeros_like(self.B) if with_baseline else None)
        self.register_buffer("As", torch.zeros_like(a) if with_baseline else None)
        self.register_buffer("Bs", torch.zeros_like(self.B) if with_baseline else None)
        if blocks > 1:
            # `blocks` separately adapted projections fused in one layer (q, k, v of timm's qkv):
            # B is block-diagonal, output block j only ever reading the rank-r code of A's block j.
            # Off-diagonal entries start at zero and get no gradient, so they stay zero under AdamW.
            mask = torch.block_diag(*[torch.ones(out_features // blocks, r // blocks)] * blocks)
            self.B.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def _key(name: str) -> str:
    return name.replace(".", ":")


def _exclusive(method):
    """Run `method` holding the model's lock: while a head is plugged in (a forward), the module's
    non-linear parameters are that head's replicas, so whatever reads or writes the shared state
    from another thread (a merge round in the background, a peer handing out W) waits for it."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class LTEModel(nn.Module):
    def __init__(self, model: nn.Module, spec: LTESpec, head_ids: Sequence[int], device: str | torch.device = "cpu"):
        super().__init__()
        if any(not 0 <= h < spec.n_heads for h in head_ids):
            raise ValueError(f"head ids {list(head_ids)} outside 0..{spec.n_heads - 1}")
        self.spec = spec
        self.head_ids = list(head_ids)
        self.lock = threading.RLock()  # see `_exclusive`; a trainer holds it across a whole step
        self.model = model.to(device)
        self.layer_names = _convert_linears(self.model, spec, device)
        if not self.layer_names:
            raise ValueError("the model has no nn.Linear layer to attach LoRA heads to")
        # Row blocks adapted as separate projections, each with its own rank-r head (split_qkv).
        self.row_blocks = {name: 3 if spec.split_qkv and _is_fused_qkv(name, self.layer(name)) else 1
                           for name in self.layer_names}
        for p in self.model.parameters():
            p.requires_grad_(False)

        # Non-linear parameters: frozen and shared, or one replica per head averaged at each merge.
        self.replicated = [n for n, _ in self.model.named_parameters()] if spec.nonlinear == "replicate" else []
        self.device = torch.device(device)
        self.factors = nn.ModuleDict()
        self.replicas = nn.ParameterDict()
        self.replica_base = nn.ParameterDict()
        self.replica_sent = nn.ParameterDict()
        # Merges apply one round late (training overlaps the merge's communication): a head's next
        # contribution then starts from its last contribution, not from its last merge. Reset-less only.
        self.delayed = False
        # With delayed merges, eager: a head's own contribution counts in its forward from the moment
        # it goes out, at the weight its merge will give it (`head_tensors`), not at its full s until
        # the merge lands; the agreed merge then replaces it. The shared state is untouched.
        self.eager = False
        self._build_heads({})
        # The outer optimizer's state: as shared as W (every peer computes it alike from the agreed
        # merges; a newcomer downloads it with W, a checkpoint keeps it), so it is in `shared_state`.
        self.momentum: dict[str, torch.Tensor] = {}
        if spec.outer == "nesterov":
            for name, layer in self.layers():
                self.momentum[f"{name}.weight"] = torch.zeros_like(layer.weight_store.master)
            params = dict(self.model.named_parameters())
            for name in self.replicated:
                self.momentum[name] = torch.zeros_like(params[name])

    def _fresh_a(self, head: int, index: int) -> torch.Tensor:
        name = self.layer_names[index]
        layer, seed = self.layer(name), head_seed(self.spec.seed, head, index)
        return torch.cat([semi_orthogonal(self.spec.rank, layer.in_features, seed=seed ^ block,
                                          dtype=layer.weight_store.master.dtype, scale=self.spec.init_scale)
                          for block in range(self.row_blocks[name])])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("lock", None)  # a lock does not copy; a copy gets a lock of its own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.lock = threading.RLock()

    def layer_rank(self, name: str) -> int:
        """Rows of A (columns of B) of a layer: r, or r per separately adapted block."""
        return self.spec.rank * self.row_blocks[name]

    def update_reach(self, steps: int, lr: float, replica_lr: float) -> dict[str, float]:
        """How far (Frobenius norm) `steps` AdamW steps of one head can move each layer and each
        replicated parameter, at the factors' rate `lr` and the replicas' `replica_lr`. Adam moves
        every entry by about its rate per step whatever the gradient's size, so a step of B moves
        s B A by s * lr * sqrt(m r) * |A|, A's spectral norm as it was drawn (sqrt(r/n), or
        sqrt(n/r) with init_scale reference), and a step of a replica moves it by replica_lr *
        sqrt(numel). Bounds on a contribution's size take the larger of this and the parameter's
        norm: a fresh ViT's layers are small next to what one honest round moves them by."""
        out = {}
        r = self.spec.rank
        for name, layer in self.layers():
            m, n = layer.out_features, layer.in_features
            a = (r / n) ** 0.5 if self.spec.init_scale == "spectral" else (n / r) ** 0.5
            out[name] = steps * lr * self.spec.scale * (m * self.layer_rank(name)) ** 0.5 * a
        params = dict(self.model.named_parameters())
        for name in self.replicated:
            out[name] = steps * replica_lr * params[name].numel() ** 0.5
        return out

    @torch.no_grad()
    def _build_heads(self, keep: dict[int, int]) -> None:
        """(Re)build the stacked head tensors for `self.head_ids`; heads in `keep` (head -> old
        position) keep their tensors, new heads start fresh (their A from the head's seed, B = 0)."""
        old_factors, old_replicas = self.factors, self.replicas
        old_base, old_sent = self.replica_base, self.replica_sent
        self.factors, self.replicas = nn.ModuleDict(), nn.ParameterDict()
        self.replica_base, self.replica_sent = nn.ParameterDict(), nn.ParameterDict()
        for index, name in enumerate(self.layer_names):
            layer = self.layer(name)
            a = [self._fresh_a(h, index) for h in self.head_ids]
            a = torch.stack(a) if a else torch.zeros(0, self.layer_rank(name), layer.in_features,
                                                     dtype=layer.weight_store.master.dtype)
            f = HeadFactors(a.to(self.device), layer.out_features, self.spec.variant == "reset_less",
                            self.row_blocks[name])
            for pos, h in enumerate(self.head_ids):
                if h in keep:
                    old = old_factors[_key(name)]
                    for attr in ("A", "B", "A0", "B0", "As", "Bs"):
                        if getattr(f, attr) is not None:
                            getattr(f, attr)[pos].copy_(getattr(old, attr)[keep[h]])
            self.factors[_key(name)] = f
        params = dict(self.model.named_parameters())
        for name in self.replicated:
            shared = params[name].detach()
            stacked = shared.unsqueeze(0).repeat(len(self.head_ids), *[1] * shared.dim())
            base, sent = stacked.clone(), stacked.clone()
            for pos, h in enumerate(self.head_ids):
                if h in keep:
                    stacked[pos] = old_replicas[_key(name)][keep[h]]
                    base[pos] = old_base[_key(name)][keep[h]]
                    sent[pos] = old_sent[_key(name)][keep[h]]
            self.replicas[_key(name)] = nn.Parameter(stacked)
            self.replica_base[_key(name)] = nn.Parameter(base, requires_grad=False)
            self.replica_sent[_key(name)] = nn.Parameter(sent, requires_grad=False)

    def set_heads(self, head_ids: Sequence[int]) -> dict[int, int]:
        """Hold a different set of heads (a peer won or lost a lease). Kept heads keep their state.

        The stacked parameters are new tensors afterwards, so an optimizer over them must follow:
        returns, for every kept head, its new position -> its old position (what the optimizer needs
        to carry the head's moments over)."""
        if any(not 0 <= h < self.spec.n_heads for h in head_ids):
            raise ValueError(f"head ids {list(head_ids)} outside 0..{self.spec.n_heads - 1}")
        keep = {h: self.head_ids.index(h) for h in head_ids if h in self.head_ids}
        self.head_ids = list(head_ids)
        self._build_heads(keep)
        return {self.head_ids.index(h): old for h, old in keep.items()}

    # ---- structure -------------------------------------------------------------------------
    @property
    def n_local(self) -> int:
        return len(self.head_ids)

    def layer(self, name: str) -> LTELinear:
        return self.model.get_submodule(name)

    def layers(self) -> list[tuple[str, LTELinear]]:
        return [(name, self.layer(name)) for name in self.layer_names]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """Stacked per-head tensors keyed by the wrapped model's parameter/buffer names: what a
        head's forward plugs in.

        Eager (`self.eager`, merges a round late): with w = `spec.own_weight`, a head runs on
        W + s (B A - Bs As) + w s (Bs As - B0 A0), its unsent work at full weight and its sent, not
        yet merged contribution at the weight the merge gives it, as if that merge had landed with
        the other heads' changes still to come. The baseline is then the rank-2r pair
        [As ; A0], [(1 - w) Bs | w B0], and a replica runs as base + w (sent - base) + (rep - sent).
        Once the merge lands (`settle_delayed`) As = A0 and sent = base, and the view is the plain one."""
        eager = self.delayed and self.eager
        w = self.spec.own_weight
        out: dict[str, torch.Tensor] = {}
        for name in self.layer_names:
            f = self.factors[_key(name)]
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = f.A, f.B
            if f.A0 is not None and eager:
                out[f"{name}.lora_A0"] = torch.cat([f.As, f.A0], dim=1)
                out[f"{name}.lora_B0"] = torch.cat([f.Bs * (1.0 - w), f.B0 * w], dim=2)
            elif f.A0 is not None:
                out[f"{name}.lora_A0"], out[f"{name}.lora_B0"] = f.A0, f.B0
        for name in self.replicated:
            rep = self.replicas[_key(name)]
            if eager:
                rep = rep - (1.0 - w) * (self.replica_sent[_key(name)] - self.replica_base[_key(name)])
            out[name] = rep
        return out

    # ---- forward ---------------------------------------------------------------------------
    @contextmanager
    def plugged(self, pos: int) -> Iterator[nn.Module]:
        """The wrapped model with local head `pos` plugged in (its factors in every `LTELinear`, its
        replicas in place of the shared non-linear parameters), restored on exit.

        Views into the stacked tensors are taken here, so gradients flow back to the stacks. A
        backward that recomputes activations (activation checkpointing) must run inside the same
        block, while the head is still plugged in."""
        tensors = {k: v[pos] for k, v in self.head_tensors().items()}
        saved = []
        with self.lock:  # see `_exclusive`
            try:
                for name, tensor in tensors.items():
                    module_name, _, leaf = name.rpartition(".")
                    module = self.model.get_submodule(module_name)
                    slots = module._parameters if leaf in module._parameters else module._buffers
                    saved.append((slots, leaf, slots[leaf]))
                    slots[leaf] = tensor  # what torch.func.functional_call does, for one head and no more
                yield self.model
            finally:
                for slots, leaf, original in reversed(saved):
                    slots[leaf] = original

    @contextmanager
    def _vectorised(self) -> Iterator[None]:
        """Switch the model to forms vmap can batch: the plain LoRA formula and unfused attention
        (vmap has no batching rule for the fused CPU attention kernels; the unfused path is exact)."""
        switched = [(m, m.fused_attn) for m in self.model.modules() if hasattr(m, "fused_attn")]
        try:
            for m, _ in switched:
                m.fused_attn = False
            for _, layer in self.layers():
                layer.batched = True
            yield
        finally:
            for m, fused in switched:
                m.fused_attn = fused
            for _, layer in self.layers():
                layer.batched = False

    @property
    def vectorised(self) -> bool:
        """Whether `forward` runs the heads under vmap: only with several heads and `spec.vectorised`.

        The loop is the default because each head then computes exactly what a peer holding that
        head alone computes (same kernels, same shapes), so the one-process simulation reproduces
        the swarm; under vmap the numbers agree only up to rounding, which moves nf4 codes. Speed,
        measured with `HeadTrainer` steps (forward, backward, AdamW; nf4 W, replicated non-linear
        parameters; median step, one compute thread on a 2-core CPU busy with other work): the
        digits ViT with 4 heads of 16 images ran 537.5 samples/s under vmap against 444.8 in the
        loop (tiny layers: per-op overhead dominates, and vmap pays it once for all heads); a
        ViT-S/32 with 2 heads of 16 images at 224 px ran 2.0 under vmap against 2.1 in the loop
        (vmap also needs the unfused attention and the plain LoRA formula). A single head always
        runs the model directly."""
        return self.spec.vectorised and self.n_local > 1

    @_exclusive
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head forward: x is (H, batch, ...) with head i's own batch at x[i]."""
        if x.shape[0] != self.n_local:
            raise ValueError(f"input has {x.shape[0]} head slices, the model holds {self.n_local} heads")
        if torch.is_grad_enabled() and getattr(self.model, "grad_checkpointing", False):
            # The recomputation in backward would run with no head (or another one) plugged in.
            raise RuntimeError("with activation checkpointing, run each head's forward and backward "
                               "inside `plugged(head)`")
        if self.vectorised:
            tensors = self.head_tensors()

            def one_head(t: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
                return functional_call(self.model, t, (xi,))
            with self._vectorised():
                return vmap(one_head, randomness="different")(tensors, x)
        outs = []
        for i in range(self.n_local):
            with self.plugged(i) as model:
                outs.append(model(x[i]))
        return torch.stack(outs)

    def forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """The merged model: W and the shared non-linear parameters, no head term."""
        return self.model(x)

    # ---- merge -----------------------------------------------------------------------------
    def local_indices(self, heads: Sequence[int] | None) -> list[int]:
        """Positions of run head ids `heads` among the local heads (all of them for None)."""
        if heads is None:
            return list(range(self.n_local))
        return [self.head_ids.index(h) for h in sorted(heads)]

    def _layers_in(self, targets: Collection[str] | None) -> list[str]:
        """The layers among `targets` (layer and replicated parameter names; all for None), in order."""
        return list(self.layer_names) if targets is None else [n for n in self.layer_names if n in targets]

    def _replicated_in(self, targets: Collection[str] | None) -> list[str]:
        return list(self.replicated) if targets is None else [n for n in self.replicated if n in targets]

    @torch.no_grad()
    def weight_deltas(self, heads: Sequence[int] | None = None,
                      targets: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Per layer (of `targets`, or all), the sum of the given heads' unmerged changes of B A (not yet
        scaled), computed in float64 so that the result hardly depends on the order or form in which it
        is computed."""
        idx = self.local_indices(heads)
        out = {}
        for name in self._layers_in(targets):
            f = self.factors[_key(name)]
            out[name] = delta_sum(*_as_double(f.A, f.B, *self.contribution_base(name)), idx).to("cpu")
        return out

    def contribution_base(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(A, B) that a layer's next contribution is measured from: the factors at the heads' last
        merge, or at their last contribution when merges apply one round late."""
        f = self.factors[_key(name)]
        return (f.As, f.Bs) if self.delayed else (f.A0, f.B0)

    @torch.no_grad()
    def replica_deltas(self, heads: Sequence[int] | None = None,
                       targets: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Per replicated parameter (of `targets`, or all), the sum of the given heads' changes since
        their last merge."""
        idx = self.local_indices(heads)
        out = {}
        for name in self._replicated_in(targets):
            rep = self.replicas[_key(name)]
            base = (self.replica_sent if self.delayed else self.replica_base)[_key(name)]
            total = torch.zeros_like(rep[0])
            for i in idx:
                total += rep[i] - base[i]
            out[name] = total.to("cpu")
        return out

    @torch.no_grad()
    @_exclusive
    def apply_merge(self, weight_deltas: dict[str, torch.Tensor], replica_deltas: dict[str, torch.Tensor]) -> None:
        """W += (s/N) * sum of head deltas; shared non-linear params += (1/N) * sum of replica deltas.

        The inputs are sums over every head that takes part in the merge (local or remote), for the
        layers and parameters the merge covers (all of them, or one fragment's: `lte.fragments`)."""
        self._merge_into(self._shared_tensors(), weight_deltas, replica_deltas)
        for name in self._layers_in(weight_deltas):
            self.layer(name).weight_store.requantize()

    def _merge_into(self, state: dict[str, torch.Tensor], weight_deltas: dict[str, torch.Tensor],
                    replica_deltas: dict[str, torch.Tensor]) -> None:
        """The one arithmetic of a merge, in place on `state` (named as in `shared_state`): the
        model's own tensors (`apply_merge`) or copies of them (`digest_after`), so that the W a
        peer votes for before applying a merge is bit for bit the W it then holds. Deltas are cast to
        the state's dtype first: `p.add_(float64, alpha)` would scale in float64 and round once, a
        float32 delta rounds twice, and the same values must give the same bits however they came."""
        spec = self.spec
        coef = merge_scale(spec.scale, spec.n_heads)
        unknown = (set(weight_deltas) - set(self.layer_names)) | (set(replica_deltas) - set(self.replicated))
        if unknown:
            raise ValueError(f"deltas for {sorted(unknown)[:3]}, which the model does not merge")
        steps = [(f"{name}.weight", weight_deltas[name], coef) for name in self._layers_in(weight_deltas)]
        steps += [(name, replica_deltas[name], 1.0 / spec.n_heads) for name in self._replicated_in(replica_deltas)]
        for key, delta, weight in steps:
            w = state[key]
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"delta of shape {tuple(delta.shape)} for {key} of shape {tuple(w.shape)}")
            delta = delta.to(device=w.device, dtype=w.dtype)
            momentum = state[MOMENTUM + key] if spec.outer == "nesterov" else None
            outer_step_(w, delta, weight, spec.outer_lr, momentum, spec.outer_momentum)

    @torch.no_grad()
    @_exclusive
    def mark_merged(self, heads: Sequence[int] | None = None, targets: Collection[str] | None = None) -> None:
        """Record that these heads' changes (to `targets`, or all) are in W: reset B (reset) or move the
        baseline (reset-less).

        A and the optimizer state are kept either way. Replicas restart from the shared values."""
        idx = self.local_indices(heads)
        for name in self._layers_in(targets):
            f = self.factors[_key(name)]
            for i in idx:
                if f.A0 is None:
                    f.B[i].zero_()
                else:
                    f.A0[i].copy_(f.A[i])
                    f.B0[i].copy_(f.B[i])
        params = dict(self.model.named_parameters())
        for name in self._replicated_in(targets):
            for i in idx:
                self.replicas[_key(name)][i].copy_(params[name])
                self.replica_base[_key(name)][i].copy_(params[name])

    @torch.no_grad()
    @_exclusive
    def settle_delayed(self, merged: bool, heads: Sequence[int] | None = None,
                       targets: Collection[str] | None = None) -> None:
        """With merges one round late, after the previous round's merge was applied to W (or not):
        a head whose last contribution is in W now has it as its baseline (its forward gets it from
        W, averaged with the others'); one whose contribution was left out measures its next one
        from its last merge again, so that it carries the left-out work. Replicas restart from the
        shared values plus the work not in them. Only `targets` (all for None): what the merge covered."""
        idx = self.local_indices(heads)
        for name in self._layers_in(targets):
            f = self.factors[_key(name)]
            for i in idx:
                if merged:
                    f.A0[i].copy_(f.As[i])
                    f.B0[i].copy_(f.Bs[i])
                else:
                    f.As[i].copy_(f.A0[i])
                    f.Bs[i].copy_(f.B0[i])
        params = dict(self.model.named_parameters())
        for name in self._replicated_in(targets):
            rep, base, sent = (d[_key(name)] for d in (self.replicas, self.replica_base, self.replica_sent))
            for i in idx:
                rep[i].sub_((sent if merged else base)[i]).add_(params[name])
                base[i].copy_(params[name])
                sent[i].copy_(params[name])

    @torch.no_grad()
    def mark_sent(self, heads: Sequence[int] | None = None, targets: Collection[str] | None = None) -> None:
        """These heads' change so far (to `targets`, or all) went out as a contribution: the next one
        starts from here."""
        idx = self.local_indices(heads)
        for name in self._layers_in(targets):
            f = self.factors[_key(name)]
            for i in idx:
                f.As[i].copy_(f.A[i])
                f.Bs[i].copy_(f.B[i])
        for name in self._replicated_in(targets):
            for i in idx:
                self.replica_sent[_key(name)][i].copy_(self.replicas[_key(name)][i])

    @torch.no_grad()
    def digest_after(self, weight_deltas: dict[str, torch.Tensor], replica_deltas: dict[str, torch.Tensor]) -> str:
        """The `state_digest` W would have after `apply_merge(weight_deltas, replica_deltas)`,
        computed on copies without touching the model."""
        state = {k: v.detach().clone() for k, v in self.shared_state().items()}
        self._merge_into(state, weight_deltas, replica_deltas)
        return _digest(state)

    def merge(self, heads: Sequence[int] | None = None, targets: Collection[str] | None = None) -> None:
        """One-process merge of the given local heads (all by default), of `targets` (all by default)."""
        self.apply_merge(self.weight_deltas(heads, targets), self.replica_deltas(heads, targets))
        self.mark_merged(heads, targets)

    # ---- state ---------------------------------------------------------------------------
    @_exclusive
    def shared_state(self) -> dict[str, torch.Tensor]:
        """What every peer of a run must hold identically: the W masters and the shared non-linear
        parameters (the heads are private to their holders)."""
        return self._shared_tensors()

    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        """`shared_state`, for a caller that holds the lock already: views of the model's own
        tensors, which an in-place change changes in the model."""
        out = {f"{name}.weight": layer.weight_store.master for name, layer in self.layers()}
        out.update({name: p.detach() for name, p in self.model.named_parameters()})
        out.update({MOMENTUM + key: m for key, m in self.momentum.items()})
        return out

    @torch.no_grad()
    @_exclusive
    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.shared_state()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(f"state tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        for name, layer in self.layers():
            layer.weight_store.load_(state[f"{name}.weight"])
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
        for key, m in self.momentum.items():
            m.copy_(state[MOMENTUM + key].to(m.device, m.dtype))

    def state_digest(self) -> str:
        """sha256 of the shared state's exact bytes: equal digests, equal models."""
        return _digest(self.shared_state())

    def weight_digest(self) -> str:
        """sha256 of every layer's forward (quantized) W, in layer order: equal W, equal digest."""
        hasher = hashlib.sha256()
        for _, layer in self.layers():
            layer.weight_store.update_digest(hasher)
        return hasher.hexdigest()

    @torch.no_grad()
    def merged_state_dict(self, source: Literal["master", "forward"] = "forward") -> dict[str, torch.Tensor]:
        """The merged model as a plain state dict with the original module's keys.

        `forward` exports the dequantized W the swarm evaluates with; `master` the fp32 master."""
        sd = {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        for name, layer in self.layers():
            store = layer.weight_store
            w = store.master if source == "master" else store.weight(store.master.dtype)
            sd[f"{name}.weight"] = w.detach().to("cpu").clone()
        return sd


def _digest(state: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for key, tensor in state.items():
        hasher.update(key.encode())
        hasher.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _as_double(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().double() for t in tensors]


def _is_fused_qkv(name: str, layer: LTELinear) -> bool:
    """timm's attention computes q, k and v with one Linear named `qkv` of 3 x dim outputs."""
    return name.rpartition(".")[2] == "qkv" and layer.out_features % 3 == 0


def _convert_linears(model: nn.Module, spec: LTESpec, device: str | torch.device) -> list[str]:
    """Replace every nn.Linear in place by an LTELinear; returns their names in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        store = QuantizedWeight(linear.weight.detach(), spec.storage, device=device)
        new = LTELinear(store, linear.bias, spec.scale).to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return names


def clip_head_grads_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each head's gradient to `max_norm` on its own, as if every head had its own optimizer.

    Every tensor in `params` is stacked over heads along dim 0; returns the per-head norms. Each
    head's norm is summed from its own rows alone, in the same order whatever other heads the stack
    holds: a reduction over a (heads, n) tensor splits its sums differently for 1 and for 4 rows,
    and a peer holding one head must clip it exactly as the one-process simulation holding all."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([torch.stack([g[i].pow(2).sum() for g in grads]).sum()
                         for i in range(grads[0].shape[0])]).sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return norms
