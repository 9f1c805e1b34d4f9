"""Whose word counts in a round, and what the swarm agreed: the ready records that make a round's
members, the votes (W digests) that decide its result, the coordinator's progress, and the W a
peer may adopt (`trusted_state`).

Only some signed records count: a ready record from the holder of every head it lists (one
contribution per head) and dated near now; a vote from the coordinator or a lease holder (one per
signed identity). The coordinator's digest is the agreed W; without it, the digest most lease
holders hold."""

from __future__ import annotations

import logging
from collections import Counter

from swarm import dht_io
from swarm.config import SwarmConfig
from swarm.rounds import plan
from swarm.rounds.context import RoundContext
from swarm.schemas import BeaconRecord, DonorRecord, HashRecord, ReadyRecord, RunProgress

log = logging.getLogger(__name__)

# How old a view of the lease holders a round's polls may use (`HeadLeases.holders`): it filters
# whose records count while waiting, and a head changes hands over a settle delay at the fastest.
# Each fresh view is a read of every holder's claim, at every poll it would be most of a round's
# DHT traffic. What decides a round (its close, its members) asks for a thorough view instead.
VIEW_SECONDS = 2.0


def verifiable(cfg: SwarmConfig, rec: ReadyRecord) -> bool:
    """Whether a run whose config `cfg` is merges `rec`: any contribution, or in a run that
    accepts only what it can verify, one whose round can be redone (its starts committed to, and
    served by its writer rather than pushed from behind a NAT)."""
    return cfg.accept_unverifiable or (rec.starts is not None and rec.pushed is None)


