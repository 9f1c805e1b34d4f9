"""How far an honest redo of a head's round lands from the holder's own, against how far a cheat's
contribution lands: the figures a verifier's tolerance is chosen from (`peers/verify.py`).

One head trains `--rounds` rounds of the run's T steps (2 threads, the config's precision), its
own change merged into W after each. At each round's start its state is taken (`RoundStart`, the
bytes a holder would serve a verifier) and the round is trained again from it:

- honest redos: the same settings again; 1 thread instead of 2; and, for comparison, the other
  precision (bf16 autocast for an fp32 run, fp32 for a bf16 one), which a verifier does not use;
- cheats, each in place of the holder's change: turned around, scaled 2x and 0.5x, zeros, noise of
  the same size per tensor, another head's change of the same round (copied), the same start
  trained on another head's batches (other data), half the steps.

Each figure is `mismatch`: the largest over the change's tensors of the L2 distance to the honest
redo, relative to its size (0: the same bits; 1: zeros; 2: turned around).

    python scripts/bench_reproduce.py [--config configs/digits-vit-tiny.yaml] [--rounds 3] [--head 1]
        [--set train.precision=bf16 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peers import verify  # noqa: E402
from peers.data import DataSource, ImageShape  # noqa: E402
from peers.models import create_lte_model  # noqa: E402
from peers.training import HeadTrainer, stack_batches, torch_threads  # noqa: E402
from swarm.config import RunConfig, load_config, parse_overrides  # noqa: E402
from swarm.errors import ConfigError  # noqa: E402

HONEST = ("same settings", "1 thread, not 2")
OTHER = ("the other precision",)  # what a verifier must not do: redo a round in another precision
CHEATS = ("turned around", "scaled 2x", "scaled 0.5x", "zeros", "noise of its size", "another head's change",
          "other data", "half the steps")


def _with_precision(cfg: RunConfig, precision: str) -> RunConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})


def _noise_like(change: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in change.items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
        out[name] = noise * (t.double().norm() / noise.norm().clamp_min(1e-30))
    return out


def measure(cfg: RunConfig, rounds: int, head: int, holder_threads: int = 2) -> list[dict[str, float]]:
    """Per round, the mismatch of every honest redo and every cheat (see the module's docstring)."""
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    other = (head + 1) % cfg.lte.heads
    holder, neighbour = create_lte_model(cfg, [head]), create_lte_model(cfg, [other])
    trainer, neighbour_trainer = HeadTrainer(holder, cfg.train, cfg.steps), HeadTrainer(neighbour, cfg.train, cfg.steps)
    stream = source.batches(head, cfg.lte.heads, cfg.head_batch)
    neighbour_stream = source.batches(other, cfg.lte.heads, cfg.head_batch)
    steps, out = cfg.lte.merge_every, []
    for r in range(rounds):
        step, cursor = r * steps, r * steps
        start = verify.RoundStart.decode(verify.snapshot(holder, trainer.optimizer, head, step, cursor, steps).encode())
        w = create_lte_model(cfg, [])
        w.load_shared_state(holder.shared_state())
        neighbour.load_shared_state(holder.shared_state())
        with torch_threads(holder_threads):
            for t in range(steps):
                for model_trainer, s in ((trainer, stream), (neighbour_trainer, neighbour_stream)):
                    x, y = stack_batches([s], "cpu")
                    model_trainer.step(x, y, step + t)
        own, copied = verify.change(holder), verify.change(neighbour)
        began = time.perf_counter()
        with torch_threads(holder_threads):
            redo = verify.reproduce(cfg, w, start, source)
        seconds = time.perf_counter() - began
        with torch_threads(1):
            one_thread = verify.reproduce(cfg, w, start, source)
        with torch_threads(holder_threads):
            flipped = _with_precision(cfg, "fp32" if cfg.train.precision == "bf16" else "bf16")
            other_precision = verify.reproduce(flipped, w, start, source)
            shifted = source.batches(other, cfg.lte.heads, cfg.head_batch)
            other_data = verify.train_round(cfg, w, start, islice(shifted, cursor, None), steps)
            halved = source.batches(head, cfg.lte.heads, cfg.head_batch)
            half = verify.train_round(cfg, w, start, islice(halved, cursor, None), steps // 2)
        submitted = {
            "same settings": own, "1 thread, not 2": one_thread, "the other precision": other_precision,
            "turned around": {k: -v for k, v in own.items()}, "scaled 2x": {k: 2 * v for k, v in own.items()},
            "scaled 0.5x": {k: 0.5 * v for k, v in own.items()}, "zeros": {k: torch.zeros_like(v) for k, v in own.items()},
            "noise of its size": _noise_like(own, r), "another head's change": copied, "other data": other_data,
            "half the steps": half}
        row = {name: verify.mismatch(redo, change) for name, change in submitted.items()}
        row.update(round=r, redo_seconds=seconds, start_bytes=len(start.encode()))
        out.append(row)
        holder.merge([head])
        neighbour.merge([other])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "digits-vit-tiny.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--head", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config).with_overrides(parse_overrides(args.overrides))
    except ConfigError as exc:
        parser.error(str(exc))
    rows = measure(cfg, args.rounds, args.head % cfg.lte.heads)
    honest = max(row[name] for row in rows for name in HONEST)
    cheat = min(row[name] for row in rows for name in CHEATS)
    summary = {"config": str(args.config), "rounds": rows, "largest_honest": honest, "smallest_cheat": cheat,
               "tolerance": verify.TOLERANCE}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.config.name}: head {args.head}, T = {cfg.lte.merge_every}, {cfg.head_batch} images a step, "
          f"{cfg.train.precision}")
    print(f"{'mismatch against an honest redo':<34}" + "".join(f"{'round ' + str(r['round']):>12}" for r in rows))
    for name in (*HONEST, *OTHER, *CHEATS):
        print(f"{name:<34}" + "".join(f"{r[name]:>12.3g}" for r in rows))
    print(f"{'redo (s) / start (KB)':<34}" + "".join(f"{r['redo_seconds']:>6.2f}/{r['start_bytes'] / 1e3:<5.0f}" for r in rows))
    print(f"largest honest {honest:.3g}, smallest cheat {cheat:.3g}, tolerance {verify.TOLERANCE:g}")


if __name__ == "__main__":
    main()
