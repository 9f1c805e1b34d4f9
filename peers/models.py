"""timm models for a run: the same initial weights on every peer, from the run's model seed."""

from __future__ import annotations

import torch
from torch import nn

from swarm.config import ModelConfig, RunConfig
from swarm.errors import ConfigError
from swarm.lte_model import LTEModel, LTESpec


def create_model(cfg: ModelConfig) -> nn.Module:
    """`timm.create_model(name, **args)` with the run's seed, so that W0 is reproducible anywhere."""
    import timm

    if not timm.is_model(cfg.name):
        raise ConfigError(f"model.name: {cfg.name!r} is not a timm model (see timm.list_models())")
    devices_rng = torch.random.fork_rng(devices=[])
    with devices_rng:
        torch.manual_seed(cfg.seed)
        try:
            return timm.create_model(cfg.name, pretrained=False, **cfg.args)
        except TypeError as exc:
            raise ConfigError(f"model.args: {exc}") from None


def lte_spec(cfg: RunConfig) -> LTESpec:
    lte = cfg.lte
    return LTESpec(n_heads=lte.heads, rank=lte.rank, alpha=lte.alpha, variant=lte.variant,
                   nonlinear=lte.nonlinear, storage=lte.storage, seed=cfg.model.seed, vectorised=lte.vectorised,
                   split_qkv=lte.split_qkv, init_scale=lte.init_scale, outer=lte.outer.optimizer,
                   outer_lr=lte.outer.lr,
                   outer_momentum=lte.outer.momentum if lte.outer.optimizer == "nesterov" else 0.0)


def create_lte_model(cfg: RunConfig, head_ids: list[int], device: str | torch.device = "cpu") -> LTEModel:
    """The run's timm model converted to W plus the given heads of the run."""
    model = LTEModel(create_model(cfg.model), lte_spec(cfg), head_ids, device=device)
    model.delayed, model.eager = cfg.swarm.overlap, cfg.swarm.eager
    return model


def run_reach(model: LTEModel, cfg: RunConfig) -> dict[str, float]:
    """`LTEModel.update_reach` of what one contribution carries (T steps at the run's factors' and
    replicas' rates, k T with W merged in k fragments: a part's change accumulates until its turn):
    what the swarm's bounds on a contribution, and the simulation's, are measured against."""
    return model.update_reach(cfg.lte.merge_every * cfg.lte.fragments, cfg.train.lr, cfg.train.replica_rate)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available; use cpu")
    return torch.device(name)
