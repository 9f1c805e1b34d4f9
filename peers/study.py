"""Experiments over the one-process simulation: the arms LTE is measured against, each with learning
rates of its own, swept on a validation split carved out of the training data, then run over seeds
on the evaluation set. `scripts/tune.py` sweeps, `scripts/compare.py` compares.

Runs go to worker processes of one torch thread each (a simulation of this size is too small to
use more threads well, and one run per core is the fastest use of a machine); a run's numbers do
not depend on which worker ran it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, Literal

from peers.simulate import Mode
from swarm.config import RunConfig, parse_config

EvaluateOn = Literal["test", "validation"]
FACTOR_RATES = ("train.lr", "train.replica_lr")


@dataclass(frozen=True)
class Arm:
    """One way of training the model: a mode of the simulation, config changes, and the learning
    rates (config keys) its own sweep tunes."""

    name: str
    mode: Mode
    rates: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    scales_budget: bool = False  # run at every sample budget of the comparison, not only 1x
    rates_of: str | None = None  # whose tuned rates it runs at (a merge schedule: LTE's); None: its own

    def label(self, base: RunConfig) -> str:
        if self.mode == "full":
            return "full-rank"
        if self.mode == "lora":
            return f"single LoRA r={base.lte.rank}"
        cfg = base.with_overrides(self.overrides)
        if self.mode == "diloco":
            outer = cfg.diloco.outer  # its rate shows where it is set, as LTE's: in the overrides or the rates
            step = f"outer {outer.optimizer}" + (f" mu {outer.momentum:g}" if outer.optimizer == "nesterov" else "")
            step += f" lr {outer.lr:g}" if "diloco.outer.lr" in self.overrides else ""
            label = f"DiLoCo N={cfg.lte.heads} H={cfg.diloco.inner_steps or cfg.lte.merge_every} {step}"
            return f"{self.name}: {label}" if self.rates_of else label
        outer = cfg.lte.outer
        step = ""  # the outer rate shows where it is set: in the overrides, or among the tuned rates
        if outer.optimizer == "nesterov":
            step = f" outer nesterov mu {outer.momentum:g}"
        if "lte.outer.lr" in self.overrides:
            step += f" outer lr {outer.lr:g}"
        label = f"LTE N={cfg.lte.heads} r={cfg.lte.rank} T={cfg.lte.merge_every}{step} W {cfg.lte.storage}"
        return f"{self.name}: {label}" if self.rates_of else label  # a schedule's name says what else it sets


def schedule_arm(name: str, overrides: dict[str, Any]) -> Arm:
    """An LTE arm with another merge schedule (T, outer step, storage...) at LTE's tuned rates:
    what a schedule costs or gains is measured at the rates the plain schedule was tuned at. With
    DiLoCo's outer Nesterov step it has one rate of its own, the outer one (`lte.outer.lr`).
    Changes of `diloco.*` keys make it a DiLoCo arm (another H, outer step) at DiLoCo's rates."""
    if any(key.startswith("diloco.") for key in overrides):
        return Arm(name, "diloco", ("diloco.outer.lr",), dict(overrides), rates_of="diloco")
    own = ("lte.outer.lr",) if overrides.get("lte.outer.optimizer") == "nesterov" else ()
    return Arm(name, "lte", own, dict(overrides), scales_budget=True, rates_of="lte")


ARMS: dict[str, Arm] = {
    "full": Arm("full", "full", ("train.full_lr",)),
    "lora": Arm("lora", "lora", FACTOR_RATES),
    "lte": Arm("lte", "lte", FACTOR_RATES, scales_budget=True),
    # DiLoCo's workers train full-rank models: their inner rate is full-rank's key, tuned for them
    # with the outer rate (DiLoCo's 0.7 was chosen for H = 500; here syncs are far more frequent).
    "diloco": Arm("diloco", "diloco", ("train.full_lr", "diloco.outer.lr")),
    # The algorithm's own cost apart from quantization's: W kept in float32, at LTE's tuned rates.
    "lte-fp32": Arm("lte-fp32", "lte", FACTOR_RATES, {"lte.storage": "fp32"}, scales_budget=True),
}


@dataclass(frozen=True)
class Run:
    cfg: RunConfig
    mode: Mode
    evaluate_on: EvaluateOn = "test"
    threads: int = 1  # torch threads; a replay of a swarm runs at its peers' count, bit for bit


def _run_one(raw: dict, mode: Mode, evaluate_on: EvaluateOn, threads: int) -> dict:
    from peers.simulate import simulate
    from peers.training import torch_threads

    with torch_threads(threads):
        result = simulate(parse_config(raw, origin="run"), mode, evaluate_on=evaluate_on)
    return result.to_json()


