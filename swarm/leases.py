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

from swarm import schemas
from swarm.clock import Clock
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
                 clock: Clock | None = None):
        self.dht, self.keys, self.peer, self.n_heads = dht, keys, peer, n_heads
        self.lease_seconds, self.settle_seconds = lease_seconds, settle_seconds
        self.clock = clock or Clock()
        self.held: dict[int, float] = {}  # head -> our claimed_at
        self.renewed_at = 0.0
        self.pending: tuple[list[int], float] | None = None  # claims written, not yet settled

    def claims(self) -> list[LeaseRecord]:
        records = schemas.read(self.dht, self.keys.leases, LeaseRecord, now=self.clock.now())
        # A claim is only believed for the head and peer its subkey names: nobody claims for others.
        return [r for sub, (r, _) in records.items() if sub == RunKeys.lease_subkey(r.head, r.peer) and r.head < self.n_heads]

    def holders(self) -> dict[int, str]:
        return winners(self.claims())

    def free_heads(self) -> list[int]:
        taken = self.holders()
        return [h for h in range(self.n_heads) if h not in taken]

    def _write(self, head: int, claimed_at: float, released: bool = False) -> None:
        record = LeaseRecord(head=head, peer=self.peer, claimed_at=claimed_at, released=released)
        expiration = self.clock.now() + self.lease_seconds + (1.0 if released else 0.0)
        schemas.store(self.dht, self.keys.leases, RunKeys.lease_subkey(head, self.peer), record, expiration)

    def propose(self, count: int, prefer: list[int] | None = None) -> list[int]:
        """Write claims for up to `count` free heads; `settle()` after `settle_seconds` says which
        were won. Returns the heads claimed (maybe none)."""
        free = [h for h in (prefer or self.free_heads()) if h not in self.held]
        if not free:
            return []
        if prefer is None:  # spread concurrent claimants over the free heads
            random.Random(f"{self.peer}/{self.clock.now()!r}").shuffle(free)
        wanted = free[:count]
        now = self.clock.now()
        for head in wanted:
            self._write(head, now)
        self.pending = (wanted, now)
        return wanted

    def settle(self) -> list[int]:
        """Read the claims back and keep the heads the rule gives us; release the others."""
        if self.pending is None:
            return []
        wanted, now = self.pending
        self.pending = None
        holders = self.holders()
        won = [h for h in wanted if holders.get(h) == self.peer]
        for head in wanted:
            if head in won:
                self.held[head] = now
            else:
                self._write(head, now, released=True)
        self.renewed_at = self.clock.now()
        if won:
            log.info("holding heads %s", sorted(won))
        return won

    def claim(self, count: int, prefer: list[int] | None = None) -> list[int]:
        """Claim and settle in one call (sleeping through the settle delay)."""
        if not self.propose(count, prefer):
            return []
        self.clock.sleep(self.settle_seconds)
        return self.settle()

    def due(self) -> bool:
        return bool(self.held) and self.clock.now() - self.renewed_at > self.lease_seconds / 3

    def renew(self) -> list[int]:
        """Extend our leases; returns heads we turned out to have lost (to an earlier claim).

        A lease that lapsed (we did not renew in time: a stall, a sleeping laptop) may have been
        claimed by another peer meanwhile; renewing it with its old `claimed_at` would take the
        head back from under that peer, so it is claimed anew, with a fresh time, and loses to
        any claim made while it was lapsed."""
        now = self.clock.now()
        lapsed = now - self.renewed_at > self.lease_seconds
        for head in list(self.held):
            if lapsed:
                self.held[head] = now
            self._write(head, self.held[head])
        self.renewed_at = now
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