class Agreement:
    """One peer's reading of who counts and what was agreed, round by round."""

    def __init__(self, ctx: RoundContext, rounds_total: int | None = None):
        self.ctx = ctx
        self.rounds_total = rounds_total  # no trustworthy state is ever past the run's last round
        # Only a resuming coordinator adopts what most lease holders hold (the swarm went on without
        # it); otherwise the coordinator is the truth and never takes state from anyone.
        self.adopt_holders_state = not ctx.is_authority
        self._incumbents: tuple[int, dict[int, str]] = (-1, {})
        self._agreed_members: tuple[int, list[str]] = (-1, [])

    def donors(self) -> dict[str, DonorRecord]:
        """Who else says it can hand out W, and of which round."""
        ctx = self.ctx
        found = dht_io.by_writer(ctx.read(ctx.keys.donors, DonorRecord, ctx.clock.now()))
        return {who: r for who, r in found.items() if who != ctx.peer}

    def progress(self, thorough: bool = False) -> RunProgress | None:
        """The coordinator's signed account of the run (its latest agreed W), if it is up."""
        ctx = self.ctx
        found = dht_io.by_writer(ctx.read(ctx.keys.progress, RunProgress, ctx.clock.now(), thorough))
        return found.get(ctx.authority)

    def authority_vote(self, r: int, thorough: bool = False) -> HashRecord | None:
        """The coordinator's digest (and contributors) for round r, if it published one."""
        ctx = self.ctx
        votes = dht_io.by_writer(ctx.read(ctx.keys.hashes(r), HashRecord, ctx.clock.now(), thorough))
        vote = votes.get(ctx.authority)
        return vote if vote is not None and vote.round == r else None

    def decided(self, r: int, progress: RunProgress | None = None) -> HashRecord | None:
        """What the coordinator decided for round r: its vote, read from every node it is stored
        at, else the copy its progress record repeats (which newcomers nearer to the vote's key
        cannot hide). None if neither says."""
        vote = self.authority_vote(r, thorough=True)
        if vote is not None:
            return vote
        progress = progress or self.progress()
        repeated = [v for v in (progress.decisions if progress is not None else []) if v.round == r]
        return repeated[0] if repeated else None

    def trusted_state(self) -> tuple[int, str] | None:
        """(round, digest) of the W this peer may adopt: the coordinator's agreed W whenever its
        progress record is live; without it (or for a resuming coordinator), what a strict
        majority of the lease holders advertise. None when nobody trustworthy says anything."""
        if not self.ctx.is_authority:
            progress = self.progress()
            if progress is not None:
                # The coordinator's vote on the round after its progress record (published before
                # it evaluates and records that round) is as trustworthy and often newer.
                vote = self.authority_vote(progress.round)
                if vote is not None:
                    return progress.round + 1, vote.digest
                return progress.round, progress.digest
        if not self.adopt_holders_state:
            return None
        holders = set(self.ctx.holders().values())
        said = Counter((r.round, r.digest) for who, r in self.donors().items()
                       if who in holders and (self.rounds_total is None or r.round <= self.rounds_total))
        if not said:
            return None
        (round_, digest), count = max(said.items(), key=lambda kv: (kv[1], kv[0][0], kv[0][1]))
        return (round_, digest) if 2 * count > len(holders) else None

    def publish_beacons(self, r: int) -> None:
        """The coordinator, beginning round r: its beacon of round r's epoch of owners (`plan.epoch`),
        and in an epoch's last round the next epoch's too, so that a beacon is out before any peer
        settles a round of its epoch, even while the coordinator is still busy with the round
        before. Written again every round, as the nodes nearest to its key change. A beacon is a
        hash of our signature over the epoch: a restarted coordinator publishes the same one."""
        ctx = self.ctx
        for e in sorted({plan.epoch(r, ctx.fragments), plan.epoch(r + 1, ctx.fragments)}):
            seed = ctx.identity.secret_draw(f"{ctx.keys.run_id}|beacon|{e}")
            dht_io.store(ctx.dht, ctx.keys.beacon(e), ctx.identity, BeaconRecord(epoch=e, seed=seed),
                         ctx.expiration(), wait=False)

    def remember(self, r: int, members: list[str]) -> None:
        """The contributors agreed for round r, as this peer merged them."""
        self._agreed_members = (r, list(members))

    def incumbents(self, round_: int) -> dict[int, str]:
        """head -> the identity whose work on it was merged in the round before `round_` (it keeps
        the head while its lease lives; see `leases.winners`). From what we merged ourselves, else
        the agreed vote of that round and its contributors' signed ready records."""
        ctx, r = self.ctx, round_ - 1
        if r < 0:
            return {}
        if self._incumbents[0] == r:
            return self._incumbents[1]
        if self._agreed_members[0] == r:
            members = self._agreed_members[1]
        else:
            vote = self.authority_vote(r) or self.decided(r)  # nobody else's word decides who keeps a head
            members = vote.members if vote is not None else []
        ready = dht_io.by_writer(ctx.read(ctx.keys.ready(r), ReadyRecord, ctx.clock.now()))
        out = {h: who for who in members if who in ready and ready[who].round == r for h in ready[who].heads}
        if members:
            self._incumbents = (r, out)
        return out

    def ready(self, r: int, thorough: bool = False) -> dict[str, ReadyRecord]:
        """Ready records of round r that count: dated near now, from the holder of every head
        they list (so at most one contribution per head), and, in a run that merges only what it
        can verify (`swarm.accept_unverifiable` false), committed to a start its writer serves.
        `thorough`: see `RoundContext.read`;
        its view of the holders may be the one the round's close read a settle delay before. A
        record that a reused view does not back is checked against a fresh view before it is left
        out (a claimant can be ready a few seconds after its claim)."""
        ctx = self.ctx
        cfg, now = ctx.cfg, ctx.clock.now()
        found = dht_io.by_writer(ctx.read(ctx.keys.ready(r), ReadyRecord, now, thorough))
        oldest = now - 3 * cfg.round_timeout
        dated = {who: rec for who, rec in found.items()
                 if rec.round == r and oldest <= rec.ready_at <= now + cfg.clock_skew and verifiable(cfg, rec)}
        holders = ctx.holders(max_age=cfg.settle_seconds + VIEW_SECONDS if thorough else VIEW_SECONDS,
                              thorough=thorough)
        if any(holders.get(h) != who for who, rec in dated.items() for h in rec.heads):
            holders = ctx.holders(max_age=0.0, thorough=True) if thorough else ctx.holders()
        return {who: rec for who, rec in dated.items() if all(holders.get(h) == who for h in rec.heads)}

    def all_ready(self, ready: dict[str, ReadyRecord]) -> bool:
        """Every lease holder is ready: as a view of the holders may be half a second old or read
        from nodes that lack a fresh claim, a thorough one confirms before a round closes early."""
        holders = self.ctx.holders
        return (not (set(holders(max_age=VIEW_SECONDS).values()) - set(ready))
                and not (set(holders(max_age=0.0, thorough=True).values()) - set(ready)))

    def close_window(self, ready: dict[str, ReadyRecord]) -> float:
        """How long a round waits for the others once this peer saw its first ready record."""
        cfg = self.ctx.cfg
        first = min(ready.values(), key=lambda x: x.ready_at)
        train = min(first.train_seconds, cfg.round_timeout)
        return max(cfg.merge_grace, cfg.merge_slack * train)

    def quorum_ready(self, ready: dict[str, ReadyRecord]) -> bool:
        """At least `swarm.close_quorum` of the heads' holders are ready (a view up to
        VIEW_SECONDS old): until then a round's window does not close it, so that the fastest
        peers cannot run ahead of a swarm whose other members spend each round catching up."""
        quorum = self.ctx.cfg.close_quorum
        if quorum <= 0:
            return True
        holders = set(self.ctx.holders(max_age=VIEW_SECONDS).values())
        return len(set(ready) & holders) >= quorum * len(holders)

    def voters(self) -> set[str]:
        """The lease holders (a view up to VIEW_SECONDS old)."""
        return set(self.ctx.holders(max_age=VIEW_SECONDS).values())

    def votes(self, r: int) -> dict[str, HashRecord]:
        """Digests published for round r by those whose vote counts: the coordinator and the
        lease holders, one vote per signed identity."""
        ctx = self.ctx
        voters = self.voters() | {ctx.authority, ctx.peer}
        found = dht_io.by_writer(ctx.read(ctx.keys.hashes(r), HashRecord, ctx.clock.now()))
        return {who: rec for who, rec in found.items() if rec.round == r and who in voters}

    def closed(self, r: int) -> bool:
        """Round r no longer takes contributions: the coordinator or most holders merged it. (Ready
        times do not decide this: a holder could date its records so that every round looks over.)"""
        votes = self.votes(r)
        holders = self.voters()
        holder_votes = len(set(votes) & holders)
        return self.ctx.authority in votes or (bool(holders) and 2 * holder_votes > len(holders))

    def vote(self, r: int, digest: str, members: list[str]) -> None:
        """Publish our W after round r and the contributors merged into it."""
        ctx = self.ctx
        dht_io.store(ctx.dht, ctx.keys.hashes(r), ctx.identity, HashRecord(round=r, digest=digest, members=members),
                     ctx.expiration())


