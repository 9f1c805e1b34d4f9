"""Swarm tests' helpers: a fast-timing config and event lookups over `peers.local_swarm`."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import psutil
import yaml

from peers.local_swarm import LocalSwarm, PeerProcess
from tests.conftest import ROOT

FAST_SWARM = dict(lease_seconds=6.0, settle_seconds=0.5, merge_grace=3.0, round_timeout=20.0,
                  request_timeout=5.0, poll_seconds=0.1, checkpoint_every=2)


def write_config(path: Path, *, heads: int, merge_every: int, rounds: int, **swarm) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "digits-vit-tiny.yaml").read_text())
    raw["lte"].update(heads=heads, merge_every=merge_every)
    per_head = 8
    raw["train"].update(batch_size=per_head * heads, samples=per_head * heads * merge_every * rounds, eval_every=1,
                        warmup_steps=2)
    raw["model"]["args"].update(depth=2)
    raw["swarm"] = {**FAST_SWARM, **swarm}
    path.write_text(yaml.safe_dump(raw))
    return path


def last(proc: PeerProcess, kind: str) -> dict:
    events = proc.of(kind)
    assert events, f"{proc.name} has no {kind} event:\n{proc.tail()}"
    return events[-1]


def warnings_of(proc: PeerProcess) -> str:
    """The warnings in a process's log: why a round went another way than the test expects."""
    lines = proc.log.read_text().splitlines() if proc.log.exists() else []
    return "\n".join(line for line in lines if " WARN" in line)


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are still running (zombies awaiting a reaper, which
    a container's init may never be, do not count: they hold no resources and run nothing)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone (or not ours to see) between the listing and the look-up
    return members


def wait_group_gone(pgid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def role_groups(events: list[dict]) -> list[int]:
    """The process groups a peer role runs in, from its start event: its own (the peer process)
    and its DHT's (the DHT process and p2pd, kept apart from terminal signals)."""
    start = next(e for e in events if e["event"] in ("joined", "started"))
    return [start["pid"], start["dht_pid"]]


def wait_role_gone(events: list[dict], timeout: float = 10.0) -> list[int]:
    """Processes of a role (peer, DHT process, p2pd) still running after `timeout`."""
    return [pid for group in role_groups(events) for pid in wait_group_gone(group, timeout)]


@contextlib.contextmanager
def rogue_node(swarm: LocalSwarm, volley, every: float = 1.0):
    """A real hivemind node in `swarm`'s DHT, signing with a key of its own, that calls
    `volley(dht, identity)` every `every` seconds until the block ends; yields (dht, identity)."""
    import hivemind

    from peers.node import install_signing
    from swarm.identity import Identity

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=swarm.maddrs)
    identity, stop, thread = Identity(), threading.Event(), None
    try:
        install_signing(dht, identity)

        def loop():
            while not stop.is_set():
                volley(dht, identity)
                stop.wait(every)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        yield dht, identity
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        dht.shutdown()
