"""Tune each arm's learning rates the same way, on data the comparison never tests on: a sweep of
every arm's rates (full-rank: `train.full_lr`; DiLoCo: its workers' `train.full_lr` times its outer
`diloco.outer.lr`, from `--outer-lr`; a single LoRA head and LTE: the factors' `train.lr` times the
replicas' `train.replica_lr`) at the config's sample budget, each run trained without the
`--validation` records carved out of the training data (`data.validation`) and judged by its final
loss on them (mean over `--seeds`). The evaluation set is never looked at. The best rates per arm go
to `--out`, which `scripts/compare.py --rates` reads; LTE with W in float32 takes LTE's. A merge
schedule (`--schedule NAME KEY=VALUE...`, as compare.py takes it) runs at the config's rates and,
with the outer Nesterov step, sweeps its outer rate (`--outer-lr`); a DiLoCo schedule (`diloco.*`
keys: another H) runs at DiLoCo's inner rate and sweeps its outer one (`--outer-lr`).

    python scripts/tune.py --config configs/digits-vit-tiny.yaml --validation 360 --workers 2 --out tuned.json \\
        [--full-lr 1e-3 2e-3 3e-3 5e-3] [--lr 2.5e-4 5e-4 1e-3] [--replica-lr 1.5e-3 3e-3 6e-3] [--seeds 1] \\
        [--schedule T50-nesterov lte.merge_every=50 lte.outer.optimizer=nesterov --outer-lr 0.4 0.7 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import add_common, base_config, schedule_arms  # noqa: E402  (the sibling script's shared options)

from peers.study import ARMS, shown_rates, sweep  # noqa: E402


def table(arm: str, found: dict) -> str:
    lines = [f"{arm}: validation loss (mean over seeds), accuracy"]
    for row in found["sweep"]:
        shown = shown_rates(row["rates"])
        mark = "  <- best" if row["rates"] == found["best"] else ""
        lines.append(f"  {shown:40s} {row['loss']:8.4f} {100 * row['accuracy']:7.2f} %{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    parser.set_defaults(seeds=1, arms=["full", "lora", "lte"])
    parser.add_argument("--validation", type=int, default=360, help="training records carved out to tune on")
    parser.add_argument("--full-lr", type=float, nargs="+", default=[1e-3, 2e-3, 3e-3, 5e-3])
    parser.add_argument("--lr", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3], help="the LoRA factors' rates")
    parser.add_argument("--replica-lr", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3], help="the replicas' rates")
    parser.add_argument("--outer-lr", type=float, nargs="+", default=[0.4, 0.7, 1.0],
                        help="outer rates of the merge schedules with the outer Nesterov step")
    parser.add_argument("--out", type=Path, help="write the sweep and each arm's best rates here (JSON)")
    args = parser.parse_args(argv)
    if args.validation < 1:
        parser.error("--validation: carve out at least one record")
    base = base_config(args, parser)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    grids = {"train.full_lr": args.full_lr, "train.lr": args.lr, "train.replica_lr": args.replica_lr,
             "lte.outer.lr": args.outer_lr, "diloco.outer.lr": args.outer_lr}
    arms = [ARMS[a] for a in args.arms if a != "lte-fp32"]  # it runs at LTE's rates
    arms += [arm for arm in schedule_arms(args, base, parser) if arm.rates]  # the others have nothing to tune
    found = sweep(base, arms, grids, args.seeds, args.validation, args.workers, log)
    if "lte" in found and "lte-fp32" in args.arms:
        found["lte-fp32"] = {"best": found["lte"]["best"], "sweep": [], "from": "lte"}
    log("")
    for arm, result in found.items():
        if result["sweep"]:
            log(table(arm, result))
    out = {"config": args.config, "data": base.data.source, "samples": base.train.samples, "validation": args.validation,
           "seeds": args.seeds, "arms": found}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
        log(f"wrote {args.out}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
