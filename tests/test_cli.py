"""The command line: every command is there with its options, `start` and `demo` default to the
config shipped inside the package (found from any directory, in a wheel too), and the installed
entry point and scripts/start_run.py run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import zipfile

import pytest

from peers.shipped import DEFAULT_CONFIG, shipped_config, shipped_names
from swarm.config import load_config
from swarm.errors import ConfigError
from tests.conftest import CONFIGS, ROOT, assert_one_error_line, run_cli

COMMANDS = ("simulate", "start", "join", "status", "demo", "export")
START_OPTIONS = ("--config", "--run-dir", "--host-maddrs", "--initial-peers", "--identity", "--run-id", "--events",
                 "--verbose")


def test_installed_entry_point_runs_from_any_directory(tmp_path):
    """The one check through a real process: the `lte-swarm` script pip installed next to this
    interpreter (or `python -m peers.cli` where there is none)."""
    script = shutil.which("lte-swarm", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "peers.cli"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout for name in COMMANDS), proc.stdout


def test_start_help_lists_its_options():
    result = run_cli("start", "--help")
    assert result.exit_code == 0, result.output
    assert all(option in result.stdout for option in START_OPTIONS), result.stdout


def test_start_run_script_is_start(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "start_run.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lte-swarm start" in proc.stdout
    assert all(option in proc.stdout for option in START_OPTIONS), proc.stdout


@pytest.mark.parametrize("args,expected", [
    (["start", "--bogus"], "No such option: --bogus"),
    (["join"], "Missing option '--initial-peers'"),
    (["demo", "--peers", "0"], "Invalid value for '--peers'"),
])
def test_argument_errors_exit_2(args, expected):
    result = run_cli(*args)
    assert result.exit_code == 2 and expected in result.stderr, (result.exit_code, result.stderr)


def test_export_needs_exactly_one_source(tmp_path):
    assert_one_error_line(run_cli("export", "--out", tmp_path / "m.safetensors"), "give either --run-dir or --initial-peers")
    assert_one_error_line(run_cli("export", "--run-dir", tmp_path, "--out", tmp_path / "m.safetensors",
                                  "--weights", "fp8"), "--weights must be forward or master")


def test_the_shipped_default_config_is_the_checkouts_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shipped_config()
    assert path.is_absolute() and path.name == f"{DEFAULT_CONFIG}.yaml"
    assert path.read_bytes() == (ROOT / "configs" / "digits-vit-tiny.yaml").read_bytes()
    assert load_config(path) == load_config(ROOT / "configs" / "digits-vit-tiny.yaml")
    assert shipped_names() == sorted(p.stem for p in CONFIGS)
    with pytest.raises(ConfigError, match=r"no shipped config named 'nope' \(shipped: digits-vit-tiny, "):
        shipped_config("nope")


def _fake_module(monkeypatch, name: str, **attrs) -> None:
    """Stand in for a heavy module (hivemind, torch) whose real behaviour other tests cover."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


def test_start_without_a_config_coordinates_the_shipped_one(tmp_path, monkeypatch):
    calls = []

    def serve(cfg, run_dir, *, announce, **kwargs):
        calls.append((cfg, run_dir, kwargs))
        announce("run-x", ["/ip4/127.0.0.1/tcp/1/p2p/Qm"], 0, False)

    _fake_module(monkeypatch, "peers.coordinator", serve=serve)
    monkeypatch.chdir(tmp_path)
    result = run_cli("start", "--events", "e.jsonl")
    assert result.exit_code == 0, (result.stderr, result.exception)
    [(cfg, run_dir, kwargs)] = calls
    assert cfg == load_config(ROOT / "configs" / "digits-vit-tiny.yaml")
    assert str(run_dir) == "runs/digits-vit-tiny" and kwargs["config_name"] == "digits-vit-tiny"
    assert kwargs["events_path"] == "e.jsonl" and kwargs["host_maddrs"] == ["/ip4/127.0.0.1/tcp/0"]
    assert "lte-swarm join --run-id run-x --initial-peers /ip4/127.0.0.1/tcp/1/p2p/Qm" in result.stdout


def test_demo_without_a_config_runs_the_shipped_one(tmp_path, monkeypatch):
    calls = []

    def run_demo(workdir, peers, rounds, config, on_snapshot=None):
        calls.append((workdir, peers, rounds, config))
        return {"history": []}

    _fake_module(monkeypatch, "peers.demo", run_demo=run_demo)
    result = run_cli("demo", "--peers", "3", "--rounds", "2", "--json", "--run-dir", tmp_path / "d")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert calls == [(tmp_path / "d", 3, 2, shipped_config())]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None,
                    reason="building a wheel needs pip and setuptools in this environment")
def test_the_wheel_ships_every_config(tmp_path):
    """`pip install .` installs a wheel, not the checkout: the configs must be inside it."""
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for name in ("configs", "peers", "swarm"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("lte_swarm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for config in CONFIGS:
            assert z.read(f"peers/configs/{config.name}") == config.read_bytes()
        assert "peers/shipped.py" in z.namelist() and "peers/cli.py" in z.namelist()


def test_joining_an_unreachable_swarm_is_one_line_and_nonzero():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRzhwoMVtyVwTj6gRYNKTqUryrE8Ru1rgsyZNUZfzi78w"
    result = run_cli("join", "--initial-peers", dead)
    assert_one_error_line(result, "initial peers")
