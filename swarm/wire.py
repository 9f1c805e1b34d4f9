"""What goes over the wire: a peer's contribution to a merge round, and the shared state (W).

Per layer a contribution carries whichever form is cheaper: the heads' low-rank factors
(K r (m + n) numbers, twice that with the reset-less baseline) or the dense sum of their deltas
(m n numbers). Factors win for few heads or small ranks, the dense form for many heads on one peer.
Either way the receiver gets the sum of *products*, never separately averaged A's and B's, and
both forms decode to the same float32 delta (products are formed in float64, then rounded once).

Everything received is validated before it touches W: format, head ids, names, shapes, dtypes,
finiteness and the size of the update it would make.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from swarm.lora import delta_sum, merge_scale
from swarm.lte_model import LTEModel, _as_double

FORMAT = "lte-swarm/contribution/1"
STATE_FORMAT = "lte-swarm/state/1"

# Precision on the wire. Contributions (factors, dense deltas and replica deltas alike) and reduced
# parts travel as fp32, bf16 or blockwise 8-bit numbers (int8 values, one float32 scale per
# `INT8_BLOCK`); reduced parts also as blockwise 4-bit ones (two values a byte, one float32 scale
# per `INT4_BLOCK`). Whatever travels, every peer adds the same dequantized float32 values to its
# master, and the simulation rounds the same way (`reduce_in_process`), so the swarm still
# reproduces it. Rounded factors lose nothing over rounds with the reset-less baseline: a round
# sends q(B)q(A) - q(B0)q(A0) and the next round's baseline is this round's factors, rounded the
# same way, so the roundings cancel from round to round. A reduced part's rounding is not carried
# over: each merge adds it once.
Precision = Literal["fp32", "bf16", "int8"]
WireDtype = Precision                                 # of contributions
ReducedDtype = Literal["fp32", "bf16", "int8", "int4"]  # of reduced parts
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT8_BLOCK = 256     # values per scale in a blockwise 8-bit tensor
INT4_BLOCK = 64      # values per scale in a blockwise 4-bit reduced part: 4.5 bits a value
_BLOCKS = {"int8": (INT8_BLOCK, 127), "int4": (INT4_BLOCK, 7)}  # values per scale, largest code
_SCALE = "#scale"    # suffix of a blockwise tensor's scales


class ContributionError(ValueError):
    """A contribution or state blob is corrupt, malformed or out of bounds; it is dropped."""


@dataclass(frozen=True)
class Contribution:
    peer: str
    heads: tuple[int, ...]
    weights: dict[str, torch.Tensor]   # layer -> float32 (m, n) sum of head deltas (unscaled)
    replicas: dict[str, torch.Tensor]  # shared param -> float32 sum of replica deltas
    nbytes: int


@dataclass(frozen=True)
class ParsedBlob:
    """A contribution blob (or one part of it) parsed from its bytes once: a round expands it
    (`expand_parsed`), keeps its factors as the next blob's baseline (`parsed_factors`) and
    checks it (`check_parts`) from the same tensors."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    nbytes: int  # bytes received


def parse_contribution(blob: bytes) -> ParsedBlob:
    """The tensors and metadata of a contribution blob; hostile bytes raise ContributionError."""
    tensors, meta = _load(blob, FORMAT)
    return ParsedBlob(tensors, meta, len(blob))


def factor_numbers(k: int, rank: int, m: int, n: int, with_baseline: bool) -> int:
    return k * rank * (m + n) * (2 if with_baseline else 1)


def encode_contribution(model: LTEModel, heads: list[int], form: Literal["auto", "factors", "dense"] = "auto",
                        dtype: WireDtype = "fp32", targets: frozenset[str] | None = None
                        ) -> tuple[bytes, dict[str, int]]:
    """Serialize the unmerged change of `heads` (run head ids held by `model`) to `targets` (the
    layers and replicated parameters the round merges; all for None), its numbers in `dtype`.

    `form` picks the cheaper form per layer (auto) or forces one (for measurements). Returns the
    blob and counts of layers sent as factors and as dense deltas."""
    wire = _TORCH_DTYPES.get(dtype, torch.float32)  # int8: quantized below, from float32
    idx = model.local_indices(heads)
    baseline = model.spec.variant == "reset_less"
    tensors: dict[str, torch.Tensor] = {}
    counts = {"factor_layers": 0, "dense_layers": 0}
    for name, layer in model.layers():
        if targets is not None and name not in targets:
            continue
        f = model.factors[name.replace(".", ":")]
        a0, b0 = model.contribution_base(name)
        m, n = layer.out_features, layer.in_features
        cheaper = factor_numbers(len(idx), model.layer_rank(name), m, n, baseline) < m * n
        if form == "factors" or (form == "auto" and cheaper):
            tensors[f"w/{name}/A"] = f.A.detach()[idx].to(wire).contiguous()
            tensors[f"w/{name}/B"] = f.B.detach()[idx].to(wire).contiguous()
            if baseline:
                tensors[f"w/{name}/A0"] = a0[idx].to(wire).contiguous()
                tensors[f"w/{name}/B0"] = b0[idx].to(wire).contiguous()
            counts["factor_layers"] += 1
        else:
            tensors[f"w/{name}/D"] = delta_sum(*_as_double(f.A, f.B, a0, b0), idx).to(wire).contiguous()
            counts["dense_layers"] += 1
    for name, total in model.replica_deltas(heads, targets).items():
        tensors[f"r/{name}"] = total.to(wire).contiguous()
    if dtype == "int8":
        tensors = quantize(tensors, "int8")
    meta = {"format": FORMAT, "heads": json.dumps(sorted(heads))}
    return st_save({k: v.cpu() for k, v in tensors.items()}, metadata=meta), counts


