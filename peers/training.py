"""One local training step, the same in the one-process simulation and in a volunteer's peer:
forward every held head on its own batch, backward, per-head clipping, the learning-rate
schedule, AdamW. Also the loss and evaluation helpers both use."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from swarm.config import ParamGroup, TrainConfig
from swarm.lte_model import LTEModel, clip_head_grads_

Batch = tuple[torch.Tensor, torch.Tensor]


def lr_factor(step: int, total: int, train: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to zero over the run."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def head_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over heads of each head's mean loss (so each head's gradient is its own loss's gradient),
    and the mean loss for reporting. logits (H, b, C), y (H, b)."""
    per = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape).mean(1)
    return per.sum(), per.mean().detach()


def stack_batches(streams: Sequence[Iterator[Batch]], device: torch.device) -> Batch:
    """One batch from each head's stream, stacked on a leading head axis."""
    pairs = [next(s) for s in streams]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             device: torch.device, batch: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `forward` on the held-out set."""
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        logits = forward(xb).float()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
    return correct / len(y), loss / len(y)


def param_groups(forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], train: TrainConfig,
                 per_head: bool) -> list[dict]:
    """AdamW parameter groups with their settings (`train.factors`, `train.replicas`, `train.full`):
    an LTE model's parameters split into its heads' factors and replicas, anything else as one
    full-rank group."""
    def group(params: list[nn.Parameter], settings: ParamGroup) -> dict:
        clip = train.grad_clip if settings.grad_clip is None else (settings.grad_clip or None)
        decay = train.weight_decay if settings.weight_decay is None else settings.weight_decay
        return {"params": params, "weight_decay": decay, "lr_scale": settings.lr_scale, "clip": clip}

    if not per_head:
        return [group(params, train.full)]
    replica_ids = {id(p) for p in forward.replicas.parameters()} if isinstance(forward, LTEModel) else set()
    groups = [group([p for p in params if id(p) not in replica_ids], train.factors),
              group([p for p in params if id(p) in replica_ids], train.replicas)]
    return [g for g in groups if g["params"]]


class HeadTrainer:
    """AdamW over a set of heads' parameters (or one full-rank model's), stepped at a global step
    index so that the schedule of a peer that joins late matches the simulation's.

    `per_head_clip`: LTE heads are clipped each to its own norm (one head's gradient must not be
    scaled by another's); a full-rank model is clipped as a whole. A head's factors and replicas
    are clipped together at `train.grad_clip` unless a group sets its own clip."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], lr: float,
                 train: TrainConfig, total_steps: int, per_head_clip: bool = True):
        self.forward, self.lr, self.train, self.total_steps = forward, lr, train, total_steps
        self.per_head_clip = per_head_clip
        self.params = params
        groups = param_groups(forward, params, train, per_head_clip)
        separate = not per_head_clip or train.factors.grad_clip is not None or train.replicas.grad_clip is not None
        self.clips = [(g["params"], g["clip"]) for g in groups] if separate else [(params, train.grad_clip)]
        self.optimizer = torch.optim.AdamW(groups, lr=lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, step_index: int) -> float:
        """One step on batches x (H, b, ...) and y (H, b); returns the mean loss over heads."""
        loss, mean_loss = head_loss(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for params, clip in self.clips:
            if clip is None:
                continue
            if self.per_head_clip:
                clip_head_grads_(params, clip)
            else:
                nn.utils.clip_grad_norm_(params, clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group["lr_scale"] * lr_factor(step_index, self.total_steps, self.train)
        self.optimizer.step()
        return mean_loss.item()
