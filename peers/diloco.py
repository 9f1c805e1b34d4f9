"""DiLoCo (arXiv 2311.08105) in one process: the baseline LTE is measured against when a user would
rather train the whole model on every worker. N workers each hold the full-rank model and its AdamW
state, train it on their own shard for H steps, then their changes since the last sync are averaged
and applied to the global model through the outer step (`swarm.lora.outer_step_`: DiLoCo's Nesterov
step by default), and every worker starts its next H steps from the new global model, keeping its
AdamW moments. What LTE saves is this memory: each worker holds W in full precision, its gradient
and two AdamW moments, plus the global copy and the outer momentum."""

from __future__ import annotations

import copy

import torch
from torch import nn

from peers.training import HeadTrainer
from swarm.config import RunConfig
from swarm.lora import outer_step_


class DiLoCo:
    """The workers of a DiLoCo run and its global model (`model`, what is evaluated)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total_steps: int):
        self.model, self.outer = model, cfg.diloco.outer
        self.workers = [copy.deepcopy(model) for _ in range(cfg.lte.heads)]
        self.trainers = [HeadTrainer(w, cfg.train, total_steps) for w in self.workers]
        self.momentum = {name: torch.zeros_like(p) for name, p in model.named_parameters()} \
            if self.outer.optimizer == "nesterov" else {}

    def step(self, x: torch.Tensor, y: torch.Tensor, step_index: int) -> float:
        """One local step of every worker on its own batch (x, y stacked over workers); the mean loss."""
        losses = [t.step(x[i:i + 1], y[i:i + 1], step_index) for i, t in enumerate(self.trainers)]
        return sum(losses) / len(losses)

    @torch.no_grad()
    def sync(self) -> None:
        """Average the workers' changes since the last sync into the global model (the outer step)
        and start every worker from it again; buffers (none in a ViT) follow worker 0."""
        workers = [dict(w.named_parameters()) for w in self.workers]
        for name, p in self.model.named_parameters():
            delta = torch.zeros_like(p)
            for params in workers:  # in worker order: the same bits however often it runs
                delta += params[name] - p
            outer_step_(p, delta, 1.0 / len(workers), self.outer.lr, self.momentum.get(name), self.outer.momentum)
        state = self.model.state_dict()
        for w in self.workers:
            w.load_state_dict(state)
