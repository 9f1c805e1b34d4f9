"""Layers point one way: LTE math <- swarm protocol <- peer roles <- CLI."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

MATH = {"swarm/lora.py", "swarm/quant.py", "swarm/lte_model.py"}


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0] if not node.module.startswith(("swarm.", "peers.")) else node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "swarm").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT / "swarm")))
def test_library_never_imports_peer_roles_or_ui(path):
    names = _imports(path)
    assert not any(n == "peers" or n.startswith("peers.") for n in names)
    assert not names & {"typer", "rich", "timm", "datasets"}
    if str(path.relative_to(ROOT)) in MATH:
        assert not names & {"hivemind"}
        assert not any(n.startswith("swarm.") and n not in {"swarm.lora", "swarm.quant", "swarm.lte_model"} for n in names)


@pytest.mark.parametrize("path", sorted((ROOT / "peers").glob("*.py")), ids=lambda p: p.name)
def test_only_the_cli_draws(path):
    names = _imports(path)
    if path.name != "cli.py":
        assert not names & {"typer"}
        assert "peers.cli" not in names
