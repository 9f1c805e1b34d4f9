"""The DiLoCo baseline in one process (`peers/diloco.py`): its outer step, its wiring into the
simulation, and its arms in the comparison."""

from __future__ import annotations

import torch

from peers.diloco import DiLoCo
from peers.simulate import simulate
from peers.study import ARMS, schedule_arm
from tests.conftest import tiny_mlp
from tests.memswarm import tiny_config


def test_a_sync_applies_the_outer_nesterov_step_to_the_workers_mean_change_and_restarts_them_from_it():
    cfg = tiny_config(heads=2).with_overrides({"diloco.outer.lr": 0.7, "diloco.outer.momentum": 0.9})
    start = tiny_mlp().float()
    run = DiLoCo(start, cfg, total_steps=10)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    changes = []
    with torch.no_grad():
        for i, w in enumerate(run.workers):
            moved = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1
                     for k, p in w.named_parameters()}
            for k, p in w.named_parameters():
                p.add_(moved[k])
            changes.append(moved)
    for _ in range(2):  # the second sync sees no change: momentum alone moves the model
        run.sync()
    for k, p in start.named_parameters():
        mean = (changes[0][k] + changes[1][k]) / 2
        first = 0.7 * (mean + 0.9 * mean)
        second = 0.7 * (0.9 * 0.9 * mean)  # m = 0.9 m + 0 after the first sync's m = mean
        torch.testing.assert_close(p, before[k] + first + second, rtol=1e-5, atol=1e-6)
        for w in run.workers:
            assert torch.equal(dict(w.named_parameters())[k], p)


def test_one_worker_syncing_every_step_by_plain_averaging_is_full_rank_training():
    """With one worker, H = 1 and the outer step w += 1.0 (w_worker - w), DiLoCo is full-rank
    training on the same batches up to rounding: what wires it to the data, its trainer and its
    evaluation is the full-rank baseline's."""
    cfg = tiny_config(heads=1, merge_every=2, rounds=3).with_overrides(
        {"diloco.inner_steps": 1, "diloco.outer.optimizer": "average", "diloco.outer.lr": 1.0})
    full, diloco = simulate(cfg, "full"), simulate(cfg, "diloco")
    assert [p.samples for p in diloco.history] == [p.samples for p in full.history]
    for a, b in zip(diloco.history, full.history):
        assert abs(a.loss - b.loss) < 1e-4 and abs(a.train_loss - b.train_loss) < 1e-4
    nesterov = simulate(cfg.with_overrides({"diloco.outer.optimizer": "nesterov"}), "diloco")
    assert abs(nesterov.history[-1].loss - full.history[-1].loss) > 1e-3  # the outer step matters


def test_diloco_arms_run_at_their_own_rates_and_say_what_they_are():
    base = tiny_config(heads=4, merge_every=10)
    assert ARMS["diloco"].mode == "diloco" and ARMS["diloco"].rates == ("train.full_lr", "diloco.outer.lr")
    assert ARMS["diloco"].label(base) == "DiLoCo N=4 H=10 outer nesterov mu 0.9"
    arm = schedule_arm("H50", {"diloco.inner_steps": 50})
    assert arm.mode == "diloco" and arm.rates_of == "diloco"
    assert arm.label(base) == "H50: DiLoCo N=4 H=50 outer nesterov mu 0.9"
    assert schedule_arm("H50", {"diloco.inner_steps": 50, "diloco.outer.lr": 0.3}).label(base).endswith("mu 0.9 lr 0.3")
    assert schedule_arm("T50", {"lte.merge_every": 50}).mode == "lte"


def test_the_cli_trains_diloco_as_a_baseline():
    import json

    from tests.conftest import ROOT, run_cli

    result = run_cli("simulate", "--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"), "--baseline", "diloco",
                     "--samples", "256", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mode"] == "diloco" and out["samples"] == 256 and 0.0 <= out["accuracy"] <= 1.0
    assert out["weight_digest"] is None  # no LTE W to digest


def test_diloco_over_hivemind_trains_what_the_simulation_trains(tmp_path):
    """Two workers on loopback, each its own process with a DHT and hivemind's averager, fp32 on
    the wire: every round has both, both end on the same global model, and that model is the
    simulation's (its evaluation loss) up to the all-reduce's rounding."""
    import yaml

    from peers.local_swarm import LocalSwarm

    cfg = tiny_config(heads=2, merge_every=2, rounds=2).with_overrides({"diloco.inner_steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    swarm = LocalSwarm(tmp_path, path)

    def worker(i: int, initial: list[str]):
        return swarm.spawn(f"w{i}", ["-m", "peers.diloco_baseline", "--config", str(path), "--index", str(i),
                                     "--peers", "2", "--initial-peers", *initial, "--compression", "fp32",
                                     "--matchmaking-time", "2", "--averaging-timeout", "30",
                                     "--evaluate-every", "1" if i == 0 else "0", "--events", "{events}"])
    try:
        first = worker(0, [])  # the second joins the first's DHT
        started = first.wait_for(lambda es: any(e["event"] == "maddrs" for e in es), 60, "the DHT to start")
        procs = [first, worker(1, next(e for e in started if e["event"] == "maddrs")["maddrs"])]
        for p in procs:
            p.wait_for(lambda es: any(e["event"] == "left" for e in es), 120, "the worker to finish")
            assert p.handle.wait(60) == 0, p.tail()
    finally:
        swarm.close()
    rounds = [p.of("round") for p in procs]
    assert [e["members"] for e in rounds[0]] == [2, 2] == [e["members"] for e in rounds[1]]
    for a, b in zip(*rounds):
        assert abs(a["global_norm"] - b["global_norm"]) < 1e-5 * a["global_norm"]
    assert len({round(e["global_norm"], 3) for e in rounds[0]}) == 2  # the global model moves every round
    expected = simulate(cfg, "diloco").history[-1]
    final = procs[0].of("eval")[-1]
    assert abs(final["loss"] - expected.loss) < 1e-4 and final["accuracy"] == expected.accuracy
