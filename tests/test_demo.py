"""`lte-swarm demo` end to end (a real local swarm), its plot, and `export` into a plain timm model."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.conftest import CLI, assert_one_error_line, run_cli
from tests.harness import wait_role_gone

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("demo")]


def _evaluate_export(path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from peers.data import DataSource, ImageShape
    from peers.simulate import evaluate
    from swarm.config import DataConfig

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    model = timm.create_model(meta["model"], pretrained=False, **meta["args"])
    model.load_state_dict(load_file(str(path)))  # strict: every key of the plain model is there
    model.eval()
    args = meta["args"]
    x, y = DataSource(DataConfig(source="digits"), ImageShape(args["img_size"], args["in_chans"])).eval_set()
    return evaluate(model, x, y, torch.device("cpu"))[0], meta


def test_demo_runs_writes_its_plot_and_exports_a_timm_model(tmp_path):
    # run outside the checkout: the demo needs only the installed package
    proc = subprocess.run([*CLI, "demo", "--peers", "2", "--rounds", "1", "--json", "--run-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["peers_agree"] is True
    assert [r["round"] for r in summary["history"]] == [1]
    # the swarm's W and replicas are the one-process simulation's, bit for bit, after every round,
    # so the two evaluate alike; full-rank training on the same samples is beside them
    assert summary["bit_identical"] is True and all(r["identical"] for r in summary["history"])
    assert all(r["swarm_loss"] == r["simulate_loss"] for r in summary["history"])
    assert all(0.0 <= r["full_accuracy"] <= 1.0 for r in summary["history"])
    assert summary["samples"] == 1 * 20 * 2 * 32  # rounds x T x peers x per-head batch
    plot = tmp_path / "demo" / "run" / "curves.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    out = tmp_path / "model.safetensors"
    result = run_cli("export", "--run-dir", summary["run_dir"], "--out", out)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert "timm.create_model" in result.stderr
    accuracy, meta = _evaluate_export(out)
    assert meta["round"] == 1
    # the plain timm model scores what the swarm reported (its attention kernel may flip one tie)
    assert abs(accuracy - summary["accuracy"]) <= 1 / 360 + 1e-9, (accuracy, summary["accuracy"])


def test_export_refuses_a_missing_run_dir(tmp_path):
    assert_one_error_line(run_cli("export", "--run-dir", tmp_path / "nothing", "--out", tmp_path / "m.st"),
                          "not a readable run dir")


def test_ctrl_c_stops_the_demo_and_every_process_it_started(tmp_path):
    import signal
    import time

    workdir = tmp_path / "demo"
    # Ctrl+C reaches it as in a terminal even when the suite itself runs as a background job
    # (which starts its children with SIGINT ignored)
    proc = subprocess.Popen([*CLI, "demo", "--peers", "1", "--rounds", "50", "--json", "--run-dir", str(workdir)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            log = workdir / "peer0.jsonl"
            if log.exists() and "\"event\": \"joined\"" in log.read_text():  # both are up
                break
            time.sleep(0.5)
        else:
            pytest.fail("the demo's peer never joined")
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate(timeout=30)
            pytest.fail(f"the demo did not stop within 30 s of Ctrl+C; its stderr:\n{stderr[-3000:]}")
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stopped_in < 15, f"the demo took {stopped_in:.1f}s to stop"
    assert "Traceback" not in stderr
    starts = [[json.loads(l) for l in (workdir / f"{f}.jsonl").read_text().splitlines() if '"pid"' in l]
              for f in ("coordinator", "peer0")]
    assert all(starts), starts
    for events in starts:  # each role: the peer process, its DHT process and p2pd
        assert wait_role_gone(events) == [], f"processes of {events[0]} still run"
