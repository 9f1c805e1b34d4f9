"""LTE against full-rank training. What makes LTE LTE, the merge, is proven exactly: a merge round of
the simulation adds (s/N) sum_i (B_i A_i - B0_i A0_i) to W and the mean of the replicas' changes to
the shared parameters, and a merge with twice the step is off by exactly one step (a learning
curve cannot tell such a merge apart: on one machine it lost 30 points to full-rank training, on
another 13). What training shows is that LTE learns about as well as full-rank training at the
same sample budget, with a margin calibrated over seeds, thread counts and CPU kernels.

Calibration of MARGIN (configs/digits-vit-tiny.yaml at each arm's tuned rates: factors 5e-4,
replicas 6e-3, full-rank 3e-3; 25,600 samples, seed k setting the model and data seeds; torch
2.14.1 on a 2-core x86-64 machine), full-rank minus LTE test accuracy in points:

  kernels                                 threads   gap, seeds 0-9                                  max
  native                                  1         -0.6  1.4  1.4 -2.2 -2.2  0.6  0.0 -1.1  0.8 -1.4   1.4
  native                                  2         -0.3  1.7  2.2 -1.1 (seeds 0-3)                    2.2
  ATEN_CPU_CAPABILITY=default (no AVX)    1          0.8  1.1  1.4 (seeds 0-2)                         1.4

Full-rank reached 92.5-96.7 %, LTE 91.7-96.7 %. Another CPU's kernels or thread count moves the
trajectory about as much as another seed does, so the margin must hold over the seeds' spread, not
one seed's value: MARGIN is the largest gap seen (2.2) plus a third of the spread (-2.2 to 2.2)
again, rounded up to 5 points: 5. LTE's floor (it learnt: chance is 0.1) is the smallest LTE
accuracy seen (91.7) less the spread, rounded down to 5 points: 85. (At the rates shipped before
each arm had its own, one rate for factors and replicas alike, the gap was 8.6-23.6 points.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peers.models import create_model, lte_spec
from peers.simulate import _merge, simulate
from swarm.config import load_config
from swarm.lora import merge_scale
from swarm.lte_model import LTEModel
from tests.conftest import ROOT, randomize_heads

BUDGET = 25_600
MARGIN = 0.05
FLOOR = 0.85


@pytest.fixture(scope="module")
def digits():
    return load_config(ROOT / "configs" / "digits-vit-tiny.yaml").with_overrides(
        {"train.samples": BUDGET, "train.eval_every": 1000})


def _twice_the_step(monkeypatch) -> None:
    merge = LTEModel.apply_merge
    monkeypatch.setattr(LTEModel, "apply_merge",
                        lambda self, weights, replicas: merge(self, {k: 2 * v for k, v in weights.items()}, replicas))


def _shipped_lte_in_float64(cfg) -> LTEModel:
    """The shipped config's model and heads (variant, replicated non-linear parameters), in float64
    and with an exact W store, after one merged round: the next round's changes are measured from
    a non-zero baseline B0 A0."""
    spec = dataclasses.replace(lte_spec(cfg), storage="fp32")
    model = LTEModel(create_model(cfg.model).double(), spec, list(range(cfg.lte.heads)))
    randomize_heads(model, seed=1, scale=0.05)
    model.merge()
    randomize_heads(model, seed=2, scale=0.05)
    return model


def _expected_step(model: LTEModel) -> dict[str, torch.Tensor]:
    """What one merge of every head adds, written out: W += (s/N) sum_i (B_i A_i - B0_i A0_i) per
    layer, shared += (1/N) sum_i (replica_i - base_i) per replicated parameter."""
    n, coef = model.spec.n_heads, merge_scale(model.spec.scale, model.spec.n_heads)
    step = {}
    for name, _ in model.layers():
        f = model.factors[name.replace(".", ":")]
        step[f"{name}.weight"] = coef * sum(f.B[i].detach() @ f.A[i].detach() - f.B0[i] @ f.A0[i]
                                            for i in range(model.n_local))
    for name in model.replicated:
        key = name.replace(".", ":")
        step[name] = sum(model.replicas[key][i].detach() - model.replica_base[key][i]
                         for i in range(model.n_local)) / n
    return step


def _moved(model: LTEModel, merge) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(what `merge(model)` added to the shared state, the step it should have added)."""
    step = _expected_step(model)
    before = {k: v.clone() for k, v in model.shared_state().items()}
    merge(model)
    after = model.shared_state()
    return {k: after[k] - before[k] for k in step}, step


@pytest.mark.parametrize("broken", [False, True], ids=["merge", "merge-with-twice-the-step"])
def test_a_merge_round_adds_exactly_s_over_n_times_the_heads_changes(digits, monkeypatch, broken):
    """The one-process merge in float64 adds the step to 1e-12; the simulation's own merge (every
    head's change encoded as it travels, in float32, reduced and applied) to float32 rounding. A
    merge with twice the step adds, exactly, one step too many to W and nothing too many to the
    replicated parameters: the identities catch it at either precision."""
    paths = [(_shipped_lte_in_float64(digits), LTEModel.merge, 0.0),
             (_shipped_lte_in_float64(digits), lambda m: _merge(m, digits, None, last=False), 1e-5)]
    if broken:
        _twice_the_step(monkeypatch)
    for model, merge, relative in paths:
        layers = {f"{name}.weight" for name in model.layer_names}
        moved, step = _moved(model, merge)
        assert set(step) == set(model.shared_state()) and layers < set(step)  # every shared tensor
        for key, expected in step.items():
            scale = expected.abs().max().item()
            assert scale > 1e-3, key  # the heads really moved: the identity is not 0 = 0
            excess = expected if broken and key in layers else torch.zeros_like(expected)
            torch.testing.assert_close(moved[key] - expected, excess, rtol=0, atol=max(1e-12, relative * scale),
                                       msg=key)


@pytest.mark.timeout(600)
def test_lte_is_within_the_calibrated_margin_of_full_rank(digits):
    full = simulate(digits, "full").accuracy
    lte = simulate(digits, "lte").accuracy
    assert full - lte <= MARGIN, f"full-rank {full:.3f}, LTE {lte:.3f}"
    assert lte > FLOOR, f"LTE {lte:.3f}: it did not learn (chance is 0.1)"
