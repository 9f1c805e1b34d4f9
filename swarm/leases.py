"""Head leases: which peer trains which of the run's N heads.

The DHT has no compare-and-set, so a claim is a record under the run's lease key, in the
claimant's own signed subkey (nobody can claim, renew or release for another). After a settle
delay every peer reads all claims back and applies the same rule: among a head's live, unreleased
claims the earliest `claimed_at` wins, then the smaller fingerprint. Losers pick another head.
Holders renew before expiry (keeping their original `claimed_at`); a crashed holder's claim
expires and the head is free again. A claim dated in the future (beyond the clock skew a run
allows) or expiring later than a lease can last is ignored: it would win every head for good.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

from swarm import dht_io
from swarm.clock import Clock
from swarm.identity import Identity
from swarm.keys import RunKeys
from swarm.schemas import LeaseRecord

log = logging.getLogger(__name__)

CACHE_SECONDS = 0.5


def winners(claims: list[tuple[str, LeaseRecord]], incumbents: dict[int, str] | None = None,
            max_per_holder: int | None = None) -> dict[int, str]:
    """head -> holder, by the deterministic rule: the head's incumbent (whose work on it was merged
    in the latest round) while its claim lives, else the earliest claim, then the smaller
    fingerprint. Incumbency is what keeps a claim dated far in the past from taking heads that
    others are training. No holder gets more than `max_per_holder` heads, whatever its own code
    claims: heads are given out best claim first (by that rank, then head), and a head whose best
    claimant is full goes to its next claimant. Every reader sees the same claims the same way,
    so all agree on who holds what."""
    incumbents = incumbents or {}
    ranked = sorted(((incumbents.get(c.head) != who, c.claimed_at, who, c.head) for who, c in claims
                     if not c.released))
    out: dict[int, str] = {}
    held: dict[str, int] = {}
    for _, _, who, head in ranked:
        if head in out or (max_per_holder is not None and held.get(who, 0) >= max_per_holder):
            continue
        out[head] = who
        held[who] = held.get(who, 0) + 1
    return out


class HeadLeases:
    """One node's view of the leases, and its own claims when it has an identity (a read-only
    view, e.g. the coordinator's or the status view's, has none)."""

    def __init__(self, dht, keys: RunKeys, identity: Identity | None, n_heads: int, lease_seconds: float,
                 settle_seconds: float, clock: Clock | None = None, clock_skew: float = 10.0, read_replicas: int = 0,
                 max_per_holder: int | None = None):
        self.dht, self.keys, self.identity, self.n_heads = dht, keys, identity, n_heads
        self.max_per_holder = max_per_holder  # `swarm.max_heads_per_peer`, enforced by every reader
        self.read_replicas = read_replicas  # DHT nodes a read asks (`swarm.read_replicas`)
        self.peer = identity.fingerprint if identity is not None else ""
        self.lease_seconds, self.settle_seconds, self.clock_skew = lease_seconds, settle_seconds, clock_skew
        self.clock = clock or Clock()
        self.incumbents: Callable[[], dict[int, str]] = dict  # set by the merge protocol that knows them
        # a closed run's membership (`Membership.admits`: who, and when its claim was written)
        self.admits: Callable[..., bool] = lambda who, written_at=None: True
        self._view: tuple[float, dict[int, str], bool] | None = None  # (when, view, thorough)
        self.held: dict[int, float] = {}  # head -> our claimed_at
        self.renewed_at = 0.0
        self.pending: tuple[list[int], float] | None = None  # claims written, not yet settled

    def claims(self, thorough: bool = False) -> list[tuple[str, LeaseRecord]]:
        """(claimant, claim) for every believable claim: its tag names its head, the head exists,
        it is not dated in the future, it does not outlive a lease, and the run admits its writer.
        `thorough`: from every node a claim is stored at, not only the nearest few."""
        now = self.clock.now()
        out = []
        for (tag, who), (r, expiration) in dht_io.read(self.dht, self.keys.leases, LeaseRecord, now,
                                                          replicas=0 if thorough else self.read_replicas).items():
            if (tag == RunKeys.lease_tag(r.head) and r.head < self.n_heads and r.claimed_at <= now + self.clock_skew
                    and expiration <= now + self.lease_seconds + 1.0 + self.clock_skew and self.admits(who, r.claimed_at)):
                out.append((who, r))
        return out

    def holders(self, max_age: float = CACHE_SECONDS, thorough: bool = False) -> dict[int, str]:
        """head -> holder. A view up to `max_age` seconds old is reused: a merge round asks many
        times a second, and every read is a DHT lookup plus a signature check per claim (and
        carries every holder's claim). `thorough` asks for a view read from every node the claims
        are stored at: for a view that decides who is in a round (the nearest nodes alone may be ones
        that just left, or lack a fresh claim). A thorough view serves any ask within `max_age`,
        a plain one only plain asks."""
        now = self.clock.monotonic()
        view = self._view
        if view is None or max_age <= 0 or now - view[0] > max_age or (thorough and not view[2]):
            view = self._view = (now, winners(self.claims(thorough), self.incumbents(), self.max_per_holder), thorough)
        return dict(view[1])

    def free_heads(self) -> list[int]:
        taken = self.holders(max_age=0.0)
        return [h for h in range(self.n_heads) if h not in taken]

    def _write(self, head: int, claimed_at: float, released: bool = False) -> None:
        record = LeaseRecord(head=head, claimed_at=claimed_at, released=released)
        expiration = self.clock.now() + self.lease_seconds + (1.0 if released else 0.0)
        dht_io.store(self.dht, self.keys.leases, self.identity, record, expiration, tag=RunKeys.lease_tag(head))

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
        """Read the claims back and keep the heads the rule gives us; release the others. Who
        holds a head is decided on a thorough view (every node a claim is stored at): a poll of a
        few of them may miss a rival's claim, or be answered empty by nodes placed to do so."""
        if self.pending is None:
            return []
        wanted, now = self.pending
        self.pending = None
        holders = self.holders(max_age=0.0, thorough=True)
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
        holders = self.holders(max_age=0.0)
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
