"""Members poisoning W within the bounds, measured: the one-process simulation (the swarm's merge
arithmetic: every head's contribution encoded, checked against the run's bounds, reduced with the
robust clip and rounded as on the wire) with K of the N heads hostile in every round, side by
side with the run without them: test accuracy at the end, and how large W's layers end up against
the attack-free run's.

Each hostile contribution is as large as the per-head bounds let through (99 % of
`swarm.max_relative_update` of a layer's size, and of `swarm.max_update` per weight); the robust
clip then treats it as it treats any contribution. A contribution the bounds would refuse is
dropped, as the swarm drops it. The attacks:

- `shrink`: every layer and shared parameter pulled toward zero (its change is -W);
- `flip`: the head's honest change turned around;
- `zeros`: no change at all (trying to pull the robust clip's reference down, or freeze W);
- `noise`: a random direction.

With `--verify-rate R` each attack runs again with the consequences of the swarm's verification
(`swarm.verify_rate`, `swarm/rounds/undo.py`): every round each hostile head not yet caught is
drawn with probability R; a drawn one is caught (every attack here fails its redo,
`scripts/bench_reproduce.py`), what it added in every round so far (none was redone and passed)
is taken out two rounds on exactly as the swarm takes it out (each round's contribution clipped as
that round clipped it, summed, rounded as the undo travels), it is left out of the next round (the
coordinator revoked its writer) and from then on its head sends its honest change (another
volunteer's): `swarm.rollback_rounds: 0`. With `--rollback` each verified attack runs once more
with the consequences a rollback (`swarm.rollback_rounds`, the default) gives it: when the hostile
head's first unverified round is at most that many rounds back, instead of its contributions
alone every contribution merged since then is taken out, the round that takes them out merges none of its own (W goes back to where it was
then), and every head starts afresh (its factors and optimizer moments, trained on the poisoned W).

    python scripts/bench_poison.py [--config configs/digits-vit-tiny.yaml] [--rounds 20] [--hostile 1 2] \\
        [--attacks shrink flip zeros noise] [--verify-rate 0.25] [--set swarm.max_relative_update=0.5 ...] \\
        [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from swarm.config import load_config, parse_overrides  # noqa: E402
from swarm.errors import ConfigError  # noqa: E402

ATTACKS = ("shrink", "flip", "zeros", "noise")
MARGIN = 0.99  # of each bound: the largest change that passes


def _scaled(direction: torch.Tensor, norm_limit: float, value_limit: float) -> torch.Tensor:
    """`direction` scaled to MARGIN of the tighter of a norm and a per-value limit."""
    norm, peak = direction.double().norm().item(), direction.abs().max().item()
    if norm == 0.0:
        return direction.clone()
    scale = MARGIN * min(norm_limit / norm, value_limit / peak if peak > 0 else float("inf"))
    return (direction.double() * scale).float()


def forge(attack: str, honest, model, max_update: float, max_relative_update: float, reach, generator):
    """The hostile twin of `honest` (one head's decoded contribution) for `attack`."""
    from swarm.lora import merge_scale
    from swarm.wire import Contribution

    coef = merge_scale(model.spec.scale, model.spec.n_heads)
    n_heads = model.spec.n_heads
    shared = dict(model.model.named_parameters())
    weights, replicas = {}, {}
    for name, delta in honest.weights.items():
        w = model.layer(name).weight_store.master
        size = max(w.norm().item(), reach.get(name, 0.0), 1e-12)
        direction = {"shrink": -w.float(), "flip": -delta, "zeros": torch.zeros_like(delta),
                     "noise": torch.randn(delta.shape, generator=generator)}[attack]
        weights[name] = _scaled(direction, max_relative_update * size / coef, max_update / coef)
    for name, delta in honest.replicas.items():
        p = shared[name].detach()
        floor = max(p.norm().item(), reach.get(name, 1e-2 * p.numel() ** 0.5))
        direction = {"shrink": -p.float(), "flip": -delta, "zeros": torch.zeros_like(delta),
                     "noise": torch.randn(delta.shape, generator=generator)}[attack]
        replicas[name] = _scaled(direction, max_relative_update * n_heads * floor, max_update * n_heads)
    return Contribution(peer=honest.peer, heads=honest.heads, weights=weights, replicas=replicas, nbytes=0)


def run_one(job: tuple) -> dict:
    """One simulation with `hostile` heads (the last ones) attacking as `attack` (None: none),
    caught by verification at `verify_rate` (0: never)."""
    config, overrides, attack, hostile, verify_rate, rollback = job
    torch.set_num_threads(1)
    import peers.simulate as simulate
    from swarm.rounds.undo import UNDO_DELAY, Unverified, subtract
    from swarm.wire import (clipped_shares, decode_contribution, dequantized, encode_contribution, merged_totals,
                            reduced_tensors, shapes_of)

    cfg = load_config(config).with_overrides(overrides)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    draws = torch.Generator().manual_seed(cfg.train.seed + 1)
    stats = {"refused": 0, "round": 0}
    caught: dict[int, int] = {}   # hostile head -> the round it was caught in
    added = Unverified()          # what each hostile head added so far (no round of it passed a redo)
    undo: dict[int, dict] = {}    # round -> what it takes out
    applied: dict[int, dict] = {}  # round -> what it added to W (rollback)
    void: set[int] = set()         # rounds that roll back, and so merge none of their own

    def reduce(model, dtype="fp32", reduced="fp32", robust_clip=0.0, max_update=float("inf"),
               max_relative_update=float("inf"), reach=None, targets=None, dither=None):
        nonlocal added
        r = stats["round"]
        stats["round"] += 1
        contributions, forged_now = [], set()
        for h in model.head_ids:
            blob = encode_contribution(model, [h], dtype=dtype, targets=targets)[0]
            honest = decode_contribution(blob, f"{h:020d}", model, max_update, max_relative_update, part=targets,
                                         dtype=dtype, reach=reach, scope=targets)
            if h in caught and r == caught[h] + 1:
                continue  # its writer was revoked before the round: nobody merges it
            if attack is not None and h >= model.spec.n_heads - hostile and h not in caught:
                forged = forge(attack, honest, model, max_update, max_relative_update, reach or {}, generator)
                if not _passes(forged, model, max_update, max_relative_update, reach or {}):
                    stats["refused"] += 1
                    continue
                honest = forged
                forged_now.add(honest.peer)
                if verify_rate > 0 and torch.rand((), generator=draws).item() < verify_rate:
                    caught[h] = r
            contributions.append(honest)
        totals = merged_totals(model, contributions, robust_clip, reduced, targets, dither)
        if verify_rate > 0 and forged_now:
            for peer, share in clipped_shares(model, contributions, robust_clip, targets).items():
                if peer in forged_now:
                    added.add(peer, r, 1, share)
            shares, rolled = {}, False
            for pending in [added.pop(f"{h:020d}") for h, at in caught.items() if at == r]:
                if rollback and r - pending.undone.first + 1 <= cfg.swarm.rollback_rounds:
                    for k in range(pending.undone.first, r):
                        for name, value in applied[k].items():
                            shares[name] = shares[name] + value if name in shares else value.clone()
                    rolled = True
                    continue
                for name, value in pending.total.items():
                    shares[name] = shares[name] + value if name in shares else value
            if rolled:  # and this round's, as it is applied; the other heads' sums are out of W with it
                for name, value in (subtract(totals, undo[r]) if r in undo else totals).items():
                    shares[name] = shares[name] + value.double() if name in shares else value.double().clone()
                added = Unverified()
            if shares:
                undo[r + UNDO_DELAY] = dequantized(reduced_tensors(shares, reduced), reduced, shapes_of(shares))
            if rolled:
                void.add(r + UNDO_DELAY)
        if r in void:  # rolled back: none of this round's own, and out what the round before added
            out = subtract(subtract({name: torch.zeros_like(v) for name, v in totals.items()}, undo.pop(r)),
                           applied[r - 1])
        else:
            out = subtract(totals, undo.pop(r)) if r in undo else totals
        applied[r] = {name: value.double() for name, value in out.items()}
        return out

    trainers = []  # the simulation's head trainer: a rollback starts every head afresh

    class Trainer(simulate.HeadTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    merge, afresh = reduce, set()

    def reduce(model, *args, **kwargs):  # noqa: F811 (the merge above, then the heads afresh where rolled back)
        r = stats["round"]
        totals = merge(model, *args, **kwargs)
        if r in afresh:
            heads = list(model.head_ids)
            trainers[-1].set_heads([])
            trainers[-1].set_heads(heads)
        if rollback:
            afresh.update(at + UNDO_DELAY for at in caught.values() if at == r)
        return totals

    head_trainer, simulate.HeadTrainer = simulate.HeadTrainer, Trainer
    original, simulate.reduce_in_process = simulate.reduce_in_process, reduce
    try:
        result = simulate.simulate(cfg, "lte")
    finally:  # a process that simulates again after this one (a test worker) gets the swarm's merge back
        simulate.reduce_in_process, simulate.HeadTrainer = original, head_trainer
    norms = {name: layer.weight_store.master.norm().item() for name, layer in result.model.layers()}
    return {"attack": attack or "none", "hostile": hostile if attack else 0, "verify_rate": verify_rate,
            "rollback": rollback, "caught": sorted(caught.values()), "accuracy": result.accuracy, "loss": result.loss,
            "rounds": result.rounds, "refused": stats["refused"], "norms": norms,
            "curve": [(p.round, p.accuracy) for p in result.history]}


def _passes(contribution, model, max_update: float, max_relative_update: float, reach) -> bool:
    """Whether the swarm's checks take `contribution` (sent dense, as a forger would)."""
    from swarm.wire import ContributionError, _check_contribution

    tensors = {f"w/{n}/D": t for n, t in contribution.weights.items()}
    tensors.update({f"r/{n}": t for n, t in contribution.replicas.items()})
    try:
        _check_contribution(tensors, {"heads": json.dumps(list(contribution.heads))}, 0, contribution.peer, model,
                            max_update, max_relative_update, reach=reach)
    except ContributionError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-vit-tiny.yaml")
    parser.add_argument("--rounds", type=int, default=20, help="merge rounds (sets train.samples)")
    parser.add_argument("--hostile", type=int, nargs="+", default=[1, 2], help="hostile heads, of the config's N")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verify-rate", type=float, default=0.0,
                        help="run each attack again, its heads caught by verification at this rate (see above)")
    parser.add_argument("--rollback", action="store_true",
                        help="with --verify-rate, each caught attack also rolled back: all contributions of the rounds "
                             "since the hostile head's first unverified one taken out, every head's")
    parser.add_argument("--workers", type=int, default=1, help="simulations at once, one torch thread each")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    try:
        overrides = parse_overrides(args.overrides)
        cfg = load_config(args.config).with_overrides(overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    overrides["train.samples"] = cfg.train.batch_size * cfg.lte.merge_every * args.rounds
    if any(not 0 < k < cfg.lte.heads for k in args.hostile):
        parser.error(f"--hostile: between 1 and {cfg.lte.heads - 1} of the config's {cfg.lte.heads} heads")
    if not 0.0 <= args.verify_rate <= 1.0:
        parser.error("--verify-rate: a share, between 0 and 1")
    rates = [0.0] + ([args.verify_rate] if args.verify_rate > 0 else [])
    jobs = [(args.config, overrides, None, 0, 0.0, False)] + [
        (args.config, overrides, a, k, v, b) for k in args.hostile for a in args.attacks for v in rates
        for b in ([False, True] if v > 0 and args.rollback else [False])]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    base = results[0]
    sw = cfg.swarm
    print(f"{args.config}: N = {cfg.lte.heads}, {args.rounds} rounds; max_relative_update {sw.max_relative_update}, "
          f"robust_clip {sw.robust_clip}, max_update {sw.max_update}")
    print(f"{'attack':<8}{'hostile':>8}{'verify':>8}{'caught in':>11}{'test acc':>10}{'vs none':>9}"
          f"{'W norm vs none':>16}{'refused':>9}")
    for r in results:
        ratios = [r["norms"][n] / base["norms"][n] for n in base["norms"]]
        r["norm_ratio"] = sum(ratios) / len(ratios)
        caught = ",".join(str(c) for c in r["caught"]) or "-"
        print(f"{r['attack'] + ('+rb' if r['rollback'] else ''):<8}{r['hostile']:>5}/{cfg.lte.heads:<2}{r['verify_rate']:>8.2f}{caught:>11}"
              f"{100 * r['accuracy']:>9.2f}%{100 * (r['accuracy'] - base['accuracy']):>+8.2f}p{r['norm_ratio']:>16.2f}"
              f"{r['refused']:>9d}")
    if args.json:
        print(json.dumps({"config": args.config, "rounds": args.rounds, "overrides": overrides,
                          "runs": [{k: v for k, v in r.items() if k != "norms"} for r in results]}))


if __name__ == "__main__":
    main()
