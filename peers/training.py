"""One local training step, the same in the one-process simulation and in a volunteer's peer:
forward every held head on its own batch, backward, per-head clipping, the learning-rate
schedule, AdamW (one state per head). Also the loss and evaluation helpers both use."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from swarm.config import ParamGroup, TrainConfig
from swarm.errors import ConfigError
from swarm.head_adamw import HeadAdamW
from swarm.lte_model import LTEModel, clip_head_grads_

Batch = tuple[torch.Tensor, torch.Tensor]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    """AdamW parameter groups with their settings (`train.factors`, `train.replicas`, `train.full`)
    and peak learning rates (`train.lr`, `train.replica_lr`, `train.full_lr`): an LTE model's
    parameters split into its heads' factors and replicas, anything else as one full-rank group."""
    def group(params: list[nn.Parameter], settings: ParamGroup, peak_lr: float) -> dict:
        clip = train.grad_clip if settings.grad_clip is None else (settings.grad_clip or None)
        decay = train.weight_decay if settings.weight_decay is None else settings.weight_decay
        return {"params": params, "weight_decay": decay, "peak_lr": peak_lr, "lr": peak_lr, "clip": clip}

    if not per_head:
        return [group(params, train.full, train.full_lr)]
    replica_ids = {id(p) for p in forward.replicas.parameters()} if isinstance(forward, LTEModel) else set()
    groups = [group([p for p in params if id(p) not in replica_ids], train.factors, train.lr),
              group([p for p in params if id(p) in replica_ids], train.replicas, train.replica_rate)]
    return [g for g in groups if g["params"]]


class HeadTrainer:
    """AdamW over a peer's heads (an `LTEModel`) or over one full-rank model, stepped at a global step
    index so that the schedule of a peer that joins late matches the simulation's.

    LTE heads: each head is clipped to its own norm (one head's gradient must not be scaled by
    another's) and has its own optimizer state (`HeadAdamW`), which survives a change of the head
    set (`set_heads`). A full-rank model is clipped as a whole and stepped by `torch.optim.AdamW`.
    Optimizer settings come per group (`param_groups`); a head's factors and replicas are clipped
    together at `train.grad_clip` unless a group sets its own clip.

    `train.precision = bf16` runs forward and loss under bf16 autocast (backward follows the
    forward's dtypes); the fp32 master W, the factors and the optimizer state stay fp32. bf16 is
    allowed on the CPU as well (it is exact enough to test there) but is made for GPUs: CPUs without
    bf16 units run it slower than fp32. `train.checkpointing` turns on timm's activation
    checkpointing; LTE heads are then run forward and backward one at a time, each inside its own
    `LTEModel.plugged` block, because the recomputation must see the head's own tensors.
    """

    def __init__(self, model: nn.Module, train: TrainConfig, total_steps: int):
        self.model, self.train, self.total_steps = model, train, total_steps
        self.lte = model if isinstance(model, LTEModel) else None
        if train.checkpointing:
            net = model.model if self.lte is not None else model
            if not hasattr(net, "set_grad_checkpointing"):
                raise ConfigError(f"train.checkpointing: {type(net).__name__} has no set_grad_checkpointing")
            net.set_grad_checkpointing(True)
        if self.lte is not None:
            self.params = self.lte.trainable_parameters()
            groups = param_groups(self.lte, self.params, train, per_head=True)
            self.optimizer: torch.optim.Optimizer = HeadAdamW(groups)
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
            groups = param_groups(model, self.params, train, per_head=False)
            self.optimizer = torch.optim.AdamW(groups)
        self._separate_clips = (self.lte is None or train.factors.grad_clip is not None
                                or train.replicas.grad_clip is not None)

    @property
    def clips(self) -> list[tuple[list[nn.Parameter], float | None]]:
        """(parameters, clip) pairs: per group when a group sets its own clip (or full-rank), else
        every head's parameters together at `train.grad_clip`."""
        if self._separate_clips:
            return [(g["params"], g["clip"]) for g in self.optimizer.param_groups]
        return [(self.params, self.train.grad_clip)]

    def set_heads(self, head_ids: Sequence[int]) -> None:
        """Hold another set of heads: kept heads keep their factors and their optimizer state
        (moments and step count); new heads start fresh."""
        keep = self.lte.set_heads(head_ids)
        self.params = self.lte.trainable_parameters()
        groups = param_groups(self.lte, self.params, self.train, per_head=True)
        self.optimizer.follow_heads([g["params"] for g in groups], keep)

    def _autocast(self, x: torch.Tensor):
        if self.train.precision == "bf16":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every head on its own batch; the mean loss over heads."""
        if self.lte is None or (self.lte.vectorised and not self.train.checkpointing):
            with self._autocast(x):
                logits = self.lte(x) if self.lte is not None else self.model(x[0])[None]
                loss, mean_loss = head_loss(logits, y)
            loss.backward()
            return mean_loss
        # One head at a time, plugged in for its forward and its backward; a head's gradient is its
        # own loss's, so this is the gradient of the sum. Only one head's activations are alive.
        losses = []
        for i in range(self.lte.n_local):
            with self.lte.plugged(i) as net:
                with self._autocast(x):
                    loss, _ = head_loss(net(x[i])[None], y[i:i + 1])
                loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def step(self, x: torch.Tensor, y: torch.Tensor, step_index: int) -> float:
        """One step on batches x (H, b, ...) and y (H, b); returns the mean loss over heads."""
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = self._forward_backward(x, y)
        for params, clip in self.clips:
            if clip is None:
                continue
            if self.lte is not None:
                clip_head_grads_(params, clip)
            else:
                nn.utils.clip_grad_norm_(params, clip)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(step_index, self.total_steps, self.train)
        self.optimizer.step()
        return mean_loss.item()
