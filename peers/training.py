"""One local training step, the same in the one-process simulation and in a volunteer's peer:
forward every held head on its own batch, backward, per-head clipping, the learning-rate
schedule, AdamW. Also the loss and evaluation helpers both use."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from swarm.config import TrainConfig
from swarm.lte_model import clip_head_grads_

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


class HeadTrainer:
    """AdamW over a set of heads' parameters (or one full-rank model's), stepped at a global step
    index so that the schedule of a peer that joins late matches the simulation's.

    `per_head_clip`: LTE heads are clipped each to its own norm (one head's gradient must not be
    scaled by another's); a full-rank model is clipped as a whole."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], lr: float,
                 train: TrainConfig, total_steps: int, per_head_clip: bool = True):
        self.forward, self.lr, self.train, self.total_steps = forward, lr, train, total_steps
        self.per_head_clip = per_head_clip
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor, step_index: int) -> float:
        """One step on batches x (H, b, ...) and y (H, b); returns the mean loss over heads."""
        loss, mean_loss = head_loss(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.train.grad_clip is not None:
            if self.per_head_clip:
                clip_head_grads_(self.params, self.train.grad_clip)
            else:
                nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(step_index, self.total_steps, self.train)
        self.optimizer.step()
        return mean_loss.item()
