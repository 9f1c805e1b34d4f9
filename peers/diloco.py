"""DiLoCo (arXiv 2311.08105), the baseline LTE is measured against when a user would rather train the
whole model on every worker. N workers each hold the full-rank model and its AdamW state, train it
on their own shard for H steps, then their changes since the last sync are averaged and applied to
the global model through the outer step (`swarm.lora.outer_step_`: DiLoCo's Nesterov step by
default), and every worker starts its next H steps from the new global model, keeping its AdamW
moments. What LTE saves is this memory: each worker holds W in full precision, its gradient and two
AdamW moments, plus the global copy and the outer momentum (`GlobalModel`).

`DiLoCo` runs all workers in one process (the simulation); `peers/diloco_baseline.py` runs one
worker per process, averaging over hivemind."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from peers.training import HeadTrainer
from swarm.config import OuterConfig, RunConfig
from swarm.lora import outer_step_


class GlobalModel:
    """The model every worker starts each H steps from, and the outer optimizer's momentum: what a
    DiLoCo worker holds beyond the state of full-rank training."""

    def __init__(self, model: nn.Module, outer: OuterConfig):
        self.model, self.outer = model, outer
        self.momentum = {name: torch.zeros_like(p) for name, p in model.named_parameters()} \
            if outer.optimizer == "nesterov" else {}

    @torch.no_grad()
    def changes(self, worker: nn.Module) -> dict[str, torch.Tensor]:
        """The worker's change since it last started from the global model (the negative of
        DiLoCo's pseudo-gradient), per parameter."""
        base = dict(self.model.named_parameters())
        return {name: p.detach() - base[name] for name, p in worker.named_parameters()}

    @torch.no_grad()
    def step(self, changes: Mapping[str, torch.Tensor], weight: float) -> None:
        """The outer step with the mean change `weight * changes[name]` of every parameter."""
        for name, p in self.model.named_parameters():
            outer_step_(p, changes[name], weight, self.outer.lr, self.momentum.get(name), self.outer.momentum)

    @torch.no_grad()
    def restart(self, worker: nn.Module) -> None:
        """Start `worker` from the global model again (its optimizer state is the worker's own)."""
        worker.load_state_dict(self.model.state_dict())


class DiLoCo:
    """The workers of a DiLoCo run and its global model (`model`, what is evaluated)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total_steps: int):
        self.model = model
        self.global_model = GlobalModel(model, cfg.diloco.outer)
        self.workers = [copy.deepcopy(model) for _ in range(cfg.lte.heads)]
        self.trainers = [HeadTrainer(w, cfg.train, total_steps) for w in self.workers]

    def step(self, x: torch.Tensor, y: torch.Tensor, step_index: int) -> float:
        """One local step of every worker on its own batch (x, y stacked over workers); the mean loss."""
        losses = [t.step(x[i:i + 1], y[i:i + 1], step_index) for i, t in enumerate(self.trainers)]
        return sum(losses) / len(losses)

    @torch.no_grad()
    def sync(self) -> None:
        """Average the workers' changes since the last sync into the global model (the outer step)
        and start every worker from it again; buffers (none in a ViT) follow worker 0."""
        total: dict[str, torch.Tensor] = {}
        for worker in self.workers:  # in worker order: the same bits however often it runs
            for name, change in self.global_model.changes(worker).items():
                total[name] = total[name] + change if name in total else change
        self.global_model.step(total, 1.0 / len(self.workers))
        for worker in self.workers:
            self.global_model.restart(worker)
