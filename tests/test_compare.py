"""`scripts/compare.py` end to end in a tiny form (in this process: the imports are most of a small
run's time): every run it plans is simulated, over the seeds asked for, and reported as a table, a
JSON object and a plot."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.timeout(240)


def test_compare_reports_every_run_over_seeds(tmp_path, capsys):
    png = tmp_path / "curves.png"
    tiny = ["model.args.embed_dim=16", "model.args.depth=1", "model.args.num_heads=2", "lte.merge_every=2",
            "lte.rank=4", "train.warmup_steps=1"]
    argv = ["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"), "--data", "digits", "--samples", "128",
            "--seeds", "2", "--budgets", "1.0", "2.0", "--json", "--plot", str(png)]
    for item in tiny:
        argv += ["--set", item]
    load_script("compare").main(argv)
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["seeds"] == 2 and out["data"] == "digits"
    runs = out["runs"]
    assert [(r["mode"], r["budget"], r["samples"]) for r in runs] == [
        ("full", 1.0, 128), ("lora", 1.0, 128), ("lte", 1.0, 128), ("lte", 2.0, 256)]
    for r in runs:
        values = r["accuracy"]["values"]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
        assert r["accuracy"]["mean"] == pytest.approx(sum(values) / 2)
        assert r["curve"] and r["curve"][-1]["samples"] == r["samples"]
        assert r["curve"][-1]["accuracy"] == pytest.approx(r["accuracy"]["mean"])
    # seed k changes W0, every A and the data order: the two seeds do not give the same model
    assert len({tuple(r["loss"]["values"]) for r in runs if len(set(r["loss"]["values"])) == 2}) == len(runs)
    assert "test acc (mean ± sd)" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