_HEADER_SLACK = 1 << 16   # a safetensors header: names, shapes, offsets, metadata
_PER_TENSOR_SLACK = 256


def contribution_bound(model: LTEModel) -> int:
    """The most bytes an honest contribution to this model can take: every layer in the dense
    form (the encoder never sends factors bigger than that) plus the replica deltas."""
    numbers = sum(layer.out_features * layer.in_features for _, layer in model.layers())
    shared = dict(model.model.named_parameters())
    numbers += sum(shared[name].numel() for name in model.replicated)
    tensors = 4 * len(model.layer_names) + len(model.replicated)
    return 4 * numbers + _PER_TENSOR_SLACK * tensors + _HEADER_SLACK


def state_bound(model: LTEModel) -> int:
    """The most bytes a state blob of this model can take."""
    state = model.shared_state()
    return sum(4 * t.numel() for t in state.values()) + _PER_TENSOR_SLACK * len(state) + _HEADER_SLACK


def decode_contribution(blob: bytes, peer: str, model: LTEModel, max_update: float,
                        max_relative_update: float = float("inf"), part: frozenset[str] | None = None,
                        dtype: WireDtype = "fp32", reach: Mapping[str, float] | None = None,
                        scope: frozenset[str] | None = None) -> Contribution:
    """Parse and validate a contribution (see `_check_contribution`), or only the layers and
    replicas named in `part` (see `plan_parts`); its numbers must be the run's wire `dtype`, and it
    may carry nothing outside what the round merges (`scope`; None: all of W). Whatever goes wrong
    with hostile bytes is a ContributionError, never another exception."""
    out = decode_contribution_parts(blob, peer, model, max_update, max_relative_update, [part], dtype, reach=reach,
                                    scope=scope)[0]
    if isinstance(out, ContributionError):
        raise out
    return out


def decode_contribution_parts(blob: bytes, peer: str, model: LTEModel, max_update: float,
                              max_relative_update: float, parts: list[frozenset[str] | None],
                              dtype: WireDtype = "fp32", reach: Mapping[str, float] | None = None,
                              scope: frozenset[str] | None = None) -> list[Contribution | ContributionError]:
    """`decode_contribution` of each of `parts` of one blob, parsed once (see `check_parts`)."""
    try:
        parsed = parse_contribution(blob)
    except ContributionError as exc:
        return [exc] * len(parts)
    return check_parts(parsed, peer, model, max_update, max_relative_update, parts, dtype, reach=reach, scope=scope)


def check_parts(parsed: ParsedBlob, peer: str, model: LTEModel, max_update: float, max_relative_update: float,
                parts: list[frozenset[str] | None], dtype: WireDtype = "fp32", reach: Mapping[str, float] | None = None,
                scope: frozenset[str] | None = None) -> list[Contribution | ContributionError]:
    """Per part of `parts` of a parsed blob, its Contribution, or the ContributionError that
    rejects that part alone. (A peer that checks every part of a whole contribution, as the
    coordinator does, would otherwise parse the whole blob once per part: 64 parses of 43 MB per
    member and round at the paper's setting.) A blob with any tensor outside the round's `scope`
    (its fragment's layers and parameters; None: all of W), or of no target at all, is refused
    whole, whichever part is checked."""
    known = scope if scope is not None else frozenset(model.layer_names) | frozenset(model.replicated)
    stray = sorted(k for k in parsed.tensors if _target(k) not in known)
    if stray:
        return [ContributionError(f"tensors outside the round's merge: {stray[:3]}")] * len(parts)
    out: list[Contribution | ContributionError] = []
    for part in parts:
        try:
            out.append(_check_contribution(parsed.tensors, parsed.meta, parsed.nbytes, peer, model, max_update,
                                           max_relative_update, part, dtype, reach or {}))
        except ContributionError as exc:
            out.append(exc)
        except Exception as exc:  # e.g. a failing allocation for hostile shapes (parsing failed in `_load`)
            out.append(ContributionError(f"malformed contribution ({type(exc).__name__})"))
    return out


