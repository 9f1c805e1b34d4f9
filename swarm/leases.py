"""Head leases: which peer trains which of the run's N heads.

The DHT has no compare-and-set, so a claim is a record under the run's lease key with the claimant
as subkey. After a settle delay every peer reads all claims back and applies the same rule: among a
head's live, unreleased claims the earliest `claimed_at` wins, then the smaller peer id. Losers pick
another head. Holders renew before expiry (keeping their original `claimed_at`); a crashed holder's
claim expires and the head is free again.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

from hivemind.utils import get_dht_time

from swarm import schemas
from swarm.keys import RunKeys
from swarm.schemas import LeaseRecord

log = logging.getLogger(__name__)


def winners(claims: list[LeaseRecord]) -> dict[int, str]:
    """head -> holding peer, by the deterministic rule (earliest claim, then smaller peer id)."""
    best: dict[int, LeaseRecord] = {}
    for c in claims:
        if c.released:
            continue
        cur = best.get(c.head)
        if cur is None or (c.claimed_at, c.peer) < (cur.claimed_at, cur.peer):
            best[c.head] = c
    return {h: c.peer for h, c in best.items()}


class HeadLeases:
    def __init__(self, dht, keys: RunKeys, peer: str, n_heads: int, lease_seconds: float, settle_seconds: float,
                 sleep: Callable[[float], None] = time.sleep):
        self.dht, self.keys, self.peer, self.n_heads = dht, keys, peer, n_heads
        self.lease_seconds, self.settle_seconds = lease_seconds, settle_seconds
        self.sleep = sleep
        self.held: dict[int, float] = {}  # head -> our claimed_at
        self.renewed_at = 0.0

    def claims(self) -> list[LeaseRecord]:
        records = schemas.read(self.dht, self.keys.leases, LeaseRecord)
        # A claim is only believed for the head and peer its subkey names: nobody claims for others.
        return [r for sub, (r, _) in records.items() if sub == RunKeys.lease_subkey(r.head, r.peer) and r.head < self.n_heads]

    def holders(self) -> dict[int, str]:
        return winners(self.claims())

    def free_heads(self) -> list[int]:
        taken = self.holders()
        return [h for h in range(self.n_heads) if h not in taken]

    def _write(self, head: int, claimed_at: float, released: bool = False) -> None:
        record = LeaseRecord(head=head, peer=self.peer, claimed_at=claimed_at, released=released)
        expiration = get_dht_time() + self.lease_seconds + (1.0 if released else 0.0)
        schemas.store(self.dht, self.keys.leases, RunKeys.lease_subkey(head, self.peer), record, expiration)

    def claim(self, count: int, prefer: list[int] | None = None) -> list[int]:
        """Try to hold `count` more heads; returns the heads won in this attempt (maybe none)."""
        free = [h for h in (prefer or self.free_heads()) if h not in self.held]
        if not free:
            return []
        if prefer is None:  # spread concurrent claimants over the free heads
            random.Random(f"{self.peer}/{time.time_ns()}").shuffle(free)
        wanted = free[:count]
        now = get_dht_time()
        for head in wanted:
            self._write(head, now)
        self.sleep(self.settle_seconds)
        holders = self.holders()
        won = [h for h in wanted if holders.get(h) == self.peer]
        for head in wanted:
            if head in won:
                self.held[head] = now
            else:
                self._write(head, now, released=True)
        self.renewed_at = get_dht_time()
        if won:
            log.info("holding heads %s", sorted(won))
        return won

    def due(self) -> bool:
        return bool(self.held) and get_dht_time() - self.renewed_at > self.lease_seconds / 3

    def renew(self) -> list[int]:
        """Extend our leases; returns heads we turned out to have lost (to an earlier claim)."""
        for head, claimed_at in self.held.items():
            self._write(head, claimed_at)
        self.renewed_at = get_dht_time()
        holders = self.holders()
        lost = [h for h in self.held if holders.get(h, self.peer) != self.peer]
        for head in lost:
            log.warning("lost head %d to %s (an earlier claim)", head, holders[head][-8:])
            self.held.pop(head)
        return lost

    def release(self) -> None:
        for head, claimed_at in list(self.held.items()):
            try:
                self._write(head, claimed_at, released=True)
            except Exception as exc:  # leaving must not fail: the lease expires anyway
                log.warning("could not release head %d: %s", head, exc)
        self.held.clear()
