"""A swarm of V volunteers and one coordinator on a modelled internet, in one process, on a fake
clock: the real coordinator, trainers, rounds, leases, records, validators and wire encoding
(`peers/swarm_sim.py`), over home links drawn from one seed (`swarm/links.py`: 10-300 Mbit/s
down, 2-50 up, 10-150 ms; the coordinator on 1 Gbit/s), a DHT whose records live on the 5 nodes
nearest to each key (`swarm/simnet.py`), heavy-tailed compute, NAT, late joiners and churn. The
model trained is tiny; every blob's bytes are scaled to the wire config's model (by default
ViT-S/32 of `configs/vit-s32-imagenet100.yaml`, whose lte and swarm sections the run also takes).

    python scripts/simulate_swarm.py --volunteers 32 256 1000 --rounds 8 [--churn 0.3] [--nat 0.2] \\
        [--step-seconds 0.2] [--set swarm.merge_grace=30 ...] [--json] [--plot rounds.png]

Per run: rounds per hour (fake time), the share of a head holder's time spent computing, the share
of volunteer time without a head, bytes per volunteer per round up and down (blobs and DHT, and
DHT alone), the coordinator's bytes per round, seconds from a round's first ready peer to its
agreed W, members per round, divergent W (peer-rounds ending on another W than the agreed one),
contributions lost or counted twice (a peer's view of whether it merged against the agreed
members). `--json` prints one object per run with these fields. Each run stops at the end of its
rounds, after `--max-hours` of fake time, or after `--real-seconds` of real time (then marked
"cut short"); Ctrl+C ends the run in progress and reports what it reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.swarm_sim import CONFIGS, Scenario, SwarmSimulation  # noqa: E402

COLUMNS = [("volunteers", "V", "{:d}"), ("rounds", "rounds", "{:d}"), ("rounds_per_hour", "rounds/h", "{:.1f}"),
           ("train_fraction", "training", "{:.1%}"), ("idle_fraction", "no head", "{:.1%}"),
           ("members_per_round", "members", "{:.1f}"),
           ("bytes_up_per_volunteer_round", "MB up/round", "{:.1f}"),
           ("bytes_down_per_volunteer_round", "MB down/round", "{:.1f}"),
           ("dht_bytes_down_per_volunteer_round", "DHT MB down", "{:.2f}"),
           ("coordinator_bytes_per_round", "coord MB/round", "{:.0f}"),
           ("seconds_close_to_agreement", "close->agreed s", "{}"), ("divergent_w", "divergent", "{:d}"),
           ("lost_contributions", "lost", "{:d}"), ("doubled_contributions", "doubled", "{:d}"),
           ("real_seconds", "real s", "{:.0f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if "bytes" in key:
        value = value / 1e6
    return fmt.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volunteers", type=int, nargs="+", default=[32], help="V, one run per value")
    parser.add_argument("--rounds", type=int, default=8, help="merge rounds of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wire-config", type=Path, default=CONFIGS / "vit-s32-imagenet100.yaml",
                        help="the run whose heads, T, protocol and model sizes are simulated")
    parser.add_argument("--step-seconds", type=float, default=0.2, help="median seconds of a local step")
    parser.add_argument("--step-spread", type=float, default=0.5, help="sigma of its log-normal spread")
    parser.add_argument("--churn", type=float, default=0.3, help="fraction of volunteers leaving per hour")
    parser.add_argument("--crash-share", type=float, default=0.5, help="of the leavers, the share that crash")
    parser.add_argument("--nat", type=float, default=0.2, help="fraction of volunteers behind NAT")
    parser.add_argument("--join-spread", type=float, default=60.0, help="seconds over which the first volunteers join")
    parser.add_argument("--max-hours", type=float, default=6.0, help="fake hours after which a run is cut short")
    parser.add_argument("--real-seconds", type=float, default=600.0, help="real seconds after which it is cut short")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the simulated run's config (e.g. swarm.merge_grace=30)")
    parser.add_argument("--wan", action="store_true",
                        help="the scenario of scripts/bench_wan.py (its model, config and timings, one head per volunteer, "
                             "every link at --mbit, no NAT, no churn, everyone at once): the model against the emulated WAN")
    parser.add_argument("--mbit", type=float, default=4.0, help="with --wan: every link's cap, each direction")
    parser.add_argument("--samples", type=int, default=30720, help="with --wan: its training budget over all peers")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument("--plot", type=Path, help="write a PNG of members per round against fake time")
    parser.add_argument("--verbose", action="store_true", help="the peers' warnings (many at scale)")
    args = parser.parse_args(argv)
    if any(v < 1 for v in args.volunteers) or args.rounds < 1:
        parser.error("--volunteers and --rounds must be at least 1")
    if not 0 <= args.nat <= 1 or not 0 <= args.crash_share <= 1 or not 0 <= args.churn < 1:
        parser.error("--nat and --crash-share are fractions from 0 to 1, --churn from 0 to below 1")
    if not args.wire_config.is_file():
        parser.error(f"--wire-config {args.wire_config}: no such file")
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL, format="%(name)s: %(message)s")

    def interrupted(*_):  # a SIGTERM ends the run in progress as Ctrl+C does: its figures still come out
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, interrupted)

    rows = []
    for v in args.volunteers:
        sc = Scenario(volunteers=v, rounds=args.rounds, seed=args.seed, wire_config=args.wire_config,
                      step_seconds=args.step_seconds, step_spread=args.step_spread, churn_per_hour=args.churn,
                      crash_share=args.crash_share, nat_share=args.nat, join_spread=args.join_spread,
                      max_hours=args.max_hours, sets=list(args.set))
        if args.wan:
            sc = wan_scenario(sc, args.mbit, args.samples)
        with tempfile.TemporaryDirectory() as workdir:
            sim = SwarmSimulation(sc, Path(workdir))
            scaled = (f"bytes scaled x{sim.scales['state']:.0f} (W) and x{sim.scales['contribution']:.0f} (contributions)"
                      if sim.scales else "the model itself on the wire")
            print(f"V = {v}: {sim.cfg.lte.heads} heads, T = {sim.cfg.lte.merge_every}, {sim.cfg.rounds} rounds; {scaled}",
                  file=sys.stderr, flush=True)
            row = sim.run(real_seconds=args.real_seconds, progress=lambda line: print(line, file=sys.stderr, flush=True))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print("  ".join(f"{title:>{max(len(title), 6)}s}" for _, title, _ in COLUMNS))
        for row in rows:
            print("  ".join(f"{_cell(row, k, f):>{max(len(t), 6)}s}" for k, t, f in COLUMNS)
                  + (f"  (cut short: {row['cut_short']})" if row["cut_short"] else ""))
    if args.plot:
        _plot(rows, args.plot)
    return 0


def wan_scenario(sc: Scenario, mbit: float, samples: int) -> Scenario:
    """`bench_wan.py`'s run in the simulator: its widened digits model on the wire, its config for
    V peers (one head each, its timeouts for the cap), equal links, nobody behind NAT or leaving."""
    spec = importlib.util.spec_from_file_location("bench_wan", Path(__file__).resolve().parent / "bench_wan.py")
    bench_wan = sys.modules.setdefault("bench_wan", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench_wan)
    from peers.shipped import shipped_config
    from swarm.config import load_config

    base = load_config(shipped_config()).with_overrides(dict(bench_wan.WAN_MODEL))
    wire = bench_wan.wan_config(base, sc.volunteers, samples, mbit, "reduce")
    return dataclasses.replace(sc, wire=wire, rounds=wire.rounds, link_mbit=mbit, coordinator_mbit=mbit, nat_share=0.0,
                               churn_per_hour=0.0, join_spread=0.0, step_spread=0.0, exact=True)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        ax.plot([r["time_s"] / 60 for r in row["per_round"]], [r["members"] for r in row["per_round"]], marker="o",
                label=f"V = {row['volunteers']}")
    ax.set_xlabel("minutes (fake time)")
    ax.set_ylabel("contributions merged in the round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
