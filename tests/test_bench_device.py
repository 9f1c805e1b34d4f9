"""`scripts/bench_device.py` in a tiny form: it trains every kind of peer and reports one JSON object.
The script's own process runs in this one (each measurement still runs in a process of its own)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.timeout(300)

TINY = '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10}'


def test_bench_device_reports_speed_and_memory_of_full_rank_diloco_and_lte(monkeypatch, capsys):
    script = ROOT / "scripts" / "bench_device.py"
    monkeypatch.setattr(sys, "argv", [
        str(script), "--model", "vit_tiny_patch16_224", "--model-args", TINY, "--batch", "4", "--heads", "2",
        "--run-heads", "4", "--rank", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json"])
    load_script("bench_device").main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "vit_tiny_patch16_224" and report["batch"] == 4
    for mode in ("full", "diloco", "lte"):
        entry = report[mode]
        assert entry["mode"] == mode and entry["precision"] == "fp32"
        assert entry["samples_per_s"] > 0 and entry["peak_bytes"] > entry["held_bytes"] > 0
        assert entry["last_loss"] > 0
    assert report["results"]["fp32"]["lte"] == report["lte"]
    # an LTE peer trains only its head factors (and replicas), far fewer numbers than the model
    assert report["lte"]["trainable_numbers"] < report["full"]["trainable_numbers"]
    assert report["lte"]["master_bytes"] > 0 and report["full"]["master_bytes"] == 0
    # a DiLoCo worker holds full-rank training's state and, besides, the global model and the outer momentum
    assert report["diloco"]["trainable_numbers"] == report["full"]["trainable_numbers"]
    weights = 4 * report["full"]["trainable_numbers"]
    assert report["diloco"]["held_bytes"] - report["full"]["held_bytes"] >= 2 * weights
