"""`lte-swarm demo`: a whole run on this machine (coordinator and K peers on loopback, the embedded
digits), watched live, then compared round by round with the one-process simulation of the same run
(bit for bit: the W digest of every round) and with full-rank training on the same samples."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from peers.local_swarm import LocalSwarm, LocalSwarmError, peer_threads
from peers.shipped import shipped_config
from peers.study import Run, run_all
from swarm.config import RunConfig, load_config

DEMO_SWARM = dict(lease_seconds=10.0, settle_seconds=0.5, merge_grace=15.0, round_timeout=40.0,
                  request_timeout=10.0, poll_seconds=0.1, checkpoint_every=5)
# A round on loopback costs a few seconds of protocol whatever it carries: rounds of 20 steps of 32
# images per head give digits above 90 % within 20 rounds, about a minute and a half of swarm.
DEMO_MERGE_EVERY, DEMO_HEAD_BATCH = 20, 32


def demo_config(base: RunConfig, peers: int, rounds: int, merge_every: int = DEMO_MERGE_EVERY) -> RunConfig:
    """One head per peer; `rounds` rounds of `merge_every` (20) steps of 32 samples per head, the
    rest (model, rank, learning rates, storage) as the base config says."""
    per_head, t = DEMO_HEAD_BATCH, merge_every
    return base.with_overrides({
        "lte.merge_every": t,
        "lte.heads": peers, "train.batch_size": per_head * peers, "train.samples": per_head * peers * t * rounds,
        "train.eval_every": 1, "train.warmup_steps": min(base.train.warmup_steps, t * rounds // 4),
        "swarm": {**DEMO_SWARM, "min_heads": peers},
    })


def run_demo(workdir: Path, peers: int, rounds: int, config: Path | None = None,
             on_snapshot: Callable[[dict], None] | None = None, interval: float = 2.0) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(load_config(config or shipped_config()), peers, rounds)
    path = workdir / "demo.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    swarm = LocalSwarm(workdir, path)
    dht = None
    start = time.monotonic()
    try:
        coordinator = swarm.start_coordinator(run_dir=workdir / "run")
        procs = [swarm.join(f"peer{i}") for i in range(peers)]
        if on_snapshot is not None:
            from peers.monitor import snapshot
            from peers.node import find_run, install_run_validators, start_dht
            from swarm.identity import Identity

            dht = start_dht(swarm.maddrs, client_mode=True, signer=Identity())
            keys, _, run_cfg = find_run(dht, swarm.run_id)
            install_run_validators(dht, keys.run_id)
        while any(p.handle.poll() is None for p in procs):
            if on_snapshot is not None:
                on_snapshot(snapshot(dht, keys, run_cfg))
            for p in procs:
                if p.handle.poll() not in (None, 0):
                    raise LocalSwarmError(f"{p.name} failed:\n{p.tail()}")
            time.sleep(interval)
        if coordinator.wait(60) != 0:
            raise LocalSwarmError(f"the coordinator failed:\n{coordinator.tail()}")
    finally:
        if dht is not None:
            dht.shutdown()
        swarm.close()
    swarm_seconds = time.monotonic() - start

    rounds_swarm = {e["new_round"]: e for e in coordinator.of("round") if "accuracy" in e}
    digests = {p.of("left")[-1]["digest"] for p in procs if p.of("left")} | {coordinator.of("left")[-1]["digest"]}
    # The replay and full-rank training, side by side on this machine's cores; the replay runs at
    # the peers' thread count (a head's float sums depend on it).
    sim, full = run_all([Run(cfg, "lte", threads=peer_threads()), Run(cfg, "full")], workers=2)
    rows = []
    for point, baseline in zip(sim["history"], full["history"]):
        got = rounds_swarm.get(point["round"], {})
        rows.append({"round": point["round"], "samples": point["samples"],
                     "swarm_accuracy": got.get("accuracy"), "swarm_loss": got.get("loss"),
                     "simulate_accuracy": point["accuracy"], "simulate_loss": point["loss"],
                     "full_accuracy": baseline["accuracy"], "full_loss": baseline["loss"],
                     "identical": got.get("digest") == point["digest"]})
    plot = workdir / "run" / "curves.png"
    write_plot(rows, plot)
    final = rows[-1]
    summary = {"peers": peers, "rounds": rounds, "run_dir": str(workdir / "run"), "run_id": swarm.run_id,
               "accuracy": final["swarm_accuracy"], "simulate_accuracy": final["simulate_accuracy"],
               "full_accuracy": final["full_accuracy"], "loss": final["swarm_loss"], "samples": final["samples"],
               "seconds": swarm_seconds, "total_seconds": time.monotonic() - start, "peers_agree": len(digests) == 1,
               "bit_identical": all(r["identical"] for r in rows), "plot": str(plot), "history": rows}
    (workdir / "run" / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["round"] for r in rows]
    for key, label, style in (("swarm", "swarm (LTE)", "-o"), ("simulate", "one-process simulation (LTE)", "--"),
                              ("full", "full-rank training", ":")):
        ax_loss.plot(x, [r[f"{key}_loss"] for r in rows], style, label=label)
        ax_acc.plot(x, [r[f"{key}_accuracy"] for r in rows], style, label=label)
    ax_loss.set(xlabel="merge round (same samples in every run)", ylabel="test loss", title="loss")
    ax_acc.set(xlabel="merge round", ylabel="test accuracy", title="accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
