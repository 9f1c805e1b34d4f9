"""Shared helpers: tiny float64 models on which LTE identities can be checked exactly."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CLI = [sys.executable, "-m", "peers.cli"]


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).double()


def tiny_vit(seed: int = 0, **overrides) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    args.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


def tiny_mixer(seed: int = 0) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(seed)
    return MlpMixer(num_classes=3, img_size=8, in_chans=1, patch_size=4, num_blocks=2, embed_dim=16)


def randomize_heads(model, seed: int, scale: float = 0.1) -> None:
    """Give every head non-zero B (and perturbed A and replicas), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.fixture
def twin():
    """Two independent deep copies of a module (same initial weights)."""
    return lambda module: (copy.deepcopy(module), copy.deepcopy(module))
