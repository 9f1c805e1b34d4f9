"""An honest loopback swarm (a coordinator, `--peers` volunteers, the last behind NAT) without and
with each attack a stranger with a key and a node of its own can make, side by side in one run:
per attack, the rounds merged per minute against the run without it, whether every round merged
every honest peer and all agree on W, and how much the honest processes grew (memory, the PSS of
each process and those it started; open file descriptors) while it went on.

- `records`: every kind of hostile DHT record, again and again (the volley of tests/test_swarm.py);
- `big-records`: signed records of 1.5 MB under the run's lease key, one a second;
- `junk-subkeys`: 50 small signed lease-shaped records a second under the run's lease key, each
  under a subkey of its own (a node keeps 64 of one writer's; a closed run's nodes none);
- `push-flood`: 1 MiB of junk pushed into every honest peer's inbox, 8 pushes at once, again and again;
- `stalled-pushes`: push streams that send one byte and stall, 32 at a time to every honest peer.

Every run starts the same extra DHT node (idle without an attack), so the comparison is of the
attack, not of one more process on the machine. `--closed` makes the run a closed one (every
volunteer joins with an invite of its own): the attacker is then a stranger to it.

    python scripts/bench_attack.py [--peers 3] [--rounds 12] [--closed] [--attacks records big-records junk-subkeys ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.local_swarm import LocalSwarm, PeerProcess, tree_fds, tree_pss  # noqa: E402
from swarm import dht_io  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.keys import RunKeys  # noqa: E402
from swarm.schemas import LeaseRecord  # noqa: E402
from tests.harness import last, write_config  # noqa: E402
from tests.test_swarm import _attack_once  # noqa: E402

ATTACKS = ("records", "big-records", "junk-subkeys", "push-flood", "stalled-pushes")


class Attacker:
    """A stranger's DHT node and blob transport, and one volley of the attack named."""

    def __init__(self, maddrs: list[str], keys: RunKeys):
        import hivemind

        from peers.node import install_signing
        from swarm.transport import BlobServer

        self.keys, self.identity = keys, Identity()
        self.dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        install_signing(self.dht, self.identity)
        self.server = BlobServer(self.dht, namespace=keys.run_id)
        self.server.inbox.admits = lambda sender: False
        self.pending: list = []

    def volley(self, attack: str, round_: int, victims: list[str]) -> None:
        if attack == "records":
            _attack_once(self.dht, self.identity, self.keys, round_, victims[0])
        elif attack == "big-records":
            now, pad = time.time(), "x" * (3 << 19)
            head = round_ % 3
            self.dht.store(self.keys.leases, {"head": head, "claimed_at": now, "pad": pad}, now + 1e4,
                           subkey=self.identity.subkey(str(head)))
            dht_io.store(self.dht, self.keys.leases, self.identity, LeaseRecord(head=0, claimed_at=now), now + 10, tag="0")
        elif attack == "junk-subkeys":
            now = time.time()
            for i in range(50):
                dht_io.store(self.dht, self.keys.leases, self.identity, LeaseRecord(head=0, claimed_at=now), now + 600,
                             tag=f"junk{round_}-{i}-{time.monotonic_ns()}", wait=False)
        elif attack == "push-flood":
            junk = os.urandom(1 << 20)
            for victim in victims:
                self.pending += [asyncio.run_coroutine_threadsafe(self._push(victim, junk), self.server._loop)
                                 for _ in range(8)]
        elif attack == "stalled-pushes":
            for victim in victims:
                self.pending += [asyncio.run_coroutine_threadsafe(self._stall(victim), self.server._loop)
                                 for _ in range(32)]
        self.pending = [f for f in self.pending if not f.done()]

    async def _push(self, victim: str, data: bytes) -> None:
        try:
            await asyncio.wait_for(self.server._push(victim, data), 30)
        except Exception:
            pass  # refused: the defence

    async def _stall(self, victim: str) -> None:
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2

        from swarm.transport import _BlobServicer

        async def one_byte():
            yield runtime_pb2.ExpertRequest(metadata=b"x")
            await asyncio.sleep(120)

        try:
            stub = _BlobServicer.get_stub(self.server._p2p, PeerID.from_base58(victim), namespace=self.keys.run_id)
            await asyncio.wait_for(stub.rpc_push(one_byte()), 120)
        except Exception:
            pass

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.server.shutdown()
        self.dht.shutdown()