def order(ctx: RoundContext, r: int) -> str:
    """The seed that orders round r's owners (`plan.seed`): with the coordinator's beacon of the
    round's epoch, once any node it is stored at has handed it to us (then kept for the epoch)."""
    e = plan.epoch(r, ctx.fragments)
    if e not in ctx.beacons:
        found = dht_io.by_writer(ctx.read(ctx.keys.beacon(e), BeaconRecord, ctx.clock.now(), thorough=True))
        beacon = found.get(ctx.authority)
        if beacon is not None and beacon.epoch == e:
            ctx.beacons = {x: v for x, v in ctx.beacons.items() if x >= e - 1} | {e: beacon.seed}
    return plan.seed(ctx.keys.run_id, e, ctx.beacons.get(e))


def agreed_vote(votes: dict[str, HashRecord], own: str | None = None) -> HashRecord:
    """The vote for the digest most peers hold. A tie is broken by nothing a voter fills in (a
    voter chooses its digest and the members it lists, and could grind either): our `own` digest
    wins a tie it is in, so honest peers, who all computed the same W, keep it against as many
    colluders as there are of them; a tie we are not in goes to the smallest digest, the same
    choice for everyone who sees the same votes."""
    counts = Counter(v.digest for v in votes.values())
    top = max(counts.values())
    tied = sorted(d for d, n in counts.items() if n == top)
    digest = own if own in tied else tied[0]
    return next(v for _, v in sorted(votes.items()) if v.digest == digest)
