"""`scripts/tune.py` and `scripts/compare.py` end to end in a tiny form (in this process: the imports
are most of a small run's time): the sweep judges every arm's rates on the validation split alone,
picks the lowest validation loss, and the comparison runs each arm at its own best rates, over the
seeds asked for, reported as a table, a JSON object and a plot."""

from __future__ import annotations

import json

import pytest

from peers.data import DataSource
from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.timeout(240)

SCHEDULE = ["--schedule", "T4-nesterov", "lte.merge_every=4", "lte.outer.optimizer=nesterov"]
TINY = ["model.args.embed_dim=16", "model.args.depth=1", "model.args.num_heads=2", "lte.merge_every=2",
        "lte.rank=4", "train.warmup_steps=1"]


def _argv(*extra: str) -> list[str]:
    argv = ["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"), "--data", "digits", "--samples", "128",
            "--json", *extra]
    for item in TINY:
        argv += ["--set", item]
    return argv


def test_the_sweep_never_looks_at_the_test_set_and_each_arm_compares_at_its_best_rates(tmp_path, capsys,
                                                                                        monkeypatch):
    tested = []
    monkeypatch.setattr(DataSource, "eval_set", lambda self: tested.append(self) or pytest.fail("read the test set"))
    tuned = tmp_path / "tuned.json"
    load_script("tune").main(_argv("--validation", "100", "--full-lr", "1e-3", "3e-2", "--lr", "1e-4", "3e-3",
                                   "--replica-lr", "3e-3", "--arms", "full", "lte", "lte-fp32", "--out", str(tuned),
                                   *SCHEDULE, "--outer-lr", "0.5", "1.5", "--schedule", "T8", "lte.merge_every=8"))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not tested and json.loads(tuned.read_text()) == out
    assert "T8" not in out["arms"]  # plain averaging at LTE's rates: nothing to tune
    assert [r["rates"] for r in out["arms"]["T4-nesterov"]["sweep"]] == [{"lte.outer.lr": 0.5}, {"lte.outer.lr": 1.5}]
    for arm in ("full", "lte", "T4-nesterov"):
        sweep = out["arms"][arm]["sweep"]
        assert len(sweep) == 2 and all(len(r["losses"]) == 1 for r in sweep)
        assert out["arms"][arm]["best"] == min(sweep, key=lambda r: r["loss"])["rates"]
    assert out["arms"]["lte"]["sweep"][0]["rates"] == {"train.lr": 1e-4, "train.replica_lr": 3e-3}
    assert out["arms"]["lte-fp32"]["best"] == out["arms"]["lte"]["best"]
    monkeypatch.undo()

    png = tmp_path / "curves.png"
    load_script("compare").main(_argv("--seeds", "2", "--budgets", "1.0", "2.0", "--rates", str(tuned),
                                      "--plot", str(png), *SCHEDULE))
    captured = capsys.readouterr()
    runs = json.loads(captured.out.strip().splitlines()[-1])["runs"]
    assert [(r["arm"], r["budget"], r["samples"]) for r in runs] == [
        ("full", 1.0, 128), ("lora", 1.0, 128), ("lte", 1.0, 128), ("lte", 2.0, 256),
        ("lte-fp32", 1.0, 128), ("lte-fp32", 2.0, 256), ("T4-nesterov", 1.0, 128), ("T4-nesterov", 2.0, 256)]
    for r in runs:
        # lora: not swept, the config's; a merge schedule: LTE's and its own outer rate
        inherited = out["arms"]["lte"]["best"] if r["arm"] == "T4-nesterov" else {}
        assert r["rates"] == {**inherited, **out["arms"].get(r["arm"], {}).get("best", {})}
        values = r["accuracy"]["values"]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
        assert r["accuracy"]["mean"] == pytest.approx(sum(values) / 2)
        assert r["curve"] and r["curve"][-1]["samples"] == r["samples"]
        assert r["curve"][-1]["accuracy"] == pytest.approx(r["accuracy"]["mean"])
    # seed k changes W0, every A and the data order: the two seeds do not give the same model
    assert len({tuple(r["loss"]["values"]) for r in runs if len(set(r["loss"]["values"])) == 2}) == len(runs)
    # nf4 and float32 W give different models from the same seeds
    assert runs[2]["loss"]["values"] != runs[4]["loss"]["values"]
    # another merge schedule at the same rates gives another model, labelled as what it ran
    assert runs[6]["loss"]["values"] != runs[2]["loss"]["values"]
    assert runs[6]["label"].startswith("T4-nesterov: LTE N=4 r=4 T=4 outer nesterov")
    assert set(runs[6]["rates"]) == {"train.lr", "train.replica_lr", "lte.outer.lr"}
    assert "test acc (mean ± sd)" in captured.err and "W nf4" in captured.err and "W fp32" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diloco_is_tuned_on_both_its_rates_and_its_other_H_runs_at_them(tmp_path, capsys):
    tuned = tmp_path / "tuned.json"
    load_script("tune").main(_argv("--validation", "100", "--full-lr", "1e-3", "3e-2", "--outer-lr", "0.7",
                                   "--arms", "diloco", "--out", str(tuned)))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["rates"] for r in out["arms"]["diloco"]["sweep"]] == [
        {"train.full_lr": 1e-3, "diloco.outer.lr": 0.7}, {"train.full_lr": 3e-2, "diloco.outer.lr": 0.7}]
    load_script("compare").main(_argv("--seeds", "1", "--arms", "diloco", "--rates", str(tuned), "--samples", "512",
                                      "--schedule", "H4", "diloco.inner_steps=4"))
    captured = capsys.readouterr()
    runs = json.loads(captured.out.strip().splitlines()[-1])["runs"]
    assert [(r["arm"], r["mode"]) for r in runs] == [("diloco", "diloco"), ("H4", "diloco")]
    assert runs[0]["rates"] == runs[1]["rates"] == out["arms"]["diloco"]["best"]
    assert runs[0]["loss"]["values"] != runs[1]["loss"]["values"]  # H changes the model
    assert "DiLoCo N=4 H=2 outer nesterov" in captured.err and "H4: DiLoCo N=4 H=4" in captured.err


def test_compare_refuses_a_file_that_is_not_a_sweep(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": []}')
    with pytest.raises(SystemExit):
        load_script("compare").main(_argv("--rates", str(bad)))


@pytest.mark.parametrize("schedule", [["T50", "lte.merge_every=0"], ["x", "lte.outer.optimizer=adam"], ["x", "T=50"]])
def test_compare_refuses_a_schedule_the_config_refuses_before_any_run(schedule, capsys):
    with pytest.raises(SystemExit):
        load_script("compare").main(_argv("--schedule", *schedule))
    assert "error" in capsys.readouterr().err
