"""What `lte-swarm status` shows: one snapshot of a run, read from the DHT as plain JSON-able data."""

from __future__ import annotations

import statistics
from typing import Any

from swarm import dht_io
from swarm.clock import Clock
from swarm.config import RunConfig
from swarm.keys import RunKeys
from swarm.leases import HeadLeases
from swarm.membership import Membership
from swarm.dht_io import read_statuses
from swarm.schemas import DonorRecord, PeerPhase, RunProgress

HEAD_STATES = ("free", "leased", "training", "merging", "merged", "orphaned")


def head_state(holder: str | None, status: dict | None, round_: int) -> str:
    """free: nobody holds it; orphaned: its holder's lease lives but its status expired (it likely
    crashed); merging: the holder is in a merge round; merged: the holder's last contribution is in
    the latest merge and it trains the next round; training: it trains unmerged work; leased: held,
    not training yet."""
    if holder is None:
        return "free"
    if status is None:
        return "orphaned"
    if status["state"] in (PeerPhase.MERGING, PeerPhase.WAITING):
        return "merging"
    if status["state"] == PeerPhase.TRAINING:
        return "merged" if status["last_merged_round"] == round_ - 1 else "training"
    return "leased"


def snapshot(dht, keys: RunKeys, cfg: RunConfig, clock: Clock | None = None) -> dict[str, Any]:
    clock = clock or Clock()
    now = clock.now()
    membership = Membership(dht, keys, cfg.swarm, clock)
    records = sorted((s for s in read_statuses(dht, keys, now) if membership.admits(s.peer)),
                     key=lambda s: (-len(s.heads), s.peer))
    statuses = [s.model_dump(mode="json") for s in records]
    by_peer = {s["peer"]: s for s in statuses}
    leases = HeadLeases(dht, keys, None, cfg.lte.heads, cfg.swarm.lease_seconds, cfg.swarm.settle_seconds, clock,
                        max_per_holder=cfg.swarm.max_heads_per_peer)
    leases.admits = membership.admits
    holders = leases.holders()
    progress = dht_io.by_writer(dht_io.read(dht, keys.progress, RunProgress, now)).get(keys.coordinator)
    donors = list(dht_io.by_writer(dht_io.read(dht, keys.donors, DonorRecord, now)).values())
    round_ = max([progress.round if progress else 0] + [d.round for d in donors] + [s["round"] for s in statuses])

    heads = []
    for h in range(cfg.lte.heads):
        holder = holders.get(h)
        heads.append({"head": h, "peer": holder, "state": head_state(holder, by_peer.get(holder), round_)})
    current = [s for s in statuses if s["round"] == round_ and s["state"] != PeerPhase.SYNCING]
    digests = sorted({s["digest"] for s in current})
    history = [h.model_dump() for h in progress.history] if progress else []
    eta = None
    if len(history) >= 2 and round_ < cfg.rounds:
        gaps = [b["time"] - a["time"] for a, b in zip(history[-6:], history[-5:])]
        eta = max(0.0, history[-1]["time"] + statistics.mean(gaps) - now)
    return {
        "run_id": keys.run_id,
        "model": cfg.model.name,
        "heads_total": cfg.lte.heads,
        "rank": cfg.lte.rank,
        "merge_every": cfg.lte.merge_every,
        "storage": cfg.lte.storage,
        "round": round_,
        "rounds_total": cfg.rounds,
        "samples": progress.samples if progress else 0,
        "eta_next_merge": eta,
        "heads": heads,
        "peers": statuses,
        "history": history,
        "agree": len(digests) <= 1 if current else None,
        "digests": digests,
        "bytes_sent": sum(s["bytes_sent"] for s in statuses),
        "bytes_received": sum(s["bytes_received"] for s in statuses),
        "time": now,
    }
