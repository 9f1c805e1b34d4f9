"""Rounds merged per minute by an honest loopback swarm, without and with a rogue node hammering it
with every kind of hostile record (the volley of tests/adversarial/test_rogue_node.py), side by
side in one run. Both runs start an idle extra DHT node, so the comparison is of the attack, not of
one more process on the machine.

    python scripts/bench_attack.py [--peers 2] [--rounds 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.local_swarm import LocalSwarm  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.keys import RunKeys  # noqa: E402
from tests.adversarial.test_rogue_node import _attack_once  # noqa: E402
from tests.harness import last, write_config  # noqa: E402


def run(workdir: Path, peers: int, rounds: int, attack: bool) -> tuple[float, int, bool]:
    import hivemind

    from peers.node import install_signing

    workdir.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(workdir, write_config(workdir / "run.yaml", heads=peers, merge_every=2, rounds=rounds,
                                             min_heads=peers))
    stop, rogue = threading.Event(), None
    try:
        coordinator = swarm.start_coordinator()
        procs = [swarm.join(f"peer{i}", "--throttle", "0.1") for i in range(peers)]
        coordinator.wait_for(lambda es: any(e["event"] == "round" and e["new_round"] >= 2 for e in es), 300, "round 2")
        rogue = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=swarm.maddrs)
        identity, keys = Identity(), RunKeys(swarm.run_id)
        install_signing(rogue, identity)
        victim = last(procs[0], "joined")["p2p"]

        def hammer():
            while not stop.is_set():
                done = [e["new_round"] for e in coordinator.of("round")]
                if attack:
                    _attack_once(rogue, identity, keys, max(done, default=0), victim)
                stop.wait(1.0)

        threading.Thread(target=hammer, daemon=True).start()
        for p in procs:
            p.wait(rounds * 60)
        coordinator.wait(120)
    finally:
        stop.set()
        if rogue is not None:
            rogue.shutdown()
        swarm.close()
    events = [e for e in coordinator.of("round") if e["new_round"] >= 2]
    minutes = (events[-1]["time"] - events[0]["time"]) / 60
    agree = len({last(p, "left")["digest"] for p in (*procs, coordinator)}) == 1
    return (len(events) - 1) / minutes, len(events) - 1, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lte-attack-") as tmp:
        results = {name: run(Path(tmp) / name, args.peers, args.rounds, attack=name == "attacked")
                   for name in ("honest", "attacked")}
    print(f"{args.peers} peers x 1 head on loopback, rounds 2..{args.rounds}, merge every 2 steps")
    print(f"{'run':<10}{'rounds/min':>12}{'rounds':>8}{'agree':>7}")
    for name, (rate, n, agree) in results.items():
        print(f"{name:<10}{rate:>12.1f}{n:>8}{str(agree):>7}")
    print(f"under attack / honest: {results['attacked'][0] / results['honest'][0]:.0%}")


if __name__ == "__main__":
    main()