def run(workdir: Path, peers: int, rounds: int, attack: str | None, closed: bool = False) -> dict:
    from peers.invites import make_invite

    workdir.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(workdir, write_config(workdir / "run.yaml", heads=peers, merge_every=2, rounds=rounds,
                                             min_heads=peers, closed=closed))
    stop, attacker = threading.Event(), None
    growth = {"rss": 0, "fds": 0, "who": "-"}
    try:
        coordinator = swarm.start_coordinator()

        def invite(i: int) -> list[str]:  # a bearer invite of its own for each volunteer of a closed run
            if not closed:
                return []
            make_invite(workdir / "run", None, 1.0, workdir / f"invite{i}.json")
            return ["--invite", str(workdir / f"invite{i}.json")]

        procs = [swarm.join(f"peer{i}", "--throttle", "0.1", *invite(i)) for i in range(peers - 1)]
        for p in procs:
            p.wait_for(lambda es: any(e["event"] == "joined" for e in es), 120, "joining")
        procs.append(swarm.join(f"peer{peers - 1}", "--throttle", "0.1", "--client-mode", *invite(peers - 1)))
        coordinator.wait_for(lambda es: any(e["event"] == "round" and e["new_round"] >= 2 for e in es), 300, "round 2")
        attacker = Attacker(swarm.maddrs, RunKeys(swarm.run_id))
        honest: list[PeerProcess] = [coordinator, *procs]
        victims = [last(coordinator, "started")["p2p"]] + [last(p, "joined")["p2p"] for p in procs[:-1]]
        before = {p.name: (tree_pss(p.handle.pid), tree_fds(p.handle.pid)) for p in honest}

        def hammer():
            while not stop.is_set():
                if attack is not None:
                    done = [e["new_round"] for e in coordinator.of("round")]
                    attacker.volley(attack, max(done, default=0), victims)
                for p in honest:
                    if p.handle.poll() is None:
                        rss0, fds0 = before[p.name]
                        grew = tree_pss(p.handle.pid) - rss0
                        if grew > growth["rss"]:
                            growth["rss"], growth["who"] = grew, p.name
                        growth["fds"] = max(growth["fds"], tree_fds(p.handle.pid) - fds0)
                stop.wait(1.0)

        threading.Thread(target=hammer, daemon=True).start()
        for p in procs:
            p.wait(rounds * 60)
        coordinator.wait(120)
    finally:
        stop.set()
        if attacker is not None:
            attacker.close()
        swarm.close()
    events = [e for e in coordinator.of("round") if e["new_round"] >= 2]
    minutes = (events[-1]["time"] - events[0]["time"]) / 60
    short = [e["round"] for e in events if len(e["members"]) != peers]
    everyone = not short
    agree = len({last(p, "left")["digest"] for p in (*procs, coordinator)}) == 1
    return {"rate": (len(events) - 1) / minutes, "rounds": len(events) - 1, "everyone": everyone, "short": short,
            "agree": agree,
            "rss": growth["rss"], "who": growth["who"], "fds": growth["fds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=3, help="volunteers, one head each; the last behind NAT")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--closed", action="store_true", help="a closed run: every volunteer invited, the attacker not")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lte-attack-") as tmp:
        for name in (None, *args.attacks):
            label = name or "none"
            print(f"running: {label} ...", file=sys.stderr, flush=True)
            results[label] = run(Path(tmp) / label, args.peers, args.rounds, name, args.closed)
    base = results["none"]["rate"]
    print(f"{args.peers} peers x 1 head on loopback (the last behind NAT), rounds 2..{args.rounds}, merge every 2 steps, "
          f"{'closed' if args.closed else 'open'} run")
    print(f"{'attack':<16}{'rounds/min':>11}{'vs none':>9}{'all merged':>12}{'agree':>7}{'RSS +MB':>9}{'(who)':>13}"
          f"{'fds +':>7}")
    for name, r in results.items():
        print(f"{name:<16}{r['rate']:>11.1f}{r['rate'] / base:>9.0%}{str(r['everyone']):>12}{str(r['agree']):>7}"
              f"{r['rss'] / 1e6:>9.0f}{r['who']:>13}{r['fds']:>7d}")
    for name, r in results.items():
        if r["short"]:
            print(f"{name}: rounds {r['short']} merged fewer than all {args.peers} peers")
    rates = [r["rate"] / base for n, r in results.items() if n != "none"]
    if rates:
        print(f"lowest rate under attack: {min(rates):.0%} of the attack-free run's (median {statistics.median(rates):.0%})")


if __name__ == "__main__":
    main()
