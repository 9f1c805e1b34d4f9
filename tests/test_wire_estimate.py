"""scripts/wire_estimate.py: a config's bytes per peer and round, from real blobs of its model."""

from __future__ import annotations

import json

from tests.conftest import ROOT, load_script


def test_estimate_of_the_shipped_digits_config(capsys):
    load_script("wire_estimate").main(["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"),
                                      "--peers", "4", "8", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 4 * 2  # every precision on the wire, each swarm size
    by = {(r["contribution_dtype"], r["reduced_dtype"], r["peers"]): r for r in rows}
    for (c, w, p), r in by.items():
        # the all-gather grows with the swarm, the reduced merge far less
        assert r["gather_received"] == r["contribution_bytes"] * (p - 1)
        assert r["reduce_received"] < r["gather_received"] or p == 4
        # reset-less heads: compact blobs shed the baseline factors, never more than half of them
        assert r["contribution_bytes"] / 2 < r["gather_compact"] / (p - 1) < r["contribution_bytes"]
        assert r["compact_received"] < r["reduce_received"] and r["compact_sent"] < r["reduce_sent"]
    assert by["bf16", "int8", 8]["reduce_received"] < 1.5 * by["bf16", "int8", 4]["reduce_received"]
    assert by["fp32", "fp32", 8]["gather_received"] > 2 * by["fp32", "fp32", 4]["gather_received"]
    assert "compact" in out
