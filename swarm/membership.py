"""Who may take part in a closed run.

An open run admits any signing key. A closed run admits the keys its config lists (the config is
part of the run record the coordinator signs) and any key holding an invite: the coordinator's
signature over the run id, the member's key fingerprint and an expiry time. The member publishes
its invite under its own subkey (a `MemberRecord`, which also names its libp2p peer id: the
member's signature binds its key to the peer id the transport authenticates); every node checks it
against the coordinator fingerprint that the run id pins, so a stranger can neither forge an invite
nor use someone else's (the record's writer must be the member it names). Listed members and the
coordinator publish the same record without an invite.

The coordinator can revoke a member (`lte-swarm revoke`): it publishes the revoked fingerprints
in a record of its own, and every node that reads it (every READ_EVERY seconds) stops admitting
them, invited or listed, for as long as it runs. In a run that redoes rounds (`swarm.verify_rate`)
it revokes a key itself, in an open run too, when a contribution of that key's did not reproduce
(`peers.verify`); other open runs never read revocations.

Admission is enforced where it decides anything: a key that is not admitted never wins a head
lease (`HeadLeases.admits`), so it can neither contribute nor vote, and the status view does not
list it; a peer id no member bound is served no blob (`admits_peer`); and the nodes store no
record a non-member wrote (`swarm.admission`). Sybil keys, free to make in an open run, are what a
closed run keeps out.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from swarm import dht_io
from swarm.clock import Clock
from swarm.config import SwarmConfig
from swarm.errors import ConfigError
from swarm.identity import Identity, fingerprint, verify
from swarm.keys import RunKeys
from swarm.schemas import InviteRecord, MemberRecord, RevocationRecord

log = logging.getLogger(__name__)

READ_EVERY = 5.0          # seconds between reads of the run's invites, when an unknown key asks
FRESH_READ_EVERY = 0.5    # ... when it asks with a record written after our last read
PEER_READ_EVERY = 2.0     # ... when a peer id no member bound asks for a blob
PUBLISH_EVERY = 600.0     # a member re-publishes its invite this often (its record lives twice as long)
MAX_CHECKED = 10_000      # signature checks remembered; strangers' invites cannot grow it without bound


def _payload(run_id: str, member: str, expires: int) -> bytes:
    return f"lte-swarm invite v1\n{run_id}\n{member}\n{expires}".encode()


def sign_invite(authority: Identity, run_id: str, member: str, expires: int) -> InviteRecord:
    """An invite to run `run_id` for the key with fingerprint `member`, valid until `expires`."""
    return InviteRecord(run_id=run_id, member=member, expires=int(expires), authority=authority.owner.decode(),
                        signature=authority.sign(_payload(run_id, member, int(expires))))


def invite_problem(invite: InviteRecord, keys: RunKeys, now: float) -> str | None:
    """What makes `invite` worthless for run `keys`, or None if it admits its member."""
    if invite.run_id != keys.run_id:
        return f"it is an invite to run {invite.run_id}, not to {keys.run_id}"
    if invite.expires < now:
        return f"it expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(invite.expires))}"
    if fingerprint(invite.authority.encode()) != keys.coordinator:
        return "it is not signed with the key of the coordinator this run id names"
    if not verify(invite.authority.encode(), _payload(invite.run_id, invite.member, invite.expires), invite.signature):
        return "its signature does not match its content"
    return None


def admitted_until(record: MemberRecord, writer: str, keys: RunKeys, listed: set[str] | frozenset[str],
                   now: float) -> float | None:
    """Until when `record`, written by the key with fingerprint `writer`, admits that key to run
    `keys` (infinity for the coordinator and the keys the config lists), or None if it does not:
    an invite must be valid and name its writer."""
    if writer in listed or writer == keys.coordinator:
        return math.inf
    invite = record.invite
    if invite is None or invite.member != writer or invite_problem(invite, keys, now) is not None:
        return None
    return float(invite.expires)


class Membership:
    """One node's view of who a run admits; for a member, also its own invite to publish."""

    def __init__(self, dht, keys: RunKeys, cfg: SwarmConfig, clock: Clock | None = None,
                 invite: InviteRecord | None = None, p2p: str = ""):
        self.dht, self.keys, self.clock = dht, keys, clock or Clock()
        self.p2p = p2p or str(getattr(dht, "peer_id", ""))
        self.closed = cfg.closed
        # Revocations count in a closed run, and in any run that redoes rounds, whose coordinator
        # revokes a key whose contribution did not reproduce; other open runs never read them.
        self.revocable = cfg.closed or cfg.verify_rate > 0
        self.listed = {keys.coordinator, *cfg.members}
        self.invite = invite
        self._until: dict[str, float] = {}        # member -> expiry of its verified invite
        self._checked: dict[tuple[str, MemberRecord], float | None] = {}  # verdicts, so each invite is checked once
        self._bound: dict[str, str] = {}          # member -> the peer id its latest record binds
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._read_time = float("-inf")  # DHT time of our last read
        self._published_at = float("-inf")
        self.revoked: set[str] = set()  # grows only: a revocation read once holds while this node runs
        self._revocations_read_at = float("-inf")

    def admits(self, who: str, written_at: float | None = None) -> bool:
        """Whether the key with fingerprint `who` may hold heads in this run. `written_at`: when the
        record it asks with (a head claim) was written. A member publishes its invite before its
        first claim, so a claim written after our last read of the invites makes us read them
        again soon (a node that kept the old view would leave a newcomer out of rounds that the
        others merge it into); a key without one waits for the slower schedule."""
        if who == self.keys.coordinator:
            return True
        self._read_revocations()
        if who in self.revoked:
            return False
        if not self.closed or who in self.listed:
            return True
        now = self.clock.now()
        if self._until.get(who, -1) < now:
            since = self.clock.monotonic() - self._read_at
            fresh = written_at is not None and written_at >= self._read_time
            if since >= READ_EVERY or (fresh and since >= FRESH_READ_EVERY):
                self._read(now)
        return self._until.get(who, -1) >= now

    def _read_revocations(self) -> None:
        """The coordinator's list of revoked members, at most every READ_EVERY seconds."""
        if not self.revocable or self.clock.monotonic() - self._revocations_read_at < READ_EVERY:
            return
        self._revocations_read_at = self.clock.monotonic()
        records = dht_io.by_writer(dht_io.read(self.dht, self.keys.revocations, RevocationRecord, self.clock.now()))
        found = records.get(self.keys.coordinator)
        if found is not None and not set(found.revoked) <= self.revoked:
            log.info("revoked members: %s", ", ".join(sorted(set(found.revoked) - self.revoked)))
            self.revoked |= set(found.revoked)

    def admits_peer(self, peer_id: str) -> bool:
        """Whether the node with libp2p peer id `peer_id` belongs to an admitted member (or the
        coordinator) of this run: only such nodes are served blobs in a closed run. A peer id
        nobody bound makes us read the members again, at most every PEER_READ_EVERY seconds (a
        newcomer asks for W right after publishing its record)."""
        if not self.closed:
            return True
        who = self._member_at(peer_id)
        if who is None and self.clock.monotonic() - self._read_at >= PEER_READ_EVERY:
            self._read(self.clock.now())
            who = self._member_at(peer_id)
        return who is not None and self.admits(who)

    def _member_at(self, peer_id: str) -> str | None:
        return next((who for who, bound in list(self._bound.items()) if bound == peer_id), None)

    def _read(self, now: float) -> None:
        with self._lock:
            self._read_at, self._read_time = self.clock.monotonic(), now
            if len(self._checked) > MAX_CHECKED:
                self._checked.clear()
            for (tag, writer), (record, _) in dht_io.read(self.dht, self.keys.members, MemberRecord, now).items():
                if tag:
                    continue
                if (writer, record) not in self._checked:
                    self._checked[(writer, record)] = admitted_until(record, writer, self.keys, self.listed, now)
                until = self._checked[(writer, record)]
                if until is None or until < now:
                    continue
                self._bound[writer] = record.p2p
                if until > self._until.get(writer, -1):
                    self._until[writer] = until

    def check_member(self, identity: Identity) -> None:
        """Before joining: a ConfigError saying what to do unless `identity` is admitted (not revoked;
        in a closed run, also listed or invited)."""
        self._read_revocations()
        if identity.fingerprint in self.revoked:
            raise ConfigError(f"the coordinator of run {self.keys.run_id} revoked key {identity.fingerprint}")
        if not self.closed or identity.fingerprint in self.listed:
            return
        if self.invite is None:
            raise ConfigError(f"run {self.keys.run_id} is closed: ask its coordinator for an invite "
                              "(`lte-swarm invite`) and join with --invite FILE")
        problem = invite_problem(self.invite, self.keys, self.clock.now())
        if problem is not None:
            raise ConfigError(f"the invite cannot be used: {problem}; ask the coordinator for a new one")
        if self.invite.member != identity.fingerprint:
            raise ConfigError(f"the invite is for key {self.invite.member}, but this peer signs with "
                              f"{identity.fingerprint}; pass the key it was made for with --signing-key")

    def publish(self, identity: Identity) -> None:
        """Keep our member record (our peer id, and our invite if the config does not list us) in
        the DHT of a closed run (rate-limited: call it as often as convenient)."""
        if not self.closed or self.clock.monotonic() - self._published_at < PUBLISH_EVERY:
            return
        listed = identity.fingerprint in self.listed
        if not listed and self.invite is None:
            return
        self._published_at = self.clock.monotonic()
        expiration = self.clock.now() + 2 * PUBLISH_EVERY
        if not listed:
            expiration = min(float(self.invite.expires), expiration)
        record = MemberRecord(p2p=self.p2p, invite=None if listed else self.invite)
        dht_io.store(self.dht, self.keys.members, identity, record, expiration)
