"""CPU time a peer spends checking one member's whole contribution, part by part, for a config's
model: what the coordinator does for every member of every round when it recomputes each part
(`swarm.coordinator_recomputes`), and any peer that falls back to raw contributions. Each part is
validated on its own (a bad layer rejects its part only); the blob is parsed either once per part
or once for all of them (`decode_contribution_parts`, what the protocol does). Nothing is trained;
the model is built with random weights (no download).

    python scripts/bench_checks.py --config configs/vit-s32-imagenet100.yaml [--peers 32] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from peers.models import create_lte_model
from swarm.config import load_config
from swarm.wire import decode_contribution, decode_contribution_parts, encode_contribution, plan_parts


def _seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--peers", type=int, default=32, help="members per round, for the per-round figure")
    parser.add_argument("--repeat", type=int, default=3, help="timings per figure (the median is shown)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    model = create_lte_model(cfg, [0])
    parts = plan_parts(model, cfg.swarm.parts or 2 * cfg.lte.heads)
    limit = float("inf")  # the random heads are not what the checks are about
    rows = []
    for dtype in ("fp32", "bf16", "int8"):
        blob = encode_contribution(model, [0], dtype=dtype)[0]

        def each() -> None:
            for part in parts:
                decode_contribution(blob, "member", model, limit, limit, part=part, dtype=dtype)

        def once() -> None:
            decode_contribution_parts(blob, "member", model, limit, limit, list(parts), dtype)

        per_part, together = _seconds(each, args.repeat), _seconds(once, args.repeat)
        rows.append({"contribution_dtype": dtype, "contribution_bytes": len(blob), "parts": len(parts),
                     "parsed_per_part_seconds": per_part, "parsed_once_seconds": together,
                     "ratio": per_part / together, "per_round_saved_seconds": (per_part - together) * args.peers})
    if args.json:
        print(json.dumps({"config": args.config, "peers": args.peers, "rows": rows}))
        return
    print(f"{cfg.model.name}, {len(parts)} parts: checking one member's whole contribution part by part")
    print(f"{'dtype':6s} {'MB':>7s} {'parsed per part s':>18s} {'parsed once s':>14s} {'ratio':>6s} "
          f"{f'saved per round of {args.peers} s':>24s}")
    for row in rows:
        print(f"{row['contribution_dtype']:6s} {row['contribution_bytes'] / 1e6:7.2f} "
              f"{row['parsed_per_part_seconds']:18.3f} {row['parsed_once_seconds']:14.3f} {row['ratio']:6.2f} "
              f"{row['per_round_saved_seconds']:24.1f}")


if __name__ == "__main__":
    main()
