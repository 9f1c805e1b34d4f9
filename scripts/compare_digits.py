"""Measure LTE against its baselines on one config: full-rank and single LoRA at the config's
sample budget, LTE at 1x and 1.5x of it. Prints one table; with --seeds, the mean over seeds.

    python scripts/compare_digits.py --config configs/digits-vit-tiny.yaml [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics

from peers.simulate import simulate
from swarm.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-vit-tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5], help="LTE sample budgets, x full-rank's")
    args = parser.parse_args()
    base = load_config(args.config)
    runs = [("full-rank", "full", 1.0), (f"single LoRA r={base.lte.rank}", "lora", 1.0)]
    runs += [(f"LTE N={base.lte.heads} r={base.lte.rank} T={base.lte.merge_every}", "lte", f) for f in args.factors]
    rows = []
    for label, mode, factor in runs:
        accs, losses, secs = [], [], []
        for seed in args.seeds:
            cfg = base.with_overrides({"train.samples": int(base.train.samples * factor), "train.seed": seed})
            result = simulate(cfg, mode)
            accs.append(result.accuracy), losses.append(result.loss), secs.append(result.seconds)
            print(f"  {label:28s} x{factor:<4} seed {seed}: acc {result.accuracy:.4f} loss {result.loss:.3f} "
                  f"({result.seconds:.0f}s)", flush=True)
        rows.append((label, int(base.train.samples * factor), factor, statistics.mean(accs), statistics.mean(losses), statistics.mean(secs)))
    full_acc = rows[0][3]
    print(f"\n{'run':30s} {'samples':>9s} {'x full':>7s} {'test acc':>9s} {'vs full':>8s} {'test loss':>10s} {'seconds':>8s}")
    for label, samples, factor, acc, loss, sec in rows:
        print(f"{label:30s} {samples:9d} {factor:7.2f} {acc:9.2%} {100 * (acc - full_acc):+7.2f}p {loss:10.3f} {sec:8.0f}")
    print(f"(mean over seeds {args.seeds}; held-out set of {base.data.holdout} records)")


if __name__ == "__main__":
    main()
