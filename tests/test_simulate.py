"""`lte-swarm simulate` end to end on the embedded digits: it learns, and the baselines run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, run_cli

CONFIG = str(ROOT / "configs" / "digits-vit-tiny.yaml")


def _simulate(*extra: str) -> dict:
    result = run_cli("simulate", "--config", CONFIG, "--json", *extra)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_lte_simulation_reports_its_run():
    result = _simulate("--samples", "1280")
    assert result["mode"] == "lte"
    assert result["samples"] == 1280 and result["steps"] == 20 and result["rounds"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0 and result["seconds"] > 0
    assert len(result["weight_digest"]) == 64


@pytest.mark.parametrize("baseline", ["full", "lora"])
def test_baselines_run_on_the_same_budget(baseline):
    result = _simulate("--samples", "3200", "--baseline", baseline)
    assert result["mode"] == baseline and result["samples"] == 3200
    assert result["accuracy"] > 0.2, result


def test_simulation_is_deterministic():
    """Same config, same seeds: the same merged W, bit for bit (peers will rely on it)."""
    from swarm.config import load_config
    from peers.simulate import simulate

    cfg = load_config(CONFIG).with_overrides({"train.samples": 640, "lte.merge_every": 5})
    a, b = simulate(cfg), simulate(cfg)
    assert a.weight_digest == b.weight_digest and a.accuracy == b.accuracy
    c = simulate(cfg.with_overrides({"train.seed": 1}))
    assert c.weight_digest != a.weight_digest


@pytest.mark.parametrize("nonlinear", ["freeze", "replicate"])
@pytest.mark.parametrize("schedule", [{"swarm.overlap": True}, {"lte.fragments": 2},
                                      {"lte.fragments": 2, "swarm.overlap": True, "swarm.eager": True}])
def test_a_merge_applied_late_or_in_fragments_loses_and_doubles_nothing(nonlinear, schedule):
    """With one head, a merge adds exactly what the head's forward already has, so applying it a
    round late (swarm.overlap), eagerly or not, or merging W's parts in turn (lte.fragments) must
    train the very same model (exact W storage): a lost or doubled contribution, or a baseline
    moved to the wrong factors, would show."""
    from peers.simulate import simulate
    from tests.memswarm import tiny_config

    cfg = tiny_config(heads=1, merge_every=2, rounds=6).with_overrides(
        {"lte.nonlinear": nonlinear, "lte.storage": "fp32", "swarm.robust_clip": 0.0})
    prompt = simulate(cfg).model.shared_state()
    late = simulate(cfg.with_overrides(schedule)).model.shared_state()
    initial = simulate(cfg.with_overrides({"train.samples": cfg.train.batch_size})).model.shared_state()
    for key in prompt:
        torch.testing.assert_close(late[key], prompt[key], rtol=1e-5, atol=1e-5, msg=key)
    assert max((prompt[k] - initial[k]).abs().max().item() for k in prompt) > 1e-3  # training moved W
