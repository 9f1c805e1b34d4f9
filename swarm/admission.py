"""What a node of a run keeps in its share of the DHT, decided once, where a record is stored.

hivemind's validators (`swarm.identity`, `swarm.schemas`) decide what is well-formed, and they run
on every read as on every store, so they must not depend on the clock or on what a node has learnt
(hivemind drops a node's whole answer when one entry fails a reader's check). What is worth
keeping does depend on both, and is decided here, by the storing node alone:

- every run: a record may not claim to live longer than any record of a run does (MAX_RECORD_TTL,
  plus the clock skew between nodes), and one writer keeps at most MAX_SUBKEYS_PER_WRITER subkeys
  under one key (what readers look at, `dht_io`). A stranger can no longer park records for days or
  thousands of subkeys of one key at a node;
- a closed run: only its members' records (the coordinator's, the listed keys', and invited keys'
  while their invites last and nobody revoked them). A node serving a closed run is the run's:
  another run cannot share it. A member's record under the run's member key admits its writer at
  once where it is stored (its invite is checked there); a record of a writer the node does not
  know yet is refused and makes the node read the run's members and revocations again, at most
  every REFRESH_EVERY seconds, so a newcomer's next write (a claim is written again until it
  settles) is taken; the node also reads them every REREAD_EVERY seconds while records arrive, so
  a revoked member's records stop being stored within that. A stranger's writes then cost an
  honest node a refused store and, at most every REFRESH_EVERY seconds, one read of the members.
  The member records also bind each member's key to its peer id: a node's routing table keeps
  members' nodes only (hivemind adds whoever calls or answers), and while a node knows few enough
  nodes to store and read at the nearest ones straight away (`dht_io`), it stores at and reads from
  members' nodes only, so a stranger's node placed next to a key is never asked, nor passed through
  by a search (a node it passes over makes it read the members again, at most every REFRESH_EVERY
  seconds: it may be a member that joined since).

The rule runs in the DHT's process (a hivemind node) or on the in-memory network's storage; the
policy is pickled into the former.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Iterable

from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer

from swarm import dht_io
from swarm.config import SwarmConfig
from swarm.identity import owner_of, split_subkey, strip_signature
from swarm.keys import RunKeys
from swarm.membership import admitted_until
from swarm.schemas import MAX_RECORD_TTL, MemberRecord, RevocationRecord, parse

log = logging.getLogger(__name__)

STORE_HORIZON = MAX_RECORD_TTL + 120.0  # seconds ahead a record may expire: the longest TTL, and clock skew
REFRESH_EVERY = 2.0  # seconds between reads of the members when unknown writers knock
REREAD_EVERY = 30.0  # ... and between reads while only known writers store


class StoragePolicy:
    """Which records this node stores for run `run_id` (see the module's docstring)."""

    def __init__(self, run_id: str, closed: bool, listed: Iterable[str]):
        self.keys = RunKeys(run_id)
        self.closed = closed
        self.listed = frozenset({self.keys.coordinator, *listed})
        # the member key as hivemind's storage names it (its DHT id) and as the in-memory one does
        self.members_key = {DHTID.generate(source=self.keys.members).to_bytes(), self.keys.members}
        self.until: dict[str, float] = {}  # invited member -> expiry of its invite
        self.bound: dict[str, str] = {}  # member -> the peer id its latest record names
        self.revoked: set[str] = set()
        self.refused = 0
        self.wants_refresh = False  # an unknown writer was refused since the last read of the members
        self.read_at = float("-inf")  # DHT time of the last read of the members

    def due(self, now: float) -> bool:
        """Whether to read the members and revocations again before long (closed runs only)."""
        return self.closed and (now - self.read_at >= REREAD_EVERY
                                or self.wants_refresh and now - self.read_at >= REFRESH_EVERY)

    def admits(self, writer: str, now: float) -> bool:
        if writer == self.keys.coordinator:
            return True
        return writer not in self.revoked and (writer in self.listed or self.until.get(writer, -1.0) >= now)

    def member_peers(self, now: float) -> set[str] | None:
        """The peer ids this run's admitted members bound, the nodes a closed run stores at and
        reads from; None when nothing restricts them (an open run, or no member known yet)."""
        if not self.closed or not self.bound:
            return None
        return {peer for who, peer in self.bound.items() if self.admits(who, now)}

    def allows(self, key: bytes | str, subkey, value: bytes, expiration: float, now: float, held: Iterable) -> bool:
        """Whether to store `value` under `key`/`subkey` until `expiration`; `held`: the subkeys
        this node already stores under `key`. Runs on every store: an open run's checks compare
        bytes only."""
        owner = owner_of(subkey)
        if owner is None or not expiration <= now + STORE_HORIZON:
            return self._refuse()
        if self.closed:
            tag, writer = split_subkey(subkey)
            if not self.admits(writer, now) and not (key in self.members_key and not tag
                                                      and self._learn_from(writer, value, now)):
                self.wants_refresh = True
                return self._refuse()
        if subkey not in held:
            mine = sum(1 for other in held if isinstance(other, bytes) and other.endswith(owner))
            if mine >= dht_io.MAX_SUBKEYS_PER_WRITER:
                return self._refuse()
        return True

    def _refuse(self) -> bool:
        self.refused += 1
        return False

    def _learn_from(self, writer: str, value: bytes, now: float) -> bool:
        """A member record arriving here admits its writer at once, if its invite is good."""
        try:
            raw = MSGPackSerializer.loads(strip_signature(value))
        except Exception:
            return False
        record = parse(MemberRecord, raw, where="a stored member record")
        return record is not None and self.learn({writer: record}, now, read=False) and self.admits(writer, now)

    def learn(self, members: dict[str, MemberRecord], now: float, revoked: Iterable[str] = (), read: bool = True
              ) -> bool:
        """Take the members' records and the coordinator's revocations (`read`: all of them, as
        read from the DHT at `now`); True if any record admitted its writer."""
        self.revoked |= set(revoked)
        admitted = False
        for writer, record in members.items():
            until = admitted_until(record, writer, self.keys, self.listed, now)
            if until is not None and until >= now:
                admitted = True
                if read or self.bound:  # before a whole read, one record stored here would be all it knows
                    self.bound[writer] = record.p2p
                if until != float("inf"):
                    self.until[writer] = max(self.until.get(writer, -1.0), until)
        if read:
            self.wants_refresh = False
            self.read_at = max(self.read_at, now)
        return admitted

    def learn_found(self, members_found, revocations_found, now: float) -> None:
        """`learn` from what the DHT answered at the run's member and revocation keys."""
        members = dht_io._records(members_found, self.keys.members, MemberRecord, now)
        revocations = dht_io._records(revocations_found, self.keys.revocations, RevocationRecord, now)
        by_coordinator = dht_io.by_writer(revocations).get(self.keys.coordinator)
        self.learn(dht_io.by_writer(members), now, by_coordinator.revoked if by_coordinator is not None else ())


def install_storage_policy(dht, run_id: str, cfg: SwarmConfig) -> None:
    """Make `dht`'s node store by the rule of run `run_id` (every node of a run, once it knows the
    run; a node keeps the first policy it is given)."""
    policy = StoragePolicy(run_id, cfg.closed, cfg.members)
    if hasattr(dht, "run_coroutine"):
        dht.run_coroutine(functools.partial(_install, policy=policy))
    else:
        dht.install_storage_policy(policy)


async def _install(_dht, node, policy: StoragePolicy) -> None:
    """Runs in the DHT's process: every store into this node's storage and cache goes through
    `policy` (hivemind's `rpc_store` and the direct stores of `dht_io` both end in `store_subkey`)."""
    from hivemind.utils import get_dht_time

    protocol = node.protocol
    if getattr(protocol, "lte_storage_policy", None) is not None:
        return
    protocol.lte_storage_policy = policy
    refreshing: list[asyncio.Task] = []

    async def refresh() -> None:
        try:
            members, revocations = await asyncio.gather(
                dht_io._read_nearest(None, node, policy.keys.members, dht_io.STORE_REPLICAS, members_only=False),
                dht_io._read_nearest(None, node, policy.keys.revocations, dht_io.STORE_REPLICAS, members_only=False))
            policy.learn_found(members, revocations, get_dht_time())
            prune()
        except Exception as exc:  # the next store asks again
            log.info("could not read the run's members: %s", exc)

    def prune() -> None:
        """Drop every node no admitted member bound from the routing table."""
        peers = policy.member_peers(get_dht_time())
        table = protocol.routing_table
        for uid, peer_id in list(table.uid_to_peer_id.items()) if peers is not None else ():
            if peer_id.to_base58() not in peers:
                del table[uid]

    update = protocol.update_routing_table

    async def members_only(node_id, peer_id, responded=True):
        """hivemind adds every node that calls this one, or answers it, to the routing table, and
        searches past a k-bucket's worth of nodes go through that table: a closed run keeps its
        members' nodes only, so a stranger can neither be asked to store or find a run's records
        nor sit where a search passes. A node nobody bound makes us read the members again (a
        member may have joined since); one that failed to answer is dropped, whoever it is."""
        peers = policy.member_peers(get_dht_time())
        if responded and peers is not None and peer_id.to_base58() not in peers:
            policy.wants_refresh = True
            maybe_refresh(get_dht_time())
            return
        await update(node_id, peer_id, responded)

    protocol.update_routing_table = members_only

    def maybe_refresh(now: float) -> None:
        if not policy.due(now) or refreshing and not refreshing[0].done():
            return
        policy.read_at = now  # one read at a time, and none again before its time even if it fails
        try:
            refreshing[:] = [asyncio.get_running_loop().create_task(refresh())]
        except RuntimeError:  # no running loop: nothing to schedule on
            pass

    protocol.lte_refresh = maybe_refresh  # also when a read or store passes over a node no member bound
    for storage in (protocol.storage, protocol.cache):
        def gated(key, subkey, value, expiration_time, _storage=storage, _store=storage.store_subkey):
            now = get_dht_time()
            current = _storage.get(key)
            held = [s for s, _ in current.value.items()] if current is not None and hasattr(current.value, "items") else ()
            allowed = policy.allows(key.to_bytes(), subkey, value, expiration_time, now, held)
            maybe_refresh(now)
            return allowed and _store(key, subkey, value, expiration_time)

        storage.store_subkey = gated
