"""Measure LTE against its baselines on any data set, over seeds, each arm at learning rates of its
own: full-rank and a single LoRA head at the config's sample budget, LTE (W stored as the config
says, and W in float32: the algorithm's cost apart from quantization's) at each budget (multiples
of it). Every run is the one-process simulation (`peers/simulate.py`), evaluated on the config's
evaluation set; seed k sets both the model seed (W0 and every head's A) and the training seed (data
order). `--rates` takes each arm's rates from a sweep (`scripts/tune.py --out`); without it every
arm runs at the config's. `--arms diloco` adds DiLoCo (`peers/diloco.py`: N full-rank workers on
the heads' shards, synced every H steps by DiLoCo's outer Nesterov step, `diloco` in the config).
`--schedule NAME KEY=VALUE...` adds an LTE arm with another merge schedule (T, the outer step, W's
storage, ...) at LTE's rates, or, with `diloco.*` keys, a DiLoCo arm (another H) at DiLoCo's.
Prints a table of test accuracy, mean ± sd over seeds; `--json` prints the same as one JSON object
(with the accuracy curves); `--plot` draws accuracy against samples.

    python scripts/compare.py --config configs/digits-vit-tiny.yaml --seeds 5 --budgets 1.0 1.2 1.5 \\
        [--rates tuned.json] [--arms full lora lte lte-fp32 diloco] [--workers 2] [--data SPEC] [--samples N] \\
        [--set lte.rank=8 ...] [--schedule T50-nesterov lte.merge_every=50 lte.outer.optimizer=nesterov ...] \\
        [--json] [--plot compare.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peers.study import ARMS, Arm, compare, schedule_arm, shown_rates
from swarm.config import RunConfig, load_config, parse_overrides
from swarm.errors import ConfigError


def table(rows: list[dict], seeds: int, eval_size: int) -> str:
    full = next((r["accuracy"]["mean"] for r in rows if r["mode"] == "full"), None)
    width = max([44] + [len(r["label"]) for r in rows])
    lines = [f"{'run':{width}s} {'samples':>9s} {'test acc (mean ± sd)':>21s} {'vs full':>8s} {'test loss':>10s} "
             f"{'s/run':>6s}  rates"]
    for r in rows:
        acc = r["accuracy"]
        gap = f"{100 * (acc['mean'] - full):+7.2f}p" if full is not None else f"{'':8s}"
        rates = shown_rates(r["rates"])
        lines.append(f"{r['label']:{width}s} {r['samples']:9d} {100 * acc['mean']:12.2f} ± {100 * acc['sd']:5.2f} % "
                     f"{gap} {r['loss']['mean']:10.3f} {r['seconds']:6.0f}  {rates}")
    lines.append(f"({seeds} seeds; evaluation set of {eval_size} records)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        xs = [p["samples"] for p in r["curve"]]
        ys = [100 * p["accuracy"] for p in r["curve"]]
        sd = [100 * p["sd"] for p in r["curve"]]
        line, = ax.plot(xs, ys, label=r["label"], linestyle="--" if r["mode"] != "lte" else "-")
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training samples (all heads)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_rates(path: Path) -> dict[str, dict[str, float]]:
    """Each arm's best rates from a sweep's JSON (`scripts/tune.py --out`)."""
    try:
        tuned = json.loads(path.read_text())
        return {arm: dict(found["best"]) for arm, found in tuned["arms"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--rates {path}: not a sweep written by scripts/tune.py --out ({exc})") from None


def base_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The config with the common overrides of both experiment scripts (--set, --data, --samples)."""
    try:
        overrides = parse_overrides(args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.data:
        overrides["data.source"] = args.data
    if args.eval_data:
        overrides["data.eval_source"] = args.eval_data
    if args.samples:
        overrides["train.samples"] = args.samples
    return load_config(args.config).with_overrides(overrides)


def schedule_arms(args: argparse.Namespace, base: RunConfig, parser: argparse.ArgumentParser) -> list[Arm]:
    """The `--schedule NAME KEY=VALUE...` arms, each checked against the config before any run."""
    arms = []
    for name, *changes in args.schedule:
        try:
            arm = schedule_arm(name, parse_overrides(changes))
            base.with_overrides(arm.overrides)
        except ConfigError as exc:
            parser.error(f"--schedule {name}: {exc}")
        arms.append(arm)
    return arms


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/digits-vit-tiny.yaml")
    parser.add_argument("--data", help="override data.source (digits, hf:NAME[:CONFIG][@SPLIT] or a local data set)")
    parser.add_argument("--eval-data", help="override data.eval_source (e.g. @validation)")
    parser.add_argument("--samples", type=int, help="override train.samples, the 1x budget")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. K-1)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["full", "lora", "lte", "lte-fp32"],
                        help="what to run (diloco: on request)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, one process and one torch thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. lte.rank=8 or model.args.embed_dim=32 (YAML value)")
    parser.add_argument("--schedule", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="one more LTE arm, at LTE's rates, with these config changes (its merge schedule)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.5], help="LTE sample budgets, x full-rank's")
    parser.add_argument("--rates", type=Path, help="each arm's learning rates from this sweep (scripts/tune.py --out)")
    parser.add_argument("--plot", type=Path, help="write accuracy against samples to this PNG")
    args = parser.parse_args(argv)

    try:
        base = base_config(args, parser)
        rates = read_rates(args.rates) if args.rates else {}
        arms = [ARMS[a] for a in args.arms] + schedule_arms(args, base, parser)
    except ConfigError as exc:
        parser.error(str(exc))
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    rows = compare(base, arms, args.seeds, args.budgets, rates, args.workers, log)
    log("\n" + table(rows, args.seeds, base.data.holdout))
    if args.plot:
        plot(rows, args.plot, f"{base.model.name} on {base.data.source}, {args.seeds} seeds")
        log(f"plot: {args.plot}")
    if args.json:
        print(json.dumps({"config": args.config, "data": base.data.source, "eval": base.data.eval_spec,
                          "seeds": args.seeds, "runs": rows}))


if __name__ == "__main__":
    main()
