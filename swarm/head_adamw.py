"""AdamW over tensors stacked along a leading head dimension, with every head's state its own.

LTE gives each head its own optimizer (its state is never communicated), but a model holds its
local heads stacked (`swarm.lte_model.LTEModel`), and `torch.optim.AdamW` keeps one step count per
tensor. A peer that takes a new head beside one it keeps needs the kept head's moments and step
count intact and the new head's fresh: here the step count is a vector with one entry per head,
and `follow_heads` carries each kept head's rows over when the stacks are rebuilt.

With every head at the same step the update is, op for op, the one of `torch.optim.AdamW` (its
single-tensor form), so a run's numbers do not depend on which of the two trained it.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


class HeadAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam for stacked per-head tensors (dim 0 = local head)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        if closure is not None:
            raise ValueError("HeadAdamW takes no closure")
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or p.shape[0] == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, exp_avg, exp_avg_sq, steps = p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]
                steps += 1
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                counts = steps.tolist()
                # Heads that share a step count share one bias correction: one op over all of them.
                for count, rows in _rows_by_count(counts):
                    bias_correction1 = 1 - beta1 ** count
                    bias_correction2_sqrt = (1 - beta2 ** count) ** 0.5
                    step_size = lr / bias_correction1
                    if len(rows) == len(counts):
                        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                        p.addcdiv_(exp_avg, denom, value=-step_size)
                        continue
                    for i in rows:
                        denom = (exp_avg_sq[i].sqrt() / bias_correction2_sqrt).add_(eps)
                        p[i].addcdiv_(exp_avg[i], denom, value=-step_size)
        return None

    @torch.no_grad()
    def follow_heads(self, new_params: Sequence[nn.Parameter] | Sequence[Sequence[nn.Parameter]],
                     keep: Mapping[int, int]) -> None:
        """The model rebuilt its stacks (`LTEModel.set_heads`): optimize `new_params` from now on
        (one list per parameter group, or one list for a single group), which correspond one to
        one, in order, to the current parameters. `keep` maps each kept head's new position to its
        old one; those rows of the moments and step counts are carried over unchanged, every other
        head starts fresh (step 0, zero moments)."""
        groups = list(new_params)
        if groups and isinstance(groups[0], nn.Parameter):
            groups = [groups]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} groups of new tensors for {len(self.param_groups)} parameter groups")
        for group, new_group in zip(self.param_groups, groups):
            old_params, new_group = group["params"], list(new_group)
            if len(old_params) != len(new_group):
                raise ValueError(f"{len(new_group)} new tensors for {len(old_params)} optimized ones")
            for old, new in zip(old_params, new_group):
                state = self.state.pop(old, None)
                if not state or not keep:
                    continue
                fresh = {"step": torch.zeros(new.shape[0], dtype=torch.float32),
                         "exp_avg": torch.zeros_like(new), "exp_avg_sq": torch.zeros_like(new)}
                for new_pos, old_pos in keep.items():
                    for key in fresh:
                        fresh[key][new_pos] = state[key][old_pos]
                self.state[new] = fresh
            group["params"] = new_group


def _rows_by_count(counts: list[float]) -> list[tuple[float, list[int]]]:
    by_count: dict[float, list[int]] = {}
    for i, count in enumerate(counts):
        by_count.setdefault(count, []).append(i)
    return list(by_count.items())
