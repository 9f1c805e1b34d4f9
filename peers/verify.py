"""Redoing one head's round, so that a contribution can be told from one that no training made.

A head's round depends on W (the round's agreed W, which every peer holds) and on what is the
head's own when the round begins: its factors and their baseline, its replicas, its optimizer's
moments and step counts, which batches it trains on (its stream is a deterministic function of the
run's seed, the head and how many batches the stream has yielded: the cursor) and the step index
the learning-rate schedule is at. `RoundStart` holds all of that but W; its digest is what a holder
can commit to before anyone asks, and `reproduce` trains the round again from it on any machine.
Two honest runs of a round differ only by floating-point order (threads, kernels); `mismatch`
measures by how much, so that a tolerance can tell that from a change that was
scaled, turned around, copied, zeroed or trained on other data (`scripts/bench_reproduce.py`)."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import torch

from peers.data import DataSource, ImageShape
from peers.models import create_lte_model
from peers.training import Batch, HeadTrainer, stack_batches
from swarm.config import RunConfig
from swarm.head_adamw import HeadAdamW
from swarm.identity import Identity
from swarm.lte_model import LTEModel
from swarm.schemas import Verdict
from swarm.wire import Contribution, ContributionError, decode_contribution

# What is a head's own in an LTEModel's state: its factors (and their baselines), its replicas.
HEAD_STATE = ("factors.", "replicas.", "replica_base.", "replica_sent.")
# The largest `mismatch` an honest redo may show, redone in the run's precision. Measured on the
# digits config's rounds (`scripts/bench_reproduce.py`, docs/benchmarks.md): 1 thread against 2
# differ by 1e-4 (fp32) to 2e-2 (bf16); the nearest cheat measured (half the change) by 0.5. A redo
# in the other precision (bf16 autocast against fp32) differs by up to 0.5 in some tensor: a
# verifier redoes a round in the precision the run trains in.
TOLERANCE = 0.25


@dataclass
class RoundStart:
    """One head's state as its round begins, and where its round reads and steps from."""

    head: int
    step: int                      # the schedule's step index of the round's first step
    cursor: int                    # batches the head's stream has yielded before the round
    steps: int                     # T: the round's steps
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)    # LTEModel state name -> the head's slice
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # parameter -> its optimizer state

    def encode(self) -> bytes:
        """The bytes a holder serves to verifiers (whose values `digest` hashes). A tensor equal to
        one before it goes as a reference to that one: a round begins right after a merge, when
        each factor, its baseline and what was last sent of it are the same values (for ViT-S/32
        597 of a head's 603 tensors, 40 % of its start's bytes)."""
        tensors, refs, kept = {}, {}, {}
        for name, t in sorted(self.tensors.items()):
            same = next((other for other in kept.get((tuple(t.shape), t.dtype), ())
                         if torch.equal(tensors[other], t)), None)
            if same is None:
                tensors[name] = t
                kept.setdefault((tuple(t.shape), t.dtype), []).append(name)
            else:
                refs[name] = same
        buffer = io.BytesIO()
        torch.save({"head": self.head, "step": self.step, "cursor": self.cursor, "steps": self.steps,
                    "tensors": tensors, "refs": refs,
                    "moments": {k: dict(sorted(v.items())) for k, v in sorted(self.moments.items())}}, buffer)
        return buffer.getvalue()

    @classmethod
    def decode(cls, blob: bytes) -> "RoundStart":
        raw = torch.load(io.BytesIO(blob), weights_only=True)
        tensors = dict(raw["tensors"])
        for name, same in dict(raw.get("refs", {})).items():
            tensors[str(name)] = tensors[str(same)].clone()
        return cls(head=int(raw["head"]), step=int(raw["step"]), cursor=int(raw["cursor"]), steps=int(raw["steps"]),
                   tensors=tensors, moments=raw["moments"])

    def digest(self) -> str:
        """What a holder commits to: the sha256 of its round's start, values and positions alike."""
        h = hashlib.sha256(f"{self.head}|{self.step}|{self.cursor}|{self.steps}".encode())
        for name, t in sorted(self.tensors.items()):
            h.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().numpy().tobytes())
        for name, state in sorted(self.moments.items()):
            for key, t in sorted(state.items()):
                h.update(f"{name}/{key}".encode() + t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def start_bound(model: LTEModel) -> int:
    """The most bytes a round's start of one head of `model`'s run can take (what a fetch of one
    is allowed): its slice of every head tensor and, per trainable parameter, of the two AdamW
    moments and the step count, with room for the encoding's headers. More than W's own bound: a
    head holds its factors three times (with their baselines and what was last sent) and the
    moments twice."""
    per_head = [math.prod(t.shape[1:]) * t.element_size() for name, t in model.state_dict().items()
                if name.startswith(HEAD_STATE)]
    params = [math.prod(p.shape[1:]) * p.element_size() for _, p in model.named_parameters() if p.requires_grad]
    return sum(per_head) + 2 * sum(params) + 1024 * (len(per_head) + 3 * len(params)) + (1 << 16)


class Counted:
    """A head's stream of batches, counting what it yielded: the cursor of the head's next round."""

    def __init__(self, stream: Iterator[Batch]):
        self.stream, self.count = stream, 0

    def __iter__(self) -> "Counted":
        return self

    def __next__(self) -> Batch:
        batch = next(self.stream)
        self.count += 1
        return batch


def snapshot(model: LTEModel, optimizer: HeadAdamW, head: int, step: int, cursor: int, steps: int) -> RoundStart:
    """`head`'s state in `model` and `optimizer` now, as its round of `steps` steps begins at
    schedule step `step` with its stream `cursor` batches in (copies: training on changes nothing)."""
    pos = model.head_ids.index(head)
    tensors = {name: t[pos].detach().clone() for name, t in model.state_dict().items() if name.startswith(HEAD_STATE)}
    moments = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if p.requires_grad and state:
            moments[name] = {key: value[pos].detach().clone() for key, value in state.items()}
    return RoundStart(head=head, step=step, cursor=cursor, steps=steps, tensors=tensors, moments=moments)


def restore(model: LTEModel, trainer: HeadTrainer, start: RoundStart) -> None:
    """Make `model` (holding `start.head` alone) and `trainer` what `start` says."""
    if model.head_ids != [start.head]:
        raise ValueError(f"restore a round of head {start.head} into a model of that head alone")
    rewind(model, trainer.optimizer, start)


def rewind(model: LTEModel, optimizer: HeadAdamW, start: RoundStart) -> None:
    """Put `start.head`'s slice of `model` and of `optimizer`'s moments back to what `start` says:
    its round's work undone, as if it had not trained (the other heads keep theirs)."""
    if start.head not in model.head_ids:
        raise ValueError(f"head {start.head} is not held by this model")
    pos = model.head_ids.index(start.head)
    state = model.state_dict()
    missing = sorted(set(start.tensors) ^ {name for name in state if name.startswith(HEAD_STATE)})
    if missing:
        raise ValueError(f"the round's start and this run's model differ in {missing[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in start.tensors.items():
            state[name][pos].copy_(value)
        for name, p in params.items():  # moments the head had none of yet start from zeros, as a fresh head's
            if name not in start.moments and optimizer.state.get(p):
                for value in optimizer.state[p].values():
                    value[pos].zero_()
        for name, moments in start.moments.items():
            held = optimizer.state.setdefault(params[name], {})
            for key, value in moments.items():
                if key in held:
                    held[key][pos].copy_(value)
                else:
                    fresh = torch.zeros((len(model.head_ids), *value.shape), dtype=value.dtype, device=value.device)
                    fresh[pos].copy_(value)
                    held[key] = fresh


def reproduce(cfg: RunConfig, w: LTEModel | dict[str, torch.Tensor], start: RoundStart,
              source: DataSource | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The change `start`'s round makes (the head's unmerged change of every layer, B A, and of
    every replica), trained again on W as `w` holds it (a model, or its `shared_state`), on the
    head's own batches."""
    source = source or DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    stream = source.batches(start.head, cfg.lte.heads, cfg.head_batch)
    for _ in islice(stream, start.cursor):  # the batches the head trained on before the round
        pass
    return train_round(cfg, w, start, stream, start.steps, device)


def train_round(cfg: RunConfig, w: LTEModel | dict[str, torch.Tensor], start: RoundStart, batches: Iterator[Batch],
                steps: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`steps` steps from `start` on W as `w` holds it, on `batches`: the change they make."""
    model = create_lte_model(cfg, [start.head], device=device)
    model.load_shared_state(w if isinstance(w, dict) else w.shared_state())
    trainer = HeadTrainer(model, cfg.train, cfg.steps)
    restore(model, trainer, start)
    for t in range(steps):
        x, y = stack_batches([batches], device)
        trainer.step(x, y, start.step + t)
    return change(model)


def sampled(identity: Identity, run_id: str, r: int, heads: list[int], rate: float) -> list[int]:
    """The heads of round r whose rounds are redone, a share `rate` of them: drawn from a hash of the
    coordinator's signature over the round, which nobody else can compute, so that no holder knows
    before it offered whether its round will be redone."""
    seed = identity.secret_draw(f"{run_id}|verify|{r}")
    return [h for h in heads if int(hashlib.sha256(f"{seed}|{h}".encode()).hexdigest(), 16) < rate * 2 ** 256]


def redo_contribution(cfg: RunConfig, w: dict[str, torch.Tensor], starts: list[RoundStart],
                      source: DataSource | None = None) -> dict[str, torch.Tensor]:
    """What a contribution of the heads of `starts` should be: the sum of their rounds redone (a
    peer holding several heads sends their changes summed)."""
    total: dict[str, torch.Tensor] = {}
    for start in starts:
        for name, value in reproduce(cfg, w, start, source).items():
            total[name] = total[name] + value if name in total else value
    return total


def change(model: LTEModel, heads: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The unmerged change of `heads` (all) in `model`: per layer B A, per replica its drift."""
    return {**model.weight_deltas(heads), **model.replica_deltas(heads)}


def mismatch(reproduced: dict[str, torch.Tensor], submitted: dict[str, torch.Tensor]) -> float:
    """How far a submitted change is from the reproduced one: the largest over its tensors of the
    L2 distance relative to the reproduced tensor's size (0 for the same bits; 1 for zeros; 2 for
    the change turned around). Each tensor on its own, so that a change forged in a few layers is
    not hidden by the size of the others."""
    if set(reproduced) != set(submitted):
        return float("inf")
    worst = 0.0
    for name, redo in reproduced.items():
        diff = float((redo.double() - submitted[name].double()).norm())
        size = float(redo.double().norm())
        worst = max(worst, diff / size if size > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def verdict(writer: str, heads: list[int], distance: float) -> Verdict:
    """The verdict on `writer`'s contribution to `heads` that a redo found `distance` away (`judge`)."""
    return Verdict(writer=writer, heads=heads, mismatch=min(distance, 1e9), passed=distance <= TOLERANCE)


def judge(cfg: RunConfig, w: dict[str, torch.Tensor], model: LTEModel, writer: str, heads: list[int],
          committed: list[str], starts: list[bytes], contribution: bytes,
          source: DataSource | None = None) -> tuple[float, Contribution | None]:
    """How far `writer`'s `contribution` (its blob) is from its heads' rounds redone on W as `w`
    holds it, from `starts` (their blobs, in `heads` order), which must be the ones it committed
    to (`committed`, its ready record's digests): inf for a start that is not, or that does not fit
    the run's model (`model`, any LTEModel of the run, reads the contribution); and the
    contribution as decoded (None when it cannot be read)."""
    try:
        submitted = decode_contribution(contribution, writer, model, max_update=math.inf,
                                        dtype=cfg.swarm.contribution_dtype)
    except ContributionError:
        return math.inf, None
    try:
        decoded = [RoundStart.decode(b) for b in starts]
    except Exception:  # not a start at all
        return math.inf, submitted
    if [s.digest() for s in decoded] != committed or [s.head for s in decoded] != heads:
        return math.inf, submitted
    try:
        redo = redo_contribution(cfg, w, decoded, source)
    except (ValueError, RuntimeError, KeyError):
        return math.inf, submitted
    offered = {**submitted.weights, **submitted.replicas}
    if not set(offered) <= set(redo):
        return math.inf, submitted
    return mismatch({name: redo[name] for name in offered}, offered), submitted
