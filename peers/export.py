"""The trained model out of the swarm: the merged W plus the shared parameters as a plain timm
state dict, from a run dir's checkpoint or downloaded from a live swarm."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from peers.checkpoint import load_checkpoint
from swarm.config import RunConfig
from swarm.errors import ConfigError
from swarm.lte_model import LTEModel


def load_run_dir(run_dir: Path) -> tuple[RunConfig, LTEModel, int]:
    """The checkpointed run in `run_dir`: config, model and round."""
    saved = load_checkpoint(Path(run_dir))
    if saved is None:
        raise ConfigError(f"{run_dir} is not a readable run dir: it holds no checkpoint")
    return saved.config, saved.model, saved.round


def write_export(cfg: RunConfig, model: LTEModel, out: Path, weights: str, round_: int) -> dict:
    """Write `out` (safetensors, plain timm keys) and return what loads it."""
    state = {k: v.contiguous() for k, v in model.merged_state_dict(weights).items()}
    info = {"model": cfg.model.name, "args": cfg.model.args, "round": round_, "weights": weights,
            "digest": model.state_digest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={k: json.dumps(v) for k, v in info.items()})
    return info


def fetch_live(rt, run_id: str | None, invite=None) -> tuple[RunConfig, LTEModel, int]:
    """Download the current W of a live run from one of its donors (of a closed run, as the
    member `invite` admits: donors serve members only)."""
    from peers.models import create_lte_model
    from peers.node import SwarmError, find_run, join_rounds

    keys, _, cfg = find_run(rt.dht, run_id, clock=rt.clock)
    model = create_lte_model(cfg, [])
    server, _, protocol, membership = join_rounds(rt, keys, cfg, model, holds_heads=False, invite=invite)
    try:
        membership.check_member(rt.identity)
        membership.publish(rt.identity)  # where the donors reach us
        deadline = rt.clock.monotonic() + 30.0
        while not protocol.sync():  # donors move on every round: try again until one hands it out
            if rt.clock.monotonic() > deadline:
                raise SwarmError(f"no peer of run {keys.run_id} handed out its W within 30s")
            rt.clock.sleep(0.5)
        return cfg, model, protocol.round
    finally:
        server.shutdown()
