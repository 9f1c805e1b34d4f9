"""Measure a real swarm on loopback: a coordinator and P peers (one head each) train the digits ViT;
prints seconds per round split into training, waiting and communicating, the fraction of wall time
spent training, and bytes per peer per round and per training sample, next to what a dense
all-reduce of the full model after every step (data-parallel training) would send.

    python scripts/bench_swarm.py [--peers 4] [--merge-every 30] [--rounds 4] [--merge reduce|gather]
                                  [--set swarm.overlap=true ...] [--json]

With --merge reduce (the default) W is reduced by owners; --merge gather is the all-gather merge,
where every peer downloads every contribution. `--set` overrides any key of the run's config
(e.g. swarm.overlap=true, swarm.contribution_dtype=int8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from peers.local_swarm import LocalSwarm
from peers.models import create_model
from peers.shipped import shipped_config
from swarm.config import load_config, parse_config, parse_overrides
from swarm.errors import ConfigError


def write_config(path: Path, peers: int, merge_every: int, rounds: int, merge: str, overrides: dict) -> Path:
    raw = yaml.safe_load(shipped_config().read_text())
    raw["lte"].update(heads=peers, merge_every=merge_every)
    per_head = raw["train"]["batch_size"] // 4
    raw["train"].update(batch_size=per_head * peers, samples=per_head * peers * merge_every * rounds, eval_every=rounds)
    raw["swarm"] = dict(lease_seconds=30.0, settle_seconds=0.5, merge_grace=10.0, round_timeout=60.0,
                        request_timeout=15.0, poll_seconds=0.1, checkpoint_every=rounds, min_heads=peers, merge=merge)
    raw = parse_config(raw, origin="bench").with_overrides(overrides).model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--merge-every", type=int, default=30, help="T, local steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--merge", choices=["reduce", "gather"], default="reduce")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value), e.g. swarm.overlap=true")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    try:
        overrides = parse_overrides(args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    workdir = Path(tempfile.mkdtemp(prefix="lte-bench-"))
    config = write_config(workdir / "bench.yaml", args.peers, args.merge_every, args.rounds, args.merge, overrides)
    cfg = load_config(config)
    swarm = LocalSwarm(workdir, config)
    try:
        swarm.start_coordinator()
        peers = [swarm.join(f"peer{i}") for i in range(args.peers)]
        for p in peers:
            if p.wait(args.rounds * 600) != 0:
                raise SystemExit(f"{p.name} failed:\n{p.tail()}")
    finally:
        swarm.close()

    train, wait, comm, sent, received, walls, fractions = [], [], [], [], [], [], []
    samples_per_round = args.merge_every * cfg.head_batch  # one head per peer
    missed = 0
    for p in peers:
        rounds = p.of("round")
        missed += sum(r["missed"] for r in rounds)
        joined, left = p.of("joined")[0]["time"], p.of("left")[-1]["time"]
        # forward/backward alone: with swarm.overlap a round's training span also holds the polls
        # of the round in flight
        fractions.append(p.of("left")[-1]["compute_seconds"] / (left - joined))
        for prev, r in zip(rounds, rounds[1:]):  # from the second round on: the first includes joining
            train.append(r["seconds_train"]), wait.append(r["seconds_wait"]), comm.append(r["seconds_comm"])
            sent.append(r["bytes_sent"] - prev["bytes_sent"]), received.append(r["bytes_received"] - prev["bytes_received"])
            walls.append(r["time"] - prev["time"])
    digests = {p.of("left")[-1]["digest"] for p in peers}

    params = sum(p.numel() for p in create_model(cfg.model).parameters())
    n = args.peers
    dense_step = 2 * (n - 1) / n * 4 * params  # ring all-reduce of fp32 gradients, sent (and received) per peer
    dense_round = dense_step * args.merge_every
    mean = statistics.mean
    print(f"\n{n} peers x 1 head on loopback, {args.merge} merge (2-core machine shared by all), {cfg.model.name} "
          f"({params / 1e6:.2f}M params), N={cfg.lte.heads} r={cfg.lte.rank} T={args.merge_every}, "
          f"{args.rounds} rounds, head batch {cfg.head_batch}; all peers agree on W: {len(digests) == 1}; "
          f"rounds missed by a peer: {missed}")
    print(f"{'seconds per round':32s} {'train':>8s} {'wait':>8s} {'comm':>8s} {'total':>8s}")
    print(f"{'  mean over peers and rounds':32s} {mean(train):8.2f} {mean(wait):8.2f} {mean(comm):8.2f} {mean(walls):8.2f}")
    print(f"fraction of wall time training (join to leave, per peer): "
          f"{', '.join(f'{f:.1%}' for f in fractions)} (mean {mean(fractions):.1%}; target 90%)")
    print(f"\n{'bytes per peer':32s} {'per round':>12s} {'per sample':>12s}")
    print(f"{'  LTE sent':32s} {mean(sent):12,.0f} {mean(sent) / samples_per_round:12,.0f}")
    print(f"{'  LTE received':32s} {mean(received):12,.0f} {mean(received) / samples_per_round:12,.0f}")
    print(f"{'  dense all-reduce every step':32s} {dense_round:12,.0f} {dense_round / samples_per_round:12,.0f}")
    print(f"{'  ratio dense / LTE sent':32s} {dense_round / mean(sent):12.1f}x")
    print(f"(events and logs in {workdir})")
    if args.json:
        print(json.dumps({"peers": n, "merge": args.merge, "rounds": args.rounds, "merge_every": args.merge_every,
                          "overrides": overrides,
                          "bytes_sent_per_peer_round": mean(sent), "bytes_received_per_peer_round": mean(received),
                          "train_fraction": mean(fractions), "seconds_per_round": mean(walls),
                          "agree": len(digests) == 1, "rounds_missed": missed}))


if __name__ == "__main__":
    main()