def _check_contribution(tensors: dict[str, torch.Tensor], meta: dict[str, str], nbytes: int, peer: str,
                        model: LTEModel, max_update: float, max_relative_update: float,
                        part: frozenset[str] | None = None, dtype: WireDtype = "fp32",
                        reach: Mapping[str, float] = {}) -> Contribution:
    """Validate a parsed contribution (or its `part`) against this run's model; raises
    ContributionError. `tensors` is left as it was: the other parts are checked from it too.

    Besides format, heads, shapes and finiteness, the change is bounded twice: no weight may move
    by more than `max_update`, and per head no layer may move by more than `max_relative_update`
    of the larger of that layer's norm and its `reach` (how far one head's round of AdamW steps at
    the run's rates can move it, `LTEModel.update_reach`). A norm bound: a few huge entries, which
    would wreck the scale of a quantization block, fail it even when each is within `max_update`;
    the reach keeps it from refusing honest rounds of a freshly initialised model, whose layers
    are small next to one round's steps."""
    if dtype == "int8":
        if part is not None:  # other parts' tensors are not ours to judge (see below), nor to dequantize
            tensors = {k: v for k, v in tensors.items() if _target(k) in part}
        tensors = _dequantize_contribution(tensors)
    wire = _TORCH_DTYPES.get(dtype, torch.float32)
    try:
        heads = tuple(json.loads(meta.get("heads", "")))
    except (json.JSONDecodeError, TypeError):
        raise ContributionError("its head list is not valid JSON") from None
    n_heads = model.spec.n_heads
    if not heads or any(not isinstance(h, int) or not 0 <= h < n_heads for h in heads) or len(set(heads)) != len(heads):
        raise ContributionError(f"bad head ids {list(heads)[:8]} (the run has heads 0..{n_heads - 1})")
    k = len(heads)
    baseline = model.spec.variant == "reset_less"
    weights: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, layer in model.layers():
        if part is not None and name not in part:
            continue
        m, n, r = layer.out_features, layer.in_features, model.layer_rank(name)
        if f"w/{name}/D" in tensors:
            weights[name] = _take(tensors, f"w/{name}/D", (m, n), used, wire).float()
        else:
            a = _take(tensors, f"w/{name}/A", (k, r, n), used, wire)
            b = _take(tensors, f"w/{name}/B", (k, m, r), used, wire)
            a0 = _take(tensors, f"w/{name}/A0", (k, r, n), used, wire) if baseline else None
            b0 = _take(tensors, f"w/{name}/B0", (k, m, r), used, wire) if baseline else None
            weights[name] = delta_sum(*_as_double(a, b, a0, b0)).float()
    shared = dict(model.model.named_parameters())
    replicas = {name: _take(tensors, f"r/{name}", tuple(shared[name].shape), used, wire).float()
                for name in model.replicated if part is None or name in part}
    extra = {k for k in set(tensors) - used if part is None or _target(k) in part}  # other parts' are not ours to judge
    if extra:
        raise ContributionError(f"unexpected tensors {sorted(extra)[:3]}")
    coef = merge_scale(model.spec.scale, n_heads)
    for name, delta in weights.items():
        if not torch.isfinite(delta).all():
            raise ContributionError(f"layer {name}: its delta is not finite")
        biggest = delta.abs().max().item() * coef if delta.numel() else 0.0
        if biggest > max_update:
            raise ContributionError(f"layer {name}: it would move a weight by {biggest:.3g} (limit {max_update})")
        size = max(model.layer(name).weight_store.master.norm().item(), reach.get(name, 0.0), 1e-12)
        relative = coef * delta.double().norm().item() / k / size
        if relative > max_relative_update:
            raise ContributionError(f"layer {name}: per head it would move the layer by {relative:.3g} of its norm "
                                    f"or reach (limit {max_relative_update})")
    for name, delta in replicas.items():
        if delta.abs().max().item() / n_heads > max_update:
            raise ContributionError(f"parameter {name}: it would move a value by more than {max_update}")
        # Per head, relative to the parameter's norm or its reach; zero-initialised ones (biases)
        # get a floor of 0.01 per entry where the reach is not known.
        p = shared[name]
        floor = max(p.norm().item(), reach.get(name, 1e-2 * p.numel() ** 0.5))
        relative = delta.double().norm().item() / n_heads / k / floor
        if relative > max_relative_update:
            raise ContributionError(f"parameter {name}: per head it would move it by {relative:.3g} of its norm "
                                    f"or reach (limit {max_relative_update})")
    return Contribution(peer=peer, heads=heads, weights=weights, replicas=replicas, nbytes=nbytes)


