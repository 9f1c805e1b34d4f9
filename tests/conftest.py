"""Shared helpers: tiny float64 models on which LTE identities can be checked exactly, and the CLI
run in this process."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CLI = [sys.executable, "-m", "peers.cli"]


def run_cli(*args):
    """`lte-swarm ARGS` in this process (typer's CliRunner), with stdout and stderr kept apart:
    a separate process adds nothing to argument, help and error checks but seconds of start-up."""
    from typer.testing import CliRunner

    from peers.cli import app

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps stderr apart
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], prog_name="lte-swarm")


def assert_one_error_line(result, expected: str, code: int = 2) -> None:
    """A user error: exit `code`, exactly one line on stderr, `error: ...` naming `expected`."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # an exit, not a crash
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def suite_threads() -> int:
    """torch's thread count in this process: one, unless OMP_NUM_THREADS is set (learning-outcome
    tests are calibrated under other counts that way). The models here are tiny: they gain nothing
    from a second thread and lose a lot to it on a busy machine (a simulation step waits for a
    descheduled thread: 16x slower measured on 2 shared cores), and pytest-xdist already keeps a
    core busy with each worker process."""
    return int(os.environ.get("OMP_NUM_THREADS") or 1)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(suite_threads())
    yield


@pytest.fixture(scope="module")
def one_thread():
    """The suite's thread count (`suite_threads`), restored afterwards, for modules that change it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(suite_threads())
    yield
    torch.set_num_threads(threads)


def load_script(name: str):
    """`scripts/NAME.py` as a module, to call its functions and `main(argv)` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in it look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).double()


def tiny_vit(seed: int = 0, **overrides) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    args.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


def tiny_mixer(seed: int = 0) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(seed)
    return MlpMixer(num_classes=3, img_size=8, in_chans=1, patch_size=4, num_blocks=2, embed_dim=16)


def randomize_heads(model, seed: int, scale: float = 0.1) -> None:
    """Give every head non-zero B (and perturbed A and replicas), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.fixture
def twin():
    """Two independent deep copies of a module (same initial weights)."""
    return lambda module: (copy.deepcopy(module), copy.deepcopy(module))


# The groups of tests that start real processes take minutes each and run one after another on
# one worker: handed out first (xdist gives out work in collection order), they overlap the many
# short tests instead of leaving one worker alone with a long group at the end.
LONG_FIRST = ("processes", "wan", "demo")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        marker = item.get_closest_marker("xdist_group")
        group = (marker.args[0] if marker.args else marker.kwargs.get("name")) if marker is not None else None
        return LONG_FIRST.index(group) if group in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order within each rank stays the files' own
