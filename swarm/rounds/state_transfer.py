"""This peer's W and its round, handed out to newcomers and taken from donors.

A peer that can be reached announces itself as a donor of W at its round; a newcomer, a peer that
fell behind, or one whose merge differs from the agreed one downloads the trusted W
(`Agreement.trusted_state`) from a donor, accepting only state that hashes to the trusted digest; a
peer a round or two behind first tries to replay the rounds it missed from their reduced parts
(`replay`), a fraction of W's bytes.
W and the round only change through `changing`, which bumps a version around the change: what is
cached for a version (the encoded state every donor hands out, the digest it advertises) is never
given out for another W."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from swarm import dht_io
from swarm.errors import UnverifiedState
from swarm.rounds.agreement import Agreement, agreed_vote
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.replay import REPLAY_ROUNDS, replayed
from swarm.schemas import DonorRecord, HashRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import ContributionError, apply_reduced, decode_state, encode_state

log = logging.getLogger(__name__)

# The slowest download of W that is waited for: 2 Mbit/s (ViT-S/32's 90 MB W: 6 minutes).
STATE_MIN_RATE = 256 * 1024


def state_timeout(request_timeout: float, state_bytes: int) -> float:
    """How long one download of W (at most `state_bytes`) may take: its bytes at STATE_MIN_RATE,
    and the time a small request may take. A bound that ignored W's size would keep every volunteer
    whose link is slower than W's bytes over it out of the run for good (each try cut short and
    begun again)."""
    return request_timeout * 4 + state_bytes / STATE_MIN_RATE


class StateTransfer:
    """This peer's W (in `ctx.model`) at round `round`, and moving it between peers."""

    def __init__(self, ctx: RoundContext, agreement: Agreement, collection: Collection, round_: int = 0):
        self.ctx, self.agreement, self.collection = ctx, agreement, collection
        self.round = round_
        self.version = 0  # bumped whenever W or the round may have changed
        self._announced = ((-1, -1), float("-inf"))  # ((W version, round), monotonic time) of our last donor record
        self._digest: tuple[int, str] = (-1, "")  # (W version, its digest): see `w_digest`
        self._state_blob: tuple[int, bytes] | None = None
        self.bytes_downloaded = 0  # W fetched from donors (none when we already held it)
        self.downloads = 0  # ... in how many downloads
        self.rounds_replayed = 0  # rounds taken from their reduced parts instead (`replay`)
        self.rounds_verified = 0  # rounds a resumed coordinator recomputed from their contributions (`verify`)
        # Whether a resumed coordinator that cannot recompute the rounds the swarm merged without it
        # takes the W most lease holders hold anyway (the operator's word), or stops (`verify`).
        self.adopt_unverified = False
        ctx.server.publish(ctx.keys.state_blob, self.encoded)

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Around any change of W or the round: the version moves before and after, so that
        whatever read the version first and then W never takes a W in change for a settled one."""
        self.version += 1
        try:
            yield
        finally:
            self.version += 1

    def encoded(self) -> bytes:
        """W as handed out to newcomers, encoded once per version of W: anyone may ask for it, and
        asking again and again must cost a donor a copy, not an encoding of the whole model. The
        version is read first, so a blob encoded while W changed is never served as the new one."""
        version = self.version
        cached = self._state_blob
        if cached is not None and cached[0] == version:
            return cached[1]
        blob = encode_state(self.ctx.model, self.round)
        self._state_blob = (version, blob)
        return blob

    def w_digest(self) -> str:
        """Our W's digest, hashed once per version of W: the donor record and the peer's status
        record both say it, and hashing all of W each time would take its time from training. As in
        `encoded`, the version is read first, so a hash taken while W changed is never given out
        for the new W."""
        version, cached = self.version, self._digest
        if cached[0] != version:
            cached = self._digest = (version, self.ctx.model.state_digest())
        return cached[1]

    def announce(self) -> None:
        """Tell newcomers we can hand out W at our round; a peer nobody can connect to hands out
        nothing. Callers ask now and then: the record is written again once W changed, or once
        it is a lease old (it lives three), never more often, as every store into the shared
        list of donors moves the whole list."""
        ctx = self.ctx
        if not ctx.reachable:
            return
        now, held = ctx.clock.monotonic(), (self.version, self.round)
        said, at = self._announced
        if said == held and now - at < ctx.cfg.lease_seconds:
            return
        digest = self.w_digest()
        if (self.version, self.round) != held:
            return  # W changed while we hashed it (a renewal runs beside the merge): its changer announces
        self._announced = (held, now)
        record = DonorRecord(round=held[1], digest=digest, p2p=ctx.p2p)
        dht_io.store(ctx.dht, ctx.keys.donors, ctx.identity, record, ctx.clock.now() + 3 * ctx.cfg.lease_seconds)

    def sync(self, min_round: int = 0, replay: bool = True) -> bool:
        """Adopt the trusted W if it is at `min_round` or later: replayed from the missed rounds'
        reduced parts (unless `replay` is False: our W is not our round's agreed one), else from any
        donor advertising it; only state hashing to the trusted digest is accepted."""
        ctx = self.ctx
        target = self.agreement.trusted_state()
        if target is None or target[0] < min_round:
            return False
        if target == (self.round, ctx.model.state_digest()):
            # Already held: W0 is built from the run's seed, so a newcomer at round 0 usually has
            # it bit for bit and need not pull a whole W through anyone's link.
            log.info("W of round %d already held (digest %s): nothing to download", self.round, target[1][:12])
            self.announce()
            return True
        if ctx.is_authority and self.verify(target):
            return True
        if replay and 0 < target[0] - self.round <= REPLAY_ROUNDS and self.replay(target):
            self.announce()
            return True
        donors = self.agreement.donors()
        candidates = sorted(who for who, r in donors.items() if (r.round, r.digest) == target)
        if len(candidates) > 1:  # spread newcomers over the donors instead of all hitting one
            shift = ctx.spread(len(candidates))
            candidates = candidates[shift:] + candidates[:shift]
        # the coordinator and the lease holders first: a stranger may advertise the right digest
        holders = set(ctx.holders().values())
        candidates.sort(key=lambda who: (who != ctx.authority, who not in holders))
        return self.fetch([donors[c].p2p for c in candidates], *target)

    def replay(self, target: tuple[int, str], agreed: HashRecord | None = None) -> bool:
        """Move our W round by round to `target` (round, digest), adding what each missed round
        added as its members did (`replay.replayed`), while the coordinator's decision on the round
        (for our own round: `agreed`, if given) is known and what we fetch adds up to it. Whether we
        reached the target; a round replayed stays (it is the decided W of the next round), the rest
        is downloaded."""
        ctx = self.ctx
        while self.round < target[0]:
            r = self.round
            decision = agreed if agreed is not None and agreed.round == r else self.agreement.decided(r)
            totals = None if decision is None else replayed(ctx, self.collection, r, decision)
            if totals is None:
                return False
            with self.changing(), ctx.model.lock:
                apply_reduced(ctx.model, totals)
                self.round = r + 1
            self.rounds_replayed += 1
            log.info("took round %d from its reduced parts (%d contributions)", r, len(decision.members))
        return self.w_digest() == target[1]

    def verify(self, target: tuple[int, str]) -> bool:
        """A resumed coordinator behind the swarm (`target`: what most lease holders hold): recompute
        each round it missed from its members' contributions, with its own checks and clip, and
        keep the result only where it hashes to what the holders voted for the round. A majority of
        holders is no proof (while the coordinator was down, two colluding owners could make every
        peer apply a forged part), so a round that cannot be recomputed (its contributions are gone,
        or they do not add up to the holders' W) stops the coordinator, unless its operator chose to
        adopt the holders' W (`adopt_unverified`: then it is downloaded as a peer would)."""
        ctx, began = self.ctx, self.round
        while self.round < target[0]:
            r = self.round
            votes = {who: v for who, v in self.agreement.votes(r).items() if who not in (ctx.authority, ctx.peer)}
            decision = agreed_vote(votes) if votes else None
            totals = None if decision is None else replayed(ctx, self.collection, r, decision, recompute=True)
            if totals is None:
                break
            with self.changing(), ctx.model.lock:
                apply_reduced(ctx.model, totals)
                self.round = r + 1
            self.rounds_verified += 1
            log.info("recomputed round %d from its %d contributions: it is what the holders hold", r,
                     len(decision.members))
        if (self.round, self.w_digest()) == tuple(target):
            self.announce()
            return True
        if not self.adopt_unverified:
            raise UnverifiedState(
                f"the swarm went on from round {began} to round {target[0]} without the coordinator, and round "
                f"{self.round} cannot be recomputed from its contributions (gone, or not adding up to what the lease "
                f"holders hold); to take the holders' W on trust, start again with --adopt-swarm-state")
        log.warning("adopting the W most lease holders hold at round %d, unverified, as asked", target[0])
        return False

    def timeout(self) -> float:
        ctx = self.ctx
        return state_timeout(ctx.cfg.request_timeout, round(ctx.max_state_bytes * ctx.wire_scale.get("state", 1.0)))

    def fetch(self, addresses: list[str], round_: int, digest: str) -> bool:
        """W of `round_` hashing to `digest`, from the first of `addresses` that hands it out."""
        ctx = self.ctx
        for address in addresses:
            ctx.clock.check()
            ctx.keep_alive()
            try:
                blob = ctx.server.fetch(address, ctx.keys.state_blob, self.timeout(), ctx.max_state_bytes)
                with self.changing(), ctx.model.lock:  # not under a training step running beside us (swarm.overlap)
                    self.round = decode_state(blob, ctx.model, expect_digest=digest, expect_round=round_)
                self.bytes_downloaded += len(blob)
                self.downloads += 1
                log.info("synced W of round %d from %s (%.1f MB)", self.round, address[-8:], len(blob) / 2**20)
                self.announce()
                return True
            except NETWORK_ERRORS + (ContributionError,) as exc:
                log.warning("could not sync from %s: %s", address[-8:], exc)
        return False
