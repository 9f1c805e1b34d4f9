"""Bytes each peer moves per merge round, from the sizes of a real contribution and of W for a
config's model, for P peers holding one head each: the owner-reduced merge against the
all-gather. Nothing is trained; the model is built with random weights (no download).

    python scripts/wire_estimate.py --config configs/vit-s32-imagenet100.yaml --peers 32 [--json]

The accounting follows the protocol: each part of W is reduced by two of the round's members
(`swarm.rounds.owners`), which download that part of every other member's contribution and each
serve the reduced part to half of the peers that do not own it; every peer downloads every part
it does not own. `compact` (sent/received) is the same once every round merges: an owner then
already holds each part's baseline factors (a reset-less head's last contribution) and fetches
the part without them. The all-gather moves P - 1 whole contributions each way (`compact`: the
same, compact). Every precision on the wire is shown (`swarm.contribution_dtype` /
`swarm.reduced_dtype`): fp32/fp32, bf16/bf16, bf16/int8, int8/int8, bf16/int4, int8/int4. With W merged in
k fragments (`--fragments`, `lte.fragments`) a round moves one fragment's parts, reduced by
members spread over the swarm: the figures are then the mean of a cycle of k rounds.

    python scripts/wire_estimate.py --config configs/vit-s32-imagenet100.yaml --peers 8 --fragments 1 4 8
"""

from __future__ import annotations

import argparse
import json

from peers.models import create_lte_model
from swarm.config import load_config
from swarm.rounds import owners
from swarm.wire import (baseline_bytes, encode_contribution, encode_reduced, plan_parts, reduced_tensors, round_parts,
                        split_contribution)

PRECISIONS = (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "int8"), ("int8", "int8"), ("bf16", "int4"),
              ("int8", "int4"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--part-owners", type=int, choices=[1, 2], help="members reducing each part (default: the config's)")
    parser.add_argument("--fragments", type=int, nargs="+", help="k of lte.fragments (default: the config's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    count = args.part_owners or cfg.swarm.part_owners
    model = create_lte_model(cfg, [0])
    parts = plan_parts(model, cfg.n_parts)
    fragments = args.fragments or [cfg.lte.fragments]
    if any(not 1 <= k <= len(parts) for k in fragments):
        parser.error(f"--fragments: each k must be from 1 to the {len(parts)} parts W is cut into")
    totals = {name: t.double() for name, t in model.weight_deltas().items()}
    params = dict(model.model.named_parameters())
    totals.update({name: params[name].detach().double() for name in model.replicated})
    rows = []
    for c_dtype, r_dtype in PRECISIONS:
        contribution = encode_contribution(model, [0], dtype=c_dtype)[0]
        blobs = split_contribution(contribution, parts)
        c_part = [len(b) for b in blobs]
        c_compact = [len(b) - baseline_bytes(b) for b in blobs]  # after a merged round (reset-less)
        whole_compact = len(contribution) - baseline_bytes(contribution)
        w_part = [len(encode_reduced(reduced_tensors({n: totals[n] for n in part}, r_dtype))) for part in parts]
        for k, p in ((k, p) for k in fragments for p in args.peers):
            sent, received = _reduce_bytes(p, c_part, w_part, count, k)
            steady_sent, steady_received = _reduce_bytes(p, c_compact, w_part, count, k)
            share = 1.0 / k  # over a cycle, each part's contribution travels once: what one round of all moves
            rows.append({"contribution_dtype": c_dtype, "reduced_dtype": r_dtype, "peers": p, "fragments": k,
                         "contribution_bytes": len(contribution), "w_bytes": sum(w_part),
                         "reduce_sent": sent, "reduce_received": received,
                         "compact_sent": steady_sent, "compact_received": steady_received,
                         "gather_sent": len(contribution) * (p - 1) * share,
                         "gather_received": len(contribution) * (p - 1) * share,
                         "gather_compact": whole_compact * (p - 1) * share})
    print(f"{cfg.model.name}: N={cfg.lte.heads} r={cfg.lte.rank} {cfg.lte.variant}, nonlinear {cfg.lte.nonlinear}; "
          f"{len(parts)} parts, {count} owner(s) each; MB per peer per round, mean over peers")
    print(f"{'wire':>10s} {'contrib':>8s} {'W':>7s} {'k':>3s} {'peers':>6s} {'reduce sent':>12s} {'reduce recv':>12s} "
          f"{'compact':>15s} {'gather sent':>12s} {'gather recv':>12s} {'compact':>8s}")
    for r in rows:
        print(f"{r['contribution_dtype'] + '/' + r['reduced_dtype']:>10s} {r['contribution_bytes'] / 1e6:8.1f} "
              f"{r['w_bytes'] / 1e6:7.1f} {r['fragments']:3d} {r['peers']:6d} {r['reduce_sent'] / 1e6:12.1f} "
              f"{r['reduce_received'] / 1e6:12.1f} {r['compact_sent'] / 1e6:7.1f}/{r['compact_received'] / 1e6:7.1f} "
              f"{r['gather_sent'] / 1e6:12.1f} {r['gather_received'] / 1e6:12.1f} {r['gather_compact'] / 1e6:8.1f}")
    if args.json:
        print(json.dumps({"model": cfg.model.name, "part_owners": count, "rows": rows}))


def _reduce_bytes(p: int, c_part: list[int], w_part: list[int], count: int, fragments: int = 1
                  ) -> tuple[float, float]:
    """Mean bytes sent and received per peer per round in the owner-reduced merge with p peers and
    `count` owners per part (the coordinator's own downloads are not a peer's), over a cycle of the
    rounds that merge W's `fragments` fragments in turn."""
    members = [f"peer{i:03d}" for i in range(p)]
    cycle = [tuple(round_parts(len(c_part), fragments, r, None)) for r in range(fragments)]
    sent = received = 0.0
    for parts in cycle:
        among = parts if len(parts) < len(c_part) else None
        for me in members:  # owners vary by part, so peers differ by a part or two
            for i in parts:
                who = owners(i, members, count, among)
                if me in who:
                    received += c_part[i] * (p - 1)            # the part of every other contribution
                    sent += w_part[i] * (p - len(who)) / 2     # the non-owners read it from us (or the coordinator)
                else:
                    received += w_part[i]
                    sent += c_part[i] * len(who)               # our part to each of its owners
    return sent / p / len(cycle), received / p / len(cycle)


if __name__ == "__main__":
    main()
