"""Measure LTE against its baselines on any data set, over seeds: full-rank and a single LoRA head at
the config's sample budget, LTE at each budget (multiples of it). Every run is the one-process
simulation (`peers/simulate.py`), evaluated on the config's evaluation set; seed k sets both the
model seed (W0 and every head's A) and the training seed (data order), so the spread over seeds is
the spread a researcher would see. Prints a table of test accuracy, mean ± sd over seeds; `--json`
prints the same as one JSON object (with the accuracy curves); `--plot` draws accuracy against
training samples.

    python scripts/compare.py --config configs/digits-vit-tiny.yaml --seeds 5 --budgets 1.0 1.2 1.5 \\
        [--data SPEC] [--samples N] [--set lte.rank=8 ...] [--json] [--plot compare.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from peers.simulate import SimResult, simulate
from swarm.config import RunConfig, load_config, parse_overrides
from swarm.errors import ConfigError


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _curve(results: list[SimResult]) -> list[dict]:
    """Accuracy against samples, mean and sd over seeds at each evaluation (same points every seed)."""
    points = []
    for evals in zip(*(r.history for r in results)):
        accs = [p.accuracy for p in evals]
        points.append({"samples": evals[0].samples, "accuracy": statistics.mean(accs),
                       "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return points


def plan(base: RunConfig, budgets: list[float]) -> list[tuple[str, str, float]]:
    """(label, mode, budget) of every run: the baselines at 1x, LTE at each budget."""
    lte = f"LTE N={base.lte.heads} r={base.lte.rank} T={base.lte.merge_every}"
    return [("full-rank", "full", 1.0), (f"single LoRA r={base.lte.rank}", "lora", 1.0)] + \
        [(f"{lte} x{b:g}", "lte", b) for b in budgets]


def compare(base: RunConfig, seeds: int, budgets: list[float], log=print) -> list[dict]:
    rows = []
    for label, mode, budget in plan(base, budgets):
        results = []
        for seed in range(seeds):
            cfg = base.with_overrides({"train.samples": int(base.train.samples * budget),
                                       "train.seed": seed, "model.seed": seed})
            result = simulate(cfg, mode)  # type: ignore[arg-type]
            results.append(result)
            log(f"  {label:32s} seed {seed}: acc {result.accuracy:.4f} loss {result.loss:.3f} ({result.seconds:.0f}s)")
        rows.append({"label": label, "mode": mode, "budget": budget, "samples": results[0].samples,
                     "accuracy": _stats([r.accuracy for r in results]), "loss": _stats([r.loss for r in results]),
                     "seconds": statistics.mean(r.seconds for r in results), "curve": _curve(results)})
    return rows


def table(rows: list[dict], seeds: int, eval_size: int) -> str:
    full = rows[0]["accuracy"]["mean"]
    lines = [f"{'run':34s} {'samples':>9s} {'test acc (mean ± sd)':>21s} {'vs full':>8s} {'test loss':>10s} {'s/run':>6s}"]
    for r in rows:
        acc = r["accuracy"]
        lines.append(f"{r['label']:34s} {r['samples']:9d} {100 * acc['mean']:12.2f} ± {100 * acc['sd']:5.2f} % "
                     f"{100 * (acc['mean'] - full):+7.2f}p {r['loss']['mean']:10.3f} {r['seconds']:6.0f}")
    lines.append(f"({seeds} seeds; evaluation set of {eval_size} records)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-vit-tiny.yaml")
    parser.add_argument("--data", help="override data.source (digits, hf:NAME[:CONFIG][@SPLIT] or a local data set)")
    parser.add_argument("--eval-data", help="override data.eval_source (e.g. @validation)")
    parser.add_argument("--samples", type=int, help="override train.samples, the 1x budget")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. K-1)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.5], help="LTE sample budgets, x full-rank's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. lte.rank=8 or model.args.embed_dim=32 (YAML value)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--plot", type=Path, help="write accuracy against samples to this PNG")
    args = parser.parse_args(argv)

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
    base = load_config(args.config).with_overrides(overrides)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    rows = compare(base, args.seeds, args.budgets, log)
    log("\n" + table(rows, args.seeds, base.data.holdout))
    if args.plot:
        plot(rows, args.plot, f"{base.model.name} on {base.data.source}, {args.seeds} seeds")
        log(f"plot: {args.plot}")
    if args.json:
        print(json.dumps({"config": args.config, "data": base.data.source, "eval": base.data.eval_spec,
                          "seeds": args.seeds, "runs": rows}))


if __name__ == "__main__":
    main()