def run_all(runs: list[Run], workers: int = 1, on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Every run's result (`SimResult.to_json()`), in order; `on_done(i, result)` as each ends."""
    results: list[dict | None] = [None] * len(runs)
    if workers <= 1:
        for i, run in enumerate(runs):
            results[i] = _run_one(run.cfg.model_dump(mode="json"), run.mode, run.evaluate_on, run.threads)
            if on_done:
                on_done(i, results[i])
        return results  # type: ignore[return-value]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, r.cfg.model_dump(mode="json"), r.mode, r.evaluate_on, r.threads): i
                   for i, r in enumerate(runs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done:
                on_done(i, results[i])
    return results  # type: ignore[return-value]


def seeded(cfg: RunConfig, seed: int, *overrides: dict[str, Any]) -> RunConfig:
    """Seed k sets both the model seed (W0 and every head's A) and the training seed (data order)."""
    merged: dict[str, Any] = {"train.seed": seed, "model.seed": seed}
    for more in overrides:
        merged.update(more)
    return cfg.with_overrides(merged)


def shown_rates(rates: dict[str, float]) -> str:
    """Rates as the tables and logs show them (`lr=0.0005 replica_lr=0.006`); none: the config's."""
    return " ".join(f"{k.removeprefix('train.')}={v:g}" for k, v in rates.items()) or "config's"


def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def curve(results: list[dict]) -> list[dict]:
    """Accuracy against samples, mean and sd over seeds at each evaluation (same points every seed)."""
    points = []
    for evals in zip(*(r["history"] for r in results)):
        accuracy = stats([p["accuracy"] for p in evals])
        points.append({"samples": evals[0]["samples"], "accuracy": accuracy["mean"], "sd": accuracy["sd"]})
    return points


def _loss(result: dict) -> float:
    """A run's final loss, a diverged run's as infinitely bad."""
    loss = result["loss"]
    return loss if loss is not None and math.isfinite(loss) else math.inf


def sweep(base: RunConfig, arms: list[Arm], grids: dict[str, list[float]], seeds: int, validation: int,
          workers: int = 1, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every arm at every point of its rates' grid (the product of `grids[key]` over the arm's
    rates), `seeds` seeds each, trained without the `validation` records carved out of the training
    data and judged by the final loss on them (mean over seeds). Returns, per arm, the sweep and
    the best rates."""
    by_name = {arm.name: arm for arm in arms}
    plan: list[tuple[str, dict[str, float], int]] = []
    for arm in arms:
        for point in itertools.product(*(grids[k] for k in arm.rates)):
            plan += [(arm.name, dict(zip(arm.rates, point)), s) for s in range(seeds)]
    runs = [Run(seeded(base, s, by_name[name].overrides, rates, {"data.validation": validation}), by_name[name].mode,
                "validation") for name, rates, s in plan]

    def done(i: int, result: dict) -> None:
        name, rates, s = plan[i]
        log(f"  {name:9s} {shown_rates(rates):36s} seed {s}: validation loss {result['loss']:.4f} "
            f"acc {result['accuracy']:.4f} ({result['seconds']:.0f}s)")

    results = run_all(runs, workers, done)
    out: dict[str, dict] = {}
    for arm in arms:
        rows = []
        for point in itertools.product(*(grids[k] for k in arm.rates)):
            rates = dict(zip(arm.rates, point))
            mine = [r for (name, rr, _), r in zip(plan, results) if name == arm.name and rr == rates]
            losses = [_loss(r) for r in mine]
            rows.append({"rates": rates, "loss": statistics.mean(losses), "losses": losses,
                         "accuracy": statistics.mean(r["accuracy"] for r in mine)})
        best = min(rows, key=lambda r: r["loss"])
        out[arm.name] = {"best": best["rates"], "sweep": rows}
    return out


def compare(base: RunConfig, arms: list[Arm], seeds: int, budgets: list[float], rates: dict[str, dict[str, float]],
            workers: int = 1, log: Callable[[str], None] = print) -> list[dict]:
    """Every arm over `seeds` seeds on the evaluation set, each at its own rates (`rates[arm]`,
    else the config's): the baselines at the config's samples, LTE at each multiple of them."""
    plan = [(arm, b) for arm in arms for b in (budgets if arm.scales_budget else [1.0])]

    def rates_of(arm: Arm) -> dict[str, float]:
        inherited = rates.get(arm.rates_of, {}) if arm.rates_of else {}
        return {**inherited, **rates.get(arm.name, {})}

    runs = [Run(seeded(base, s, arm.overrides, rates_of(arm), {"train.samples": int(base.train.samples * b)}),
                arm.mode) for arm, b in plan for s in range(seeds)]

    def done(i: int, result: dict) -> None:
        arm, b = plan[i // seeds]
        log(f"  {arm.label(base) + f' x{b:g}':40s} seed {i % seeds}: acc {result['accuracy']:.4f} "
            f"loss {result['loss']:.3f} ({result['seconds']:.0f}s)")

    results = run_all(runs, workers, done)
    rows = []
    for j, (arm, b) in enumerate(plan):
        mine = results[j * seeds:(j + 1) * seeds]
        rows.append({"arm": arm.name, "label": f"{arm.label(base)} x{b:g}", "mode": arm.mode, "budget": b,
                     "rates": rates_of(arm), "overrides": arm.overrides, "samples": mine[0]["samples"],
                     "accuracy": stats([r["accuracy"] for r in mine]), "loss": stats([r["loss"] for r in mine]),
                     "seconds": statistics.mean(r["seconds"] for r in mine), "curve": curve(mine)})
    return rows
