"""A run's checkpoint: W, the round, the run's identity and config and its history, in ONE
safetensors file written atomically (temp file, fsync, rename), so a crash at any moment leaves
either the previous checkpoint or the new one, never a mix. Read by the resuming coordinator and
by `export`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peers.models import create_lte_model
from swarm.config import RunConfig, parse_config
from swarm.errors import ConfigError
from swarm.lte_model import LTEModel
from swarm.schemas import RoundSummary

CHECKPOINT_FILE = "checkpoint.safetensors"
_META_KEY = "lte-swarm/run"


@dataclass
class Checkpoint:
    run_id: str
    round: int
    config: RunConfig
    model: LTEModel
    history: list[RoundSummary] = field(default_factory=list)


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(run_dir: Path, run_id: str, round_: int, cfg: RunConfig, model: LTEModel,
                    history: list[RoundSummary]) -> Path:
    path = checkpoint_path(run_dir)
    meta = {"run_id": run_id, "round": round_, "digest": model.state_digest(), "config": cfg.model_dump(mode="json"),
            "history": [h.model_dump(mode="json") for h in history], "saved": time.time()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.shared_state().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def checkpoint_run_id(run_dir: Path) -> str:
    """The run id saved in `run_dir`, without loading W; a `ConfigError` if there is none."""
    path = checkpoint_path(run_dir)
    try:
        with safe_open(str(path), "pt") as f:
            return str(json.loads((f.metadata() or {})[_META_KEY])["run_id"])
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"{run_dir} holds no readable run ({type(exc).__name__}: {exc}); "
                          "pass the run dir of a started run") from None


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run saved in `run_dir`, None if it holds none; a `ConfigError` if it is unreadable or
    its state does not hash to the digest written with it."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}
        cfg = parse_config(meta["config"], origin=str(path))
        model = create_lte_model(cfg, [])
        model.load_shared_state(state)
        history = [RoundSummary.model_validate(h) for h in meta.get("history", [])]
        run_id, round_ = str(meta["run_id"]), int(meta["round"])
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                          "use another --run-dir") from None
    if model.state_digest() != meta.get("digest"):
        raise ConfigError(f"{path} does not match the digest saved with it; the checkpoint is corrupt")
    return Checkpoint(run_id=run_id, round=round_, config=cfg, model=model, history=history)
