"""One-process LTE: all N heads of a run in one process, merged every T steps, plus the full-rank and
single-LoRA baselines on the same model, data and sample budget. The swarm must reproduce this."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Literal

import torch

from peers.data import DataSource, ImageShape
from peers.diloco import DiLoCo
from peers.models import create_lte_model, create_model, resolve_device, run_reach
from peers.training import HeadTrainer, evaluate, stack_batches
from swarm.config import RunConfig
from swarm.lte_model import LTEModel
from swarm.errors import ConfigError
from swarm.wire import (ContributionError, apply_reduced, dither_seed, plan_parts, reduce_in_process, round_parts,
                        targets_of)

Mode = Literal["lte", "full", "lora", "diloco"]


@dataclass
class EvalPoint:
    round: int
    step: int
    samples: int
    accuracy: float
    loss: float
    train_loss: float
    seconds: float
    digest: str | None = None  # LTE: the digest of W and the replicas after this round's merge, as the swarm agrees on it


@dataclass
class SimResult:
    mode: Mode
    accuracy: float
    loss: float
    samples: int
    seconds: float
    steps: int
    rounds: int
    history: list[EvalPoint] = field(default_factory=list)
    weight_digest: str | None = None
    model: LTEModel | None = field(default=None, repr=False)  # the trained LTE model (lte/lora)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        out["history"] = [asdict(p) for p in self.history]
        return out


def simulate(cfg: RunConfig, mode: Mode = "lte", *, on_eval: Callable[[EvalPoint], None] | None = None,
             on_step: Callable[[int, int], None] | None = None,
             evaluate_on: Literal["test", "validation"] = "test") -> SimResult:
    """Train `mode` on the config's data for `train.samples` samples; evaluate every
    `train.eval_every` merge rounds (every T steps for the baselines, to align the curves) on the
    evaluation set, or on the validation split carved out of training (`data.validation`), which is
    what rates are tuned on."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    x_eval, y_eval = source.eval_set() if evaluate_on == "test" else source.validation_set()
    steps, period = cfg.steps, cfg.lte.merge_every

    if mode in ("full", "diloco"):
        net = create_model(cfg.model).to(device)
        trained: torch.nn.Module = net
        n = cfg.lte.heads if mode == "diloco" else 1  # DiLoCo's workers: as many, with the same shards, as heads
        streams = [source.batches(i, n, cfg.train.batch_size // n) for i in range(n)]
        eval_forward = net
    else:
        n = cfg.lte.heads if mode == "lte" else 1
        if mode == "lora":
            cfg = cfg.with_overrides({"lte.heads": 1})
        lte = create_lte_model(cfg, list(range(n)), device)
        trained = lte
        streams = [source.batches(i, n, cfg.head_batch) for i in range(n)]
        # Single LoRA never merges: it is evaluated with its head in place.
        eval_forward = lte.forward_merged if mode == "lte" else (lambda x: lte(x[None])[0])

    trainer = DiLoCo(net, cfg, steps) if mode == "diloco" else HeadTrainer(trained, cfg.train, steps)
    sync_every = cfg.diloco.inner_steps or period  # DiLoCo's H
    if mode == "lte":
        reach = run_reach(lte, cfg)
        parts = plan_parts(lte, cfg.n_parts)
    pending: Pending | None = None  # a merge not yet applied (swarm.overlap)
    history: list[EvalPoint] = []
    start = time.perf_counter()
    running, rounds = 0.0, 0
    for step in range(steps):
        x, y = stack_batches(streams, device)
        running += trainer.step(x, y, step)
        if on_step:
            on_step(step + 1, steps)
        last = step == steps - 1
        if mode == "diloco" and ((step + 1) % sync_every == 0 or last):
            trainer.sync()
        if (step + 1) % period == 0 or last:
            if mode == "lte":
                targets = targets_of(parts, round_parts(len(parts), cfg.lte.fragments, rounds, cfg.rounds))
                pending = _merge(lte, cfg, pending, last, rounds + 1, reach, targets)
            rounds += 1
            if rounds % cfg.train.eval_every == 0 or last:
                acc, eval_loss = evaluate(eval_forward, x_eval, y_eval, device)
                steps_in_round = (step % period) + 1
                point = EvalPoint(rounds, step + 1, (step + 1) * cfg.train.batch_size, acc, eval_loss,
                                  running / steps_in_round, time.perf_counter() - start,
                                  lte.state_digest() if mode == "lte" else None)
                history.append(point)
                if on_eval:
                    on_eval(point)
            running = 0.0 if (step + 1) % period == 0 else running
    final = history[-1]
    return SimResult(mode=mode, accuracy=final.accuracy, loss=final.loss, samples=steps * cfg.train.batch_size,
                     seconds=time.perf_counter() - start, steps=steps, rounds=rounds, history=history,
                     weight_digest=lte.weight_digest() if mode == "lte" else None,
                     model=lte if mode in ("lte", "lora") else None)


Pending = tuple[dict[str, torch.Tensor], "frozenset[str] | None"]  # a merge's totals and what it covers


def _merge(lte: LTEModel, cfg: RunConfig, pending: Pending | None, last: bool, round_: int = 0,
           reach: dict[str, float] | None = None, targets: frozenset[str] | None = None) -> Pending | None:
    """One merge round of `targets` (all for None; one fragment's with `lte.fragments`), as the
    swarm does it (a contribution the swarm's bounds would refuse is an error here: in the
    simulation every head is honest). With `swarm.overlap` a round's merge is applied at the end of
    the next T steps (the heads trained on meanwhile), and the last one at once; returns the merge
    still to apply."""
    sw = cfg.swarm

    def reduce() -> dict[str, torch.Tensor]:
        try:
            return reduce_in_process(lte, sw.contribution_dtype, sw.reduced_dtype, sw.robust_clip, sw.max_update,
                                     sw.max_relative_update, reach, targets,
                                     dither_seed(sw.reduced_rounding, round_ - 1))  # round_ counts from 1
        except ContributionError as exc:
            raise ConfigError(f"round {round_}: the swarm would refuse an honest head's contribution ({exc}); raise "
                              "swarm.max_update or swarm.max_relative_update, or lower the learning rates") from None

    if not sw.overlap:
        apply_reduced(lte, reduce())
        lte.mark_merged(targets=targets)
        return None
    if pending is not None:
        apply_reduced(lte, pending[0])
    lte.settle_delayed(merged=True, targets=None if pending is None else pending[1])  # as a peer settles
    totals = reduce()
    lte.mark_sent(targets=targets)
    if last:
        apply_reduced(lte, totals)
        lte.settle_delayed(merged=True, targets=targets)
        return None
    return totals, targets
