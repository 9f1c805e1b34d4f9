"""LTE learns about as well as full-rank training at the same sample budget, and a broken merge does
not: on the embedded digits (configs/digits-vit-tiny.yaml as shipped, seed 0, at 25,600 samples)
LTE's test accuracy is within MARGIN of full-rank's, and with the merge's step s/N doubled it is not.

Calibration (measured with the same config and budget, model and data seeds 0-5): full-rank minus
LTE test accuracy was 9.2, 14.4, 13.1, 21.7, 17.8 and 17.5 points (mean 15.6, sd 4.3; full-rank
92.5-95.8 %, LTE 72.8-83.3 %). The rule fixing MARGIN from those gaps alone: the largest, rounded up
to the next 5 points, 25. With s/N doubled the gap was 30.0, 31.7, 36.9, 35.3, 28.3 and 41.1 points:
outside the margin at every seed. With s/N halved it was 16.9, 20.8 and 18.9 (seeds 0-2): inside,
so this test does not catch that one; the float64 identities of test_lte_math.py do (a merge that is
not W + (s/N) sum_i delta_i fails them at 1e-12). Without any merge the model stays at W0, at chance.

The run is deterministic; the margin is there for legitimate changes that alter rounding, and so
the trajectory, which move the gap about as much as another seed does."""

from __future__ import annotations

import pytest

from peers.simulate import simulate
from swarm.config import load_config
from swarm.lte_model import LTEModel
from tests.conftest import ROOT

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]

BUDGET = 25_600
MARGIN = 0.25


@pytest.fixture(scope="module")
def digits():
    return load_config(ROOT / "configs" / "digits-vit-tiny.yaml").with_overrides(
        {"train.samples": BUDGET, "train.eval_every": 1000})


@pytest.fixture(scope="module")
def full_accuracy(digits) -> float:
    return simulate(digits, "full").accuracy


def test_lte_is_within_the_calibrated_margin_of_full_rank(digits, full_accuracy):
    lte = simulate(digits, "lte").accuracy
    assert full_accuracy - lte <= MARGIN, f"full-rank {full_accuracy:.3f}, LTE {lte:.3f}"
    assert lte > 0.5  # and it learnt (chance is 0.1)


def test_a_merge_with_twice_the_step_falls_outside_the_margin(digits, full_accuracy, monkeypatch):
    merge = LTEModel.apply_merge
    monkeypatch.setattr(LTEModel, "apply_merge",
                        lambda self, weights, replicas: merge(self, {k: 2 * v for k, v in weights.items()}, replicas))
    broken = simulate(digits, "lte").accuracy
    assert full_accuracy - broken > MARGIN, f"full-rank {full_accuracy:.3f}, broken LTE {broken:.3f}"
