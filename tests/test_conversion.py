"""Every nn.Linear of timm ViT and MLP-Mixer models becomes W plus heads; merged = plain timm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.lora import LTELinear
from swarm.lte_model import LTEModel, LTESpec
from tests.conftest import randomize_heads, tiny_mixer, tiny_vit

BUILDERS = {"vit": tiny_vit, "mixer": tiny_mixer}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_linear_is_converted(arch):
    plain = BUILDERS[arch]()
    linear_names = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)]
    assert len(linear_names) >= 5
    model = LTEModel(BUILDERS[arch](), LTESpec(n_heads=2, rank=2, alpha=8.0), [0, 1])
    assert model.layer_names == linear_names
    assert not [n for n, m in model.model.named_modules() if type(m) is nn.Linear]
    assert all(isinstance(model.model.get_submodule(n), LTELinear) for n in linear_names)
    # W is never trained by gradient; only the head factors (and replicas, if any) are.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"factors.{n.replace('.', ':')}.{ab}" for n in linear_names for ab in "AB"}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("nonlinear", ["freeze", "replicate"])
def test_merged_model_evaluates_like_plain_timm_with_merged_weights(arch, nonlinear):
    spec = LTESpec(n_heads=3, rank=2, alpha=32.0, nonlinear=nonlinear)
    model = LTEModel(BUILDERS[arch]().double(), spec, [0, 1, 2])
    for r in range(2):  # two rounds of "training" and merging
        randomize_heads(model, seed=r)
        model.merge()
    plain = BUILDERS[arch](seed=99).double()  # different init: everything must come from the state dict
    plain.load_state_dict(model.merged_state_dict())
    plain.eval(), model.eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain(x), model.forward_merged(x), rtol=0, atol=1e-10)
    # and the merges did change the model
    fresh = BUILDERS[arch]().double().eval()
    assert not torch.allclose(fresh(x), plain(x), atol=1e-4)
