"""The trained model out of the swarm: the merged W plus the shared parameters as a plain timm
state dict, from a run dir's checkpoint or downloaded from a live swarm."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from peers.models import create_lte_model
from swarm.config import RunConfig, parse_config
from swarm.errors import ConfigError
from swarm.lte_model import LTEModel


def load_run_dir(run_dir: Path) -> tuple[RunConfig, LTEModel, dict]:
    meta_path = run_dir / "run.json"
    try:
        meta = json.loads(meta_path.read_text())
        cfg = parse_config(meta["config"], origin=str(meta_path))
        model = create_lte_model(cfg, [])
        model.load_shared_state(load_file(str(run_dir / "state.safetensors")))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{run_dir} is not a readable run dir: {exc}") from None
    if model.state_digest() != meta.get("digest"):
        raise ConfigError(f"{run_dir}/state.safetensors does not match its digest in run.json")
    return cfg, model, meta


def write_export(cfg: RunConfig, model: LTEModel, out: Path, weights: str, round_: int) -> dict:
    """Write `out` (safetensors, plain timm keys) and return what loads it."""
    state = {k: v.contiguous() for k, v in model.merged_state_dict(weights).items()}
    info = {"model": cfg.model.name, "args": cfg.model.args, "round": round_, "weights": weights,
            "digest": model.state_digest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={k: json.dumps(v) for k, v in info.items()})
    return info


def fetch_live(dht, run_id: str | None) -> tuple[RunConfig, LTEModel, int]:
    """Download the current W of a live run from one of its donors."""
    from peers.node import SwarmError, find_run
    from swarm.rounds import MergeProtocol
    from swarm.transport import BlobServer

    keys, _, cfg = find_run(dht, run_id)
    model = create_lte_model(cfg, [])
    server = BlobServer(dht, namespace=keys.run_id)
    try:
        protocol = MergeProtocol(dht, server, keys, str(dht.peer_id), cfg.swarm, model, active_peers=set)
        if not protocol.sync():
            raise SwarmError(f"no peer of run {keys.run_id} handed out its W")
        return cfg, model, protocol.round
    finally:
        server.shutdown()
