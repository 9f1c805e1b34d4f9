"""Configs are strict: every shipped one loads, bad ones fail with one line naming the field."""

from __future__ import annotations

import pytest
import yaml

from swarm.config import RunConfig, load_config
from swarm.errors import ConfigError
from tests.conftest import CONFIGS, ROOT, assert_one_error_line, run_cli

GOOD = ROOT / "configs" / "digits-vit-tiny.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path):
    from peers.models import create_model

    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # round-trips through JSON (the DHT)
    import timm

    assert timm.is_model(cfg.model.name)
    if cfg.model.image_size <= 64:  # small enough to instantiate here
        create_model(cfg.model)


def test_paper_setting_is_shipped():
    papers = [load_config(p) for p in CONFIGS if "vit-s32" in p.name]
    assert papers, "the paper's ViT-S/32 config is missing"
    lte = papers[0].lte
    assert (lte.heads, lte.rank, lte.merge_every) == (32, 64, 10)


def _write(tmp_path, mutate) -> str:
    raw = yaml.safe_load(GOOD.read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["lte"].update(ranks=8), "lte.ranks: unknown key"),
    (lambda r: r["lte"].update(rank=0), "lte.rank: Input should be greater than 0"),
    (lambda r: r["lte"].update(storage="fp8"), "lte.storage"),
    (lambda r: r["train"].pop("lr"), "train.lr: required key is missing"),
    (lambda r: r["train"].update(batch_size=66), "train.batch_size (66) must be a multiple of lte.heads (4)"),
    (lambda r: r["data"].update(source="hf:"), "malformed data spec"),
    (lambda r: r.update(extra={}), "extra: unknown key"),
    (lambda r: r["train"].update(precision="fp16"), "train.precision: Input should be 'fp32' or 'bf16'"),
    (lambda r: r["train"].update(checkpointing="sometimes"), "train.checkpointing"),
])
def test_bad_configs_name_the_field(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "b.yaml")


def test_precision_and_checkpointing_default_to_fp32_without_checkpointing():
    train = load_config(GOOD).train
    assert (train.precision, train.checkpointing) == ("fp32", False)
    tuned = load_config(GOOD).with_overrides({"train.precision": "bf16", "train.checkpointing": True}).train
    assert (tuned.precision, tuned.checkpointing) == ("bf16", True)


def test_overrides_are_validated():
    cfg = load_config(GOOD)
    assert cfg.with_overrides({"train.samples": 640}).train.samples == 640
    with pytest.raises(ConfigError, match="lte.rank"):
        cfg.with_overrides({"lte.rank": -3})


@pytest.mark.parametrize("args,expected", [
    (["--config", "missing.yaml"], "cannot read config missing.yaml"),
    (["--config", "__BAD__"], "lte.rank: Input should be greater than 0"),
    (["--config", str(GOOD), "--data", "/no/such/dir"], "does not exist"),
    (["--config", str(GOOD), "--data", "hf:"], "malformed data spec"),
    (["--config", str(GOOD), "--data", "__CSV__"], "no label column"),
])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, args, expected):
    args = [_write(tmp_path, lambda r: r["lte"].update(rank=-1)) if a == "__BAD__" else a for a in args]
    csv = tmp_path / "nolabel.csv"
    csv.write_text("a,b\n1,2\n")
    args = [str(csv) if a == "__CSV__" else a for a in args]
    assert_one_error_line(run_cli("simulate", *args, "--samples", "64"), expected)


@pytest.mark.parametrize("command", ["start", "simulate"])
def test_a_bad_config_stops_start_and_simulate_with_one_line(tmp_path, command):
    assert_one_error_line(run_cli(command, "--config", _write(tmp_path, lambda r: r["lte"].update(ranks=8))),
                          "lte.ranks: unknown key")


def test_set_overrides_read_yaml_values_and_reject_malformed_ones():
    from swarm.config import parse_overrides

    got = parse_overrides(["swarm.overlap=true", "lte.rank=8", "swarm.contribution_dtype=int8"])
    assert got == {"swarm.overlap": True, "lte.rank": 8, "swarm.contribution_dtype": "int8"}
    cfg = load_config(ROOT / "configs" / "digits-vit-tiny.yaml").with_overrides(got)
    assert cfg.swarm.overlap and cfg.lte.rank == 8 and cfg.swarm.contribution_dtype == "int8"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["swarm.overlap"])
    with pytest.raises(ConfigError, match="reset_less"):
        load_config(ROOT / "configs" / "digits-vit-tiny.yaml").with_overrides({"swarm.overlap": True, "lte.variant": "reset"})
    with pytest.raises(ConfigError, match="swarm.eager .* needs swarm.overlap"):
        load_config(ROOT / "configs" / "digits-vit-tiny.yaml").with_overrides({"swarm.eager": True})