def _dequantize_contribution(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A blockwise 8-bit contribution's float32 values; every value tensor needs its scales."""
    for key, t in tensors.items():
        if key.endswith(_SCALE):
            if key[:-len(_SCALE)] not in tensors:
                raise ContributionError(f"scales {key} without values")
            continue
        scale = tensors.get(key + _SCALE)
        if t.dtype != torch.int8:
            raise ContributionError(f"tensor {key} is {_dtype_name(t.dtype)}, expected int8")
        if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (-(-t.numel() // INT8_BLOCK),):
            raise ContributionError(f"tensor {key} lacks its float32 scales (one per {INT8_BLOCK} values)")
        if not torch.isfinite(scale).all():
            raise ContributionError(f"tensor {key} has NaN or inf scales")
    return dequantized(tensors, "int8")


def reduce_contributions(model: LTEModel, contributions: list[Contribution], robust_clip: float = 0.0,
                         part: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """Per layer and replicated parameter (those in `part`, or all), the float64 sum of every
    contribution, in a canonical order (by the lowest head each covers, then by writer), so every
    peer reducing the same contributions gets the same bits, and a swarm of one head per peer adds
    in the order the one-process simulation adds its heads. Every name is looked at on its own, so
    reducing parts separately gives what reducing the whole gives.

    With `robust_clip` > 0 and 3 or more contributions, a contribution whose change of a layer
    (per head it covers) exceeds `robust_clip` times the round's upper median is scaled down to it:
    one peer moves W at most a few times as much as a typical honest one. The upper median (of an
    even count, the larger middle value) cannot be pulled down by half the contributions or
    fewer: they cannot, sending zeros (or tiny changes), scale everyone else to zero."""
    ordered = sorted(contributions, key=lambda c: (min(c.heads, default=-1), c.peer))
    clip = robust_clip > 0 and len(ordered) >= 3
    heads = [len(c.heads) for c in ordered]

    def total(parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [p.double() for p in parts]
        if clip:
            norms = [p.norm().item() / k for p, k in zip(parts, heads)]
            limit = _clip_limit(norms, robust_clip)
            parts = [_clipped(p, n, limit) for p, n in zip(parts, norms)]
        out = torch.zeros_like(parts[0])
        for p in parts:
            out += p
        return out

    out = {}
    for name, shape in merged_shapes(model, part).items():
        sources = [_source(c, name) for c in ordered]
        out[name] = total(sources) if ordered else torch.zeros(shape, dtype=torch.float64)
    return out


def merged_shapes(model: LTEModel, part: frozenset[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every name a merge adds to (those in `part`, or all): layers and replicated parameters."""
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in model.layers()}
    params = dict(model.model.named_parameters())
    shapes.update({name: tuple(params[name].shape) for name in model.replicated})
    return {name: shape for name, shape in shapes.items() if part is None or name in part}


def _source(c: Contribution, name: str) -> torch.Tensor:
    return c.weights[name] if name in c.weights else c.replicas[name]


def _clip_limit(norms: list[float], robust_clip: float) -> float:
    """The largest change per head one contribution keeps: `robust_clip` times the upper median."""
    return robust_clip * sorted(norms)[len(norms) // 2]


def _clipped(p: torch.Tensor, norm: float, limit: float) -> torch.Tensor:
    return p * (limit / norm) if norm > limit else p


def clip_limits(model: LTEModel, contributions: list[Contribution], robust_clip: float,
                part: frozenset[str] | None = None) -> dict[str, float]:
    """Per name (those in `part`, or all), the limit `reduce_contributions` clipped the
    contributions' changes per head to (none when it clips nothing): what a share of a merged
    round is, found later (`clipped_share`), needs."""
    if not (robust_clip > 0 and len(contributions) >= 3):
        return {}
    return {name: _clip_limit([_source(c, name).double().norm().item() / len(c.heads) for c in contributions],
                              robust_clip)
            for name in merged_shapes(model, part)}


def clipped_shares(model: LTEModel, contributions: list[Contribution], robust_clip: float,
                   part: frozenset[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per writer, what its contribution added to the round's totals (of `part`, or all), clipped
    as `reduce_contributions` clipped it."""
    limits = clip_limits(model, contributions, robust_clip, part)
    return {c.peer: clipped_share(model, c, limits) for c in contributions}


def clipped_share(model: LTEModel, contribution: Contribution, limits: Mapping[str, float]
                  ) -> dict[str, torch.Tensor]:
    """What `contribution` added to its round's totals (float64, per name), clipped to the round's
    `limits` (`clip_limits`) as `reduce_contributions` clipped it: what undoing it takes away."""
    out = {}
    for name in merged_shapes(model):
        if name not in contribution.weights and name not in contribution.replicas:
            continue
        p = _source(contribution, name).double()
        limit = limits.get(name)
        out[name] = p if limit is None else _clipped(p, p.norm().item() / len(contribution.heads), limit)
    return out


def apply_reduced(model: LTEModel, totals: dict[str, torch.Tensor]) -> None:
    """W += (s/N) * totals, shared non-linear parameters += (1/N) * totals (see `reduce_contributions`),
    for the layers and parameters the totals cover."""
    model.apply_merge(*split_totals(model, totals))


def split_totals(model: LTEModel, totals: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A merge's totals as (layer deltas, replica deltas), what `LTEModel.apply_merge` takes."""
    return ({name: totals[name] for name in model.layer_names if name in totals},
            {name: totals[name] for name in model.replicated if name in totals})


def merge_contributions(model: LTEModel, contributions: list[Contribution], robust_clip: float = 0.0,
                        reduced: ReducedDtype = "fp32") -> None:
    """Reduce every contribution and apply the result, rounded as a reduced part travels (so that
    the all-gather, a local fallback and the owner-reduced merge all add the same values)."""
    apply_reduced(model, merged_totals(model, contributions, robust_clip, reduced))


def merged_totals(model: LTEModel, contributions: list[Contribution], robust_clip: float = 0.0,
                  reduced: ReducedDtype = "fp32", part: frozenset[str] | None = None, dither: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """The float32 values a merge of `contributions` (to `part`, or all) adds, rounded as a reduced
    part travels (stochastically with a `dither` seed: see `quantize`)."""
    totals = reduce_contributions(model, contributions, robust_clip, part)
    return dequantized(reduced_tensors(totals, reduced, dither), reduced, shapes_of(totals))


def reduce_in_process(model: LTEModel, dtype: WireDtype = "fp32", reduced: ReducedDtype = "fp32",
                      robust_clip: float = 0.0, max_update: float = float("inf"),
                      max_relative_update: float = float("inf"), reach: Mapping[str, float] | None = None,
                      targets: frozenset[str] | None = None, dither: int | None = None) -> dict[str, torch.Tensor]:
    """The merge of every head `model` holds, as the swarm computes it: each head's change encoded
    as it travels (one contribution per head), decoded, checked against the run's bounds, reduced
    and rounded as a reduced part; the float32 values to add (`apply_reduced`). The one-process
    simulation merges this way, so that it models the precision on the wire exactly; a head the
    bounds refuse raises the ContributionError the swarm would reject it with. Only `targets` (all
    for None): what the round merges."""
    contributions = [decode_contribution(encode_contribution(model, [h], dtype=dtype, targets=targets)[0],
                                         f"{h:08d}", model, max_update, max_relative_update, part=targets,
                                         dtype=dtype, reach=reach, scope=targets)
                     for h in model.head_ids]
    return merged_totals(model, contributions, robust_clip, reduced, targets, dither)


# ---- the owner-reduced merge: W cut into parts, each part reduced by two of the round's members ----
PART_FORMAT = "lte-swarm/part/1"
REDUCED_FORMAT = "lte-swarm/reduced/1"


def plan_parts(model: LTEModel, n_parts: int) -> list[frozenset[str]]:
    """Cut the merge targets (layers and replicated parameters) into at most `n_parts` parts of
    similar size, whole targets each, the same on every peer: largest targets first, each to the
    lightest part so far (ties to the lower index). Parts never come out empty."""
    sizes = {name: layer.out_features * layer.in_features for name, layer in model.layers()}
    params = dict(model.model.named_parameters())
    sizes.update({name: params[name].numel() for name in model.replicated})
    order = sorted(sizes, key=lambda name: (-sizes[name], name))
    count = max(1, min(n_parts, len(order)))
    parts: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in order:
        i = min(range(count), key=lambda j: (loads[j], j))
        parts[i].append(name)
        loads[i] += sizes[name]
    return [frozenset(p) for p in parts]


def round_parts(n_parts: int, fragments: int, round_: int, rounds_total: int | None) -> list[int]:
    """The parts (indices into `plan_parts`) merge round `round_` (from 0) covers: with W merged in
    `fragments` fragments (`lte.fragments`), fragment round mod k, that is parts f, f + k, f + 2k...,
    so that each part is merged every k rounds and a round moves about 1/k of the bytes; all parts
    with one fragment, and in the run's last round, which leaves no work unmerged."""
    k = min(fragments, n_parts)  # a model with few targets may be cut into fewer parts than asked
    if k <= 1 or (rounds_total is not None and round_ >= rounds_total - 1):
        return list(range(n_parts))
    return [i for i in range(n_parts) if i % k == round_ % k]


def targets_of(parts: list[frozenset[str]], indices: list[int]) -> frozenset[str] | None:
    """The layers and parameters of the parts at `indices` (None: all of them)."""
    if len(indices) == len(parts):
        return None
    return frozenset().union(*(parts[i] for i in indices))


def _target(key: str) -> str:
    """The layer or parameter a contribution tensor belongs to: `w/<layer>/<X>` or `r/<param>`."""
    kind, _, rest = key.removesuffix(_SCALE).partition("/")
    return rest.rsplit("/", 1)[0] if kind == "w" else rest


def split_contribution(blob: bytes, parts: list[frozenset[str]]) -> list[bytes]:
    """A contribution cut into one blob per part, each carrying only that part's tensors (and the
    head list). A blob that is not a contribution gives empty parts: the owners reject them."""
    try:
        tensors, meta = _load(blob, FORMAT)
    except ContributionError:
        tensors, meta = {}, {"format": FORMAT}
    meta = {"format": FORMAT, "heads": str(meta.get("heads", ""))}
    out = []
    for part in parts:
        chosen = {k: v for k, v in tensors.items() if _target(k) in part}
        out.append(st_save(chosen, metadata=meta))
    return out


# A reset-less head's baseline factors (A0, B0) are the factors its previous contribution carried
# as current (A, B), bit for bit once rounded for the wire, whenever that contribution went into W:
# half of every part is bytes its owner already received a round ago. A part can therefore travel
# compact: without A0/B0, naming the digest of the factors they equal (`BASE`); an owner that kept
# those factors puts them back (`expand_part`), any other fetches the full part.
BASE = "base"  # metadata of a compact part


def _is_current_factor(key: str) -> bool:
    stem = key.removesuffix(_SCALE)
    return stem.startswith("w/") and stem.endswith(("/A", "/B"))


def _is_baseline_factor(key: str) -> bool:
    stem = key.removesuffix(_SCALE)
    return stem.startswith("w/") and stem.endswith(("/A0", "/B0"))


def _as_baseline(key: str) -> str:
    """`w/<layer>/A` -> `w/<layer>/A0` (scales of blockwise 8-bit tensors alike)."""
    scale = key.endswith(_SCALE)
    return key.removesuffix(_SCALE) + "0" + (_SCALE if scale else "")


def factors_digest(factors: dict[str, torch.Tensor]) -> str:
    """A digest of a set of factor tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(factors):
        t = factors[key].contiguous()
        h.update(json.dumps([key, _dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def part_factors(blob: bytes) -> tuple[str, dict[str, torch.Tensor]]:
    """`parsed_factors` of a blob's bytes."""
    return parsed_factors(parse_contribution(blob))


def parsed_factors(parsed: ParsedBlob) -> tuple[str, dict[str, torch.Tensor]]:
    """The current factors (A, B) a full part carries and their digest: what a compact part of
    the same peer's next contribution may name as its baseline. Hostile bytes raise
    ContributionError, nothing else."""
    factors = {k: t for k, t in parsed.tensors.items() if _is_current_factor(k)}
    try:
        return factors_digest(factors), factors
    except Exception as exc:
        raise ContributionError(f"malformed factors ({type(exc).__name__})") from None


def baseline_bytes(blob: bytes) -> int:
    """Bytes of the baseline factors a part carries: what it sheds when it travels compact."""
    tensors, _ = _load(blob, FORMAT)
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if _is_baseline_factor(k))


def compact_part(blob: bytes, previous: dict[str, torch.Tensor] | None
                 ) -> tuple[bytes, dict[str, torch.Tensor], str | None]:
    """(the blob to serve as compact, the current factors it carries, what its baseline equals:
    "previous", "zero" or None). Compact means without its baseline factors, when they equal
    `previous` (the current factors of our last contribution's same blob) or are all zero (heads
    whose work is not in W yet) exactly; otherwise the full blob itself (also a blob that is not a
    contribution: its readers reject it)."""
    try:
        tensors, meta = _load(blob, FORMAT)
    except ContributionError:
        return blob, {}, None
    current = {k: t for k, t in tensors.items() if _is_current_factor(k)}
    baseline = {k: t for k, t in tensors.items() if _is_baseline_factor(k)}
    if not baseline:
        return blob, current, None
    for kind, candidate in (("previous", previous), ("zero", _zeros_like(current))):
        if (candidate is not None and {_as_baseline(k) for k in candidate} == set(baseline)
                and all(candidate[k].dtype == baseline[_as_baseline(k)].dtype
                        and torch.equal(candidate[k], baseline[_as_baseline(k)]) for k in candidate)):
            rest = {k: t for k, t in tensors.items() if k not in baseline}
            return st_save(rest, metadata={**meta, BASE: factors_digest(candidate)}), current, kind
    return blob, current, None


def _zeros_like(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-zero factors (a fresh head's baseline), blockwise 8-bit ones with the scales that
    rounding zeros gives."""
    values = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in factors.items() if not k.endswith(_SCALE)}
    if any(k.endswith(_SCALE) for k in factors):
        return quantize(values, "int8")
    return {k: v.to(factors[k].dtype) for k, v in values.items()}


def expand_part(blob: bytes, held: tuple[str, dict[str, torch.Tensor]] | None, zero: bool = False) -> bytes | None:
    """`expand_parsed` from and to bytes: the blob itself if it is full."""
    parsed = parse_contribution(blob)
    if BASE not in parsed.meta:
        return blob
    full = expand_parsed(parsed, held, zero)
    return None if full is None else st_save(full.tensors, metadata=full.meta)


def expand_parsed(parsed: ParsedBlob, held: tuple[str, dict[str, torch.Tensor]] | None,
                  zero: bool = False) -> ParsedBlob | None:
    """The full part behind one fetched as compact: the part itself if it is full, rebuilt with
    the baseline factors we `held` (digest, factors), or with zeros when its writer says its
    baseline is zero, if it names those; None if it names factors we do not hold (then fetch the
    full blob). Hostile bytes raise ContributionError, nothing else."""
    try:
        return _expand_parsed(parsed, held, zero)
    except ContributionError:
        raise
    except Exception as exc:  # e.g. factors of shapes or dtypes no honest peer sends
        raise ContributionError(f"malformed compact blob ({type(exc).__name__})") from None


def _expand_parsed(parsed: ParsedBlob, held: tuple[str, dict[str, torch.Tensor]] | None,
                   zero: bool) -> ParsedBlob | None:
    tensors, meta = parsed.tensors, parsed.meta
    base = meta.get(BASE)
    if base is None:
        return parsed
    if any(_is_baseline_factor(k) for k in tensors):
        raise ContributionError("a compact part that carries baseline factors too")
    if zero:
        zeros = _zeros_like({k: t for k, t in tensors.items() if _is_current_factor(k)})
        held = (factors_digest(zeros), zeros)
    if held is None or held[0] != base:
        return None
    full = {**tensors, **{_as_baseline(k): t for k, t in held[1].items()}}
    return ParsedBlob(full, {k: v for k, v in meta.items() if k != BASE}, parsed.nbytes)


def part_bound(model: LTEModel, part: frozenset[str]) -> int:
    """The most bytes an honest contribution's `part` can take (every layer dense)."""
    params = dict(model.model.named_parameters())
    numbers = sum(layer.out_features * layer.in_features for name, layer in model.layers() if name in part)
    numbers += sum(params[name].numel() for name in model.replicated if name in part)
    return 4 * numbers + _PER_TENSOR_SLACK * 4 * len(part) + _HEADER_SLACK


def reduced_tensors(totals: dict[str, torch.Tensor], dtype: ReducedDtype = "fp32",
                    dither: int | None = None) -> dict[str, torch.Tensor]:
    """What a part's owner serves: its float64 totals in the run's precision (see `quantize`).
    Every peer applies exactly their dequantized values (`dequantized`), the owner included, so W
    stays bit-identical however a peer got them."""
    return quantize(totals, dtype, dither)


def dither_seed(rounding: str, round_: int) -> int | None:
    """The `quantize` dither of merge round `round_` (from 0) under `swarm.reduced_rounding`."""
    return round_ if rounding == "stochastic" else None


def quantize(totals: dict[str, torch.Tensor], dtype: ReducedDtype, dither: int | None = None
             ) -> dict[str, torch.Tensor]:
    """Tensors rounded once to float32, then to bf16 or blockwise to integer codes: int8 values
    and one float32 scale per `INT8_BLOCK` values (`name#scale`), or codes of -7..7 two a byte
    (`_pack4`) and one scale per `INT4_BLOCK`. Plain CPU float32 arithmetic: the same bits on every
    machine.

    Codes round to the nearest, or with a `dither` seed stochastically: up with probability the
    fraction's, from uniform numbers drawn per tensor from the seed and the tensor's name, so that
    every peer rounding the same totals gets the same codes. Nearest rounding loses a value under
    half a step every time (a small steady change beside a large one in its block never reaches W);
    stochastic rounding is unbiased: what it adds is right on average over rounds."""
    out: dict[str, torch.Tensor] = {}
    for name, t in totals.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        if dtype in _BLOCKS:
            block, top = _BLOCKS[dtype]
            flat = t.reshape(-1)
            blocks = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).reshape(-1, block)
            scale = blocks.abs().amax(dim=1) / float(top)
            q = torch.where(scale[:, None] > 0, blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                            torch.zeros_like(blocks))
            if dither is None:
                codes = q.round().clamp(-top, top).to(torch.int8)
            else:
                seed = int.from_bytes(hashlib.sha256(f"dither/{dither}/{name}".encode()).digest()[:8], "little") >> 1
                u = torch.rand(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
                codes = (q + u).floor().clamp(-top, top).to(torch.int8)
            if dtype == "int8":
                out[name] = codes.reshape(-1)[:flat.numel()].reshape(t.shape)
            else:
                out[name] = _pack4(codes.reshape(-1))
            out[name + _SCALE] = scale.contiguous()
        else:
            out[name] = t.to(_TORCH_DTYPES[dtype]).contiguous()
    return out


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Codes of -7..7 (an even count) as bytes, two a byte: (code + 8), low nibble first."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).contiguous()


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    """`_pack4`'s codes back, as float32 values of -8..7 (an honest owner never sends -8)."""
    low, high = (packed & 0x0F).to(torch.float32), (packed >> 4).to(torch.float32)
    return torch.stack([low, high], dim=1).reshape(-1) - 8.0


def packed_shape(dtype: ReducedDtype, shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype) of a tensor of `shape` on the wire in `dtype`, and how many scales it has."""
    n = math.prod(shape)
    if dtype == "int8":
        return shape, torch.int8, -(-n // INT8_BLOCK)
    if dtype == "int4":
        blocks = -(-n // INT4_BLOCK)
        return (blocks * INT4_BLOCK // 2,), torch.uint8, blocks
    return shape, _TORCH_DTYPES[dtype], 0


def shapes_of(totals: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in totals.items()}


def dequantized(tensors: dict[str, torch.Tensor], dtype: ReducedDtype = "fp32",
                shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The float32 values a reduced part (see `reduced_tensors`) stands for, per target name. A
    4-bit part's tensors are flat: `shapes` gives the targets' shapes (`shapes_of` its totals)."""
    if dtype not in _BLOCKS:
        return {name: t.float() for name, t in tensors.items()}
    if dtype == "int4" and shapes is None:
        raise ValueError("a 4-bit part's values need the shapes of its targets")
    block = _BLOCKS[dtype][0]
    out = {}
    for name, q in tensors.items():
        if name.endswith(_SCALE):
            continue
        shape = tuple(q.shape) if dtype == "int8" else shapes[name]
        flat = (q.reshape(-1).float() if dtype == "int8" else _unpack4(q))
        n = math.prod(shape)
        padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)])
        blocks = padded.reshape(-1, block) * tensors[name + _SCALE][:, None]
        out[name] = blocks.reshape(-1)[:n].reshape(shape).contiguous()
    return out


def reduced_digest(tensors: dict[str, torch.Tensor], members: list[str]) -> str:
    """sha256 of a reduced part's values and the contributors it sums (not of the blob's bytes:
    two owners must reach the same digest whatever their serializer does with metadata)."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps(sorted(members)).encode())
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(str(tuple(tensors[name].shape)).encode())
        hasher.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def encode_reduced(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({name: t.cpu() for name, t in tensors.items()}, metadata={"format": REDUCED_FORMAT})


@dataclass(frozen=True)
class ReducedBound:
    """What a reduced part may add to W: as much as its contributions, covering `heads` heads in
    all, could each add within the bounds every contribution is checked against
    (`_check_contribution`: `max_update` per value, `max_relative_update` of a layer's size per head)."""

    heads: int
    contributions: int
    max_update: float
    max_relative_update: float
    reach: Mapping[str, float] = field(default_factory=dict)


# A reduced part travels rounded (int4: by up to half a step per value), and may exceed the sum of
# its contributions' bounds by that much; honest parts stay far below (a head moves a layer by a
# quarter of its bound at most), so the margin costs no protection worth having.
REDUCED_SLACK = 1.5


def check_reduced(model: LTEModel, values: Mapping[str, torch.Tensor], bound: ReducedBound) -> None:
    """Refuse a reduced part (its float values, what W adds times s/N) that moves any layer or
    parameter further than its members' contributions could: whoever reduced it, two owners who
    agree on one forged digest included, adds at most what the members could have."""
    coef = merge_scale(model.spec.scale, model.spec.n_heads)
    n_heads = model.spec.n_heads
    params = dict(model.model.named_parameters())
    layers = set(model.layer_names)
    for name, t in values.items():
        if name in layers:
            size = max(model.layer(name).weight_store.master.norm().item(), bound.reach.get(name, 0.0), 1e-12)
            norm_limit = bound.max_relative_update * bound.heads * size / coef
            value_limit = bound.contributions * bound.max_update / coef
        else:
            p = params[name]
            floor = max(p.norm().item(), bound.reach.get(name, 1e-2 * p.numel() ** 0.5))
            norm_limit = bound.max_relative_update * n_heads * bound.heads * floor
            value_limit = bound.contributions * bound.max_update * n_heads
        norm = t.double().norm().item()
        biggest = t.abs().max().item() if t.numel() else 0.0
        if norm > REDUCED_SLACK * norm_limit or biggest > REDUCED_SLACK * value_limit:
            raise ContributionError(f"{name}: the reduced part moves it further than its {bound.contributions} "
                                    f"contributions could (norm {norm:.3g}, limit {norm_limit:.3g}; largest value "
                                    f"{biggest:.3g}, limit {value_limit:.3g})")


def decode_reduced(blob: bytes, model: LTEModel, part: frozenset[str], members: list[str],
                   expect_digest: str, dtype: ReducedDtype = "fp32", bound: ReducedBound | None = None
                   ) -> dict[str, torch.Tensor]:
    """A reduced part served by an owner, accepted only if it is exactly the part (names, shapes,
    the run's `dtype`, finite), hashes, with `members`, to the digest its owners agreed on, and
    stays within what its members could add (`bound`, see `check_reduced`); returns the float32
    values it stands for."""
    tensors, _ = _load(blob, REDUCED_FORMAT)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in model.layers() if name in part}
    params = dict(model.model.named_parameters())
    shapes.update({name: tuple(params[name].shape) for name in model.replicated if name in part})
    kinds = {}
    for name, shape in shapes.items():
        wire_shape, kind, scales = packed_shape(dtype, shape)
        kinds[name] = (wire_shape, kind)
        if scales:
            kinds[name + _SCALE] = ((scales,), torch.float32)
    if set(tensors) != set(kinds):
        raise ContributionError("the reduced part does not hold the part's tensors")
    used: set[str] = set()
    out = {name: _take(tensors, name, shape, used, kind) for name, (shape, kind) in kinds.items()}
    if reduced_digest(out, members) != expect_digest:
        raise ContributionError("the reduced part does not hash to the digest its owners published")
    values = dequantized(out, dtype, shapes)
    if bound is not None:
        check_reduced(model, values, bound)
    return values


def encode_state(model: LTEModel, round_: int) -> bytes:
    return encode_shared_state(model.shared_state(), round_, model.state_digest())


def encode_shared_state(state: dict[str, torch.Tensor], round_: int, digest: str) -> bytes:
    """W as a model's `shared_state` holds it (whose `state_digest` is `digest`), at `round_`."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(tensors, metadata={"format": STATE_FORMAT, "round": str(round_), "digest": digest})


def decode_state(blob: bytes, model: LTEModel, expect_digest: str | None = None, expect_round: int | None = None) -> int:
    """Load a state blob into `model` if it is well formed and its bytes hash to the digest it
    claims (and to `expect_digest` and `expect_round`, if given); returns its round. The model is
    untouched on error."""
    tensors, meta = _load(blob, STATE_FORMAT)
    try:
        round_ = int(meta.get("round", ""))
    except (ValueError, TypeError):
        raise ContributionError("state without a round number") from None
    if expect_round is not None and round_ != expect_round:
        raise ContributionError(f"state of round {round_}, expected round {expect_round}")
    claimed = meta.get("digest", "")
    if expect_digest is not None and claimed != expect_digest:
        raise ContributionError(f"state claims digest {claimed[:12]}, expected {expect_digest[:12]}")
    expected = model.shared_state()
    for key, tensor in tensors.items():
        if key in expected and (tensor.dtype != expected[key].dtype or not torch.isfinite(tensor).all()):
            raise ContributionError(f"state tensor {key} is {tensor.dtype} or not finite")
    backup = {k: v.clone() for k, v in expected.items()}
    try:
        model.load_shared_state(tensors)
        if model.state_digest() != claimed:
            raise ContributionError("state bytes do not match the digest they claim")
    except BaseException as exc:  # whatever happened, the model goes back to what it was
        model.load_shared_state(backup)
        if isinstance(exc, ContributionError):
            raise
        if isinstance(exc, Exception):
            raise ContributionError(f"state does not fit the model: {exc}") from None
        raise
    return round_


def _load(blob: bytes, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {}) or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a mapping")
    except (SafetensorError, Exception) as exc:  # any failure to parse hostile bytes
        raise ContributionError(f"not a valid safetensors blob ({type(exc).__name__})") from None
    if meta.get("format") != fmt:
        raise ContributionError(f"unknown format {meta.get('format')!r}, expected {fmt}")
    return tensors, meta


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], used: set[str],
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ContributionError(f"missing tensor {key}")
    if t.dtype != dtype:
        raise ContributionError(f"tensor {key} is {_dtype_name(t.dtype)}, expected {_dtype_name(dtype)}")
    if tuple(t.shape) != shape:
        raise ContributionError(f"tensor {key} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise ContributionError(f"tensor {key} has NaN or inf values")
    used.add(key)
    return t
