"""scripts/wire_estimate.py: a config's bytes per peer and round, from real blobs of its model;
scripts/bench_checks.py: what checking a whole contribution part by part costs."""

from __future__ import annotations

import json

from tests.conftest import ROOT, load_script


def test_estimate_of_the_shipped_digits_config(capsys):
    load_script("wire_estimate").main(["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"),
                                      "--peers", "4", "8", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 6 * 2  # every precision on the wire, each swarm size
    by = {(r["contribution_dtype"], r["reduced_dtype"], r["peers"]): r for r in rows}
    for (c, w, p), r in by.items():
        # the all-gather grows with the swarm, the reduced merge far less
        assert r["gather_received"] == r["contribution_bytes"] * (p - 1)
        assert r["reduce_received"] < r["gather_received"] or p == 4
        # reset-less heads: compact blobs shed the baseline factors, never more than half of them
        assert r["contribution_bytes"] / 2 < r["gather_compact"] / (p - 1) < r["contribution_bytes"]
        assert r["compact_received"] < r["reduce_received"] and r["compact_sent"] < r["reduce_sent"]
    assert by["bf16", "int8", 8]["reduce_received"] < 1.5 * by["bf16", "int8", 4]["reduce_received"]
    assert 0.5 < by["bf16", "int4", 8]["w_bytes"] / by["bf16", "int8", 8]["w_bytes"] < 0.6  # 4.5 bits against 8.125
    assert by["fp32", "fp32", 8]["gather_received"] > 2 * by["fp32", "fp32", 4]["gather_received"]
    assert "compact" in out


def test_fragments_divide_a_rounds_bytes(capsys):
    """W merged in k fragments: a round moves one fragment's parts, about 1/k of the bytes, with
    its reductions spread over the members (no peer owns more than its share)."""
    load_script("wire_estimate").main(["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"),
                                      "--peers", "8", "--fragments", "1", "4", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    by = {(r["contribution_dtype"], r["reduced_dtype"], r["fragments"]): r for r in rows}
    assert len(by) == 6 * 2
    for (c, w, k), r in by.items():
        if k == 4:
            whole = by[c, w, 1]
            for key in ("reduce_sent", "reduce_received", "compact_sent", "compact_received", "gather_received"):
                assert 0.2 < r[key] / whole[key] < 0.3, (c, w, key, r[key] / whole[key])


def test_checks_benchmark_of_the_shipped_digits_config(capsys):
    """scripts/bench_checks.py times both ways of checking a whole contribution part by part on
    real blobs of the config's model, in every precision (figures only: nothing timed is asserted)."""
    load_script("bench_checks").main(["--config", str(ROOT / "configs" / "digits-vit-tiny.yaml"),
                                      "--peers", "4", "--repeat", "1", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["contribution_dtype"] for r in report["rows"]] == ["fp32", "bf16", "int8"]
    sizes = [r["contribution_bytes"] for r in report["rows"]]
    assert sizes[0] > sizes[1] > sizes[2]  # bf16 and 8-bit blobs really are smaller
    for r in report["rows"]:
        assert r["parts"] > 1 and r["parsed_per_part_seconds"] > 0 and r["parsed_once_seconds"] > 0
        assert r["per_round_saved_seconds"] == (r["parsed_per_part_seconds"] - r["parsed_once_seconds"]) * 4
