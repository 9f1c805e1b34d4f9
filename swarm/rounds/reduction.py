"""The owner-reduced merge: W is cut into parts (`wire.plan_parts`), each reduced by its owners
(`plan.owners`), and every peer collects the reduced parts instead of every contribution.

An owner fetches its parts of every member's contribution, checks them, sums them over the members
whose every part passed, serves the sum and announces its digest in its part record. A part is
trusted when both its owners announced the same digest, or (one owner per part) when the
coordinator, which recomputes every part from the raw contributions, announced it. A peer whose
part's owners are silent, dead or disagree past their grace fetches that part raw and reduces it
itself (`fallback`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from swarm import dht_io
from swarm.rounds import plan
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.types import MergeRound, ReduceWork
from swarm.schemas import FetchedRecord, PartRecord, ReadyRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import (ContributionError, ReducedBound, clipped_shares, decode_reduced, dequantized, dither_seed,
                        encode_reduced, reduce_contributions, reduced_digest, reduced_tensors, shapes_of)

log = logging.getLogger(__name__)

Agreed = dict[int, dict[tuple[str, ...], tuple[str, list[str]]]]  # part -> {members: (digest, sources)}


@dataclass
class Reduced:
    """What collecting the parts came to: the merge (`totals`) over `members`, or None when a
    contributor's part could be had from nobody (then the agreed W is taken from the others)."""

    totals: dict[str, torch.Tensor] | None
    members: list[str]


def reduced_bound(ctx: RoundContext, ready: dict[str, ReadyRecord], members: tuple[str, ...]) -> ReducedBound:
    """How far a part reduced over `members` may move W: their contributions' bounds, for the
    heads their signed ready records list (a member without one: the most a peer may hold)."""
    cfg = ctx.cfg
    heads = sum(len(ready[m].heads) if m in ready else cfg.max_heads_per_peer for m in members)
    return ReducedBound(heads, len(members), cfg.max_update, cfg.max_relative_update, ctx.reach)


def download_part(ctx: RoundContext, r: int, i: int, members: list[str], digest: str, addresses: list[str],
                  first: int, bound: ReducedBound) -> dict[str, torch.Tensor] | None:
    """Part i of round r reduced over `members`, from the first of `addresses` (counted from index
    `first`) that serves it intact, hashing to `digest` and within `bound`; its float32 values."""
    shift = first % max(1, len(addresses))
    for address in addresses[shift:] + addresses[:shift]:
        try:
            blob = ctx.server.fetch(address, ctx.keys.reduced_blob(r, i, digest), ctx.cfg.request_timeout,
                                    ctx.max_part_bytes[i])
            return decode_reduced(blob, ctx.model, ctx.parts[i], members, digest, ctx.cfg.reduced_dtype, bound)
        except ContributionError as exc:
            log.warning("round %d: part %d from %s is bad: %s", r, i, address[-8:], exc)
        except NETWORK_ERRORS as exc:
            log.warning("round %d: could not fetch part %d from %s: %s", r, i, address[-8:], exc)
    return None


class Reduction:
    """One peer's side of an owner-reduced merge."""

    def __init__(self, ctx: RoundContext, collection: Collection):
        self.ctx, self.collection = ctx, collection

    def _owners(self, part: int, work: ReduceWork) -> tuple[str, ...]:
        return plan.owners(part, work.servers, self.ctx.cfg.part_owners, work.scope.among)

    def _vouchers(self, part: int, work: ReduceWork) -> set[str]:
        return plan.vouchers(self.ctx.cfg, part, work.servers, self.ctx.authority, work.scope.among)

    def start(self, mr: MergeRound) -> ReduceWork:
        """Reduce the parts we own: fetch our parts of every contribution, validate, sum, serve the
        result and publish its digest. Then every part is collected (`collect`)."""
        ctx = self.ctx
        work = ReduceWork(members=sorted(mr.ready_set), servers=plan.servers(mr.ready_set, mr.order), scope=mr.scope)
        if ctx.is_authority and ctx.cfg.coordinator_recomputes:
            # The authority trusts no owner: it reduces every part from the raw contributions, and
            # its digest is the one a peer fooled by two colluding owners re-syncs to.
            self.fetch_parts(mr, work, list(work.scope.parts))
            # Whom it could not fetch (a member may serve everyone but the coordinator) the others
            # leave out too: else their W would differ from the agreed one in every such round.
            fetched = set(work.members).intersection(*(work.accepted[i] for i in work.scope.parts))
            dht_io.store(ctx.dht, ctx.keys.fetched(mr.round), ctx.identity,
                         FetchedRecord(round=mr.round, members=sorted(fetched)), ctx.expiration(), wait=False)
        else:
            mine = [i for i in work.scope.parts if ctx.peer in self._owners(i, work)]
            self.fetch_parts(mr, work, mine)
            for i in mine:
                self.reduce_part(mr, work, i, sorted(work.accepted[i]), publish=True)
            self.publish_parts(mr, work)
        work.began = ctx.clock.monotonic()
        return work

    def fetch_parts(self, mr: MergeRound, work: ReduceWork, parts: list[int]) -> None:
        """Download and validate `parts` of every member's contribution, a few at a time. For
        most of the parts (the coordinator, a fallback) whole contributions are fetched instead:
        one request per member, not one per part."""
        ctx = self.ctx
        whole = 2 * len(parts) > len(work.scope.parts)
        # Every peer starts with a different member (the one after itself): were they all to ask the
        # same members first, those members' uplinks would serve the whole swarm while others idle.
        start = (work.members.index(ctx.peer) + 1) if ctx.peer in work.members else ctx.spread(len(work.members))
        order = work.members[start:] + work.members[:start]
        if whole:
            jobs = [(None, peer) for peer in order]
            found = self.collection.fetch(mr, jobs, check=list(parts))
        else:
            jobs = [(i, peer) for i in parts for peer in order]
            found = self.collection.fetch(mr, jobs)
        for (_, peer), passed in zip(jobs, found):
            for j, c in passed.items():
                work.held.setdefault(j, {})
                if c is not None:
                    work.held[j][peer] = c
        for i in parts:
            work.accepted[i] = set(work.held.get(i, {}))

    def reduce_part(self, mr: MergeRound, work: ReduceWork, i: int, members: list[str], publish: bool) -> dict:
        """Part i summed over `members` (from contributions we hold), as the float32 values every
        peer adds; served and announced when we own the part."""
        ctx = self.ctx
        key = (i, tuple(members))
        if key not in work.computed:
            totals = reduce_contributions(ctx.model, [work.held[i][m] for m in members], ctx.cfg.robust_clip,
                                          ctx.parts[i])
            tensors = reduced_tensors(totals, ctx.cfg.reduced_dtype, dither_seed(ctx.cfg.reduced_rounding, mr.round))
            digest = reduced_digest(tensors, members)
            work.computed[key] = (digest, dequantized(tensors, ctx.cfg.reduced_dtype, shapes_of(totals)))
            if publish:
                ctx.serve(mr.round, ctx.keys.reduced_blob(mr.round, i, digest), encode_reduced(tensors))
                work.published.append((i, tuple(members), digest))
        return work.computed[key][1]

    def shares(self, mr: MergeRound, members: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Per member, what its contribution added to the round's sums over `members` (clipped as
        they clipped it), of the parts whose contributions we hold: all of them, for the
        coordinator that recomputes."""
        ctx, work, out = self.ctx, mr.work, {m: {} for m in members}
        for i in work.scope.parts:
            held = work.held.get(i, {})
            if set(members) <= set(held):
                for m, share in clipped_shares(ctx.model, [held[m] for m in members], ctx.cfg.robust_clip,
                                               ctx.parts[i]).items():
                    out[m].update(share)
        return out

    def publish_parts(self, mr: MergeRound, work: ReduceWork) -> None:
        """Announce every part we reduced and serve, in our one record of the round: rewritten
        whole when there is more (a later expiration replaces it). With one owner per part the
        owners announce nothing: only the coordinator's record vouches for a part (`agreed_parts`)."""
        ctx = self.ctx
        if len(work.published) == work.announced or (ctx.cfg.part_owners == 1 and not ctx.is_authority):
            return
        work.announced = len(work.published)
        work.expiration = max(ctx.expiration(), work.expiration + 1e-3)  # an equal one would be refused
        key = ctx.keys.sums(mr.round) if ctx.is_authority else ctx.keys.parts(mr.round)
        dht_io.store(ctx.dht, key, ctx.identity, PartRecord.of(mr.round, work.published, ctx.p2p), work.expiration)

    def agreed_parts(self, mr: MergeRound, work: ReduceWork) -> Agreed:
        """part -> {members: (digest, sources' addresses)} for every reduction its vouchers published
        alike (our own reductions count as ours): both its owners, or, with one owner per part,
        the coordinator, whose own sum is what checks the owner's. Then only the coordinator's one
        record is read, not one record per owner (every read of a key carries all it holds), and
        the owner is a source too: it serves the part under that digest if its sum agreed. Notes
        when each part's first record showed up in `work.first_seen`."""
        ctx, r = self.ctx, mr.round
        single = ctx.cfg.part_owners == 1
        found = dht_io.by_writer(ctx.read(ctx.keys.sums(r) if single else ctx.keys.parts(r), PartRecord,
                                          ctx.clock.now()))
        if single:
            found = {w: rec for w, rec in found.items() if w == ctx.authority}
        said: dict[tuple[int, tuple[str, ...], str], dict[str, str]] = {}
        for writer, record in found.items():
            if record.round != r:
                continue
            for part, members, digest in record.reduced():
                if (part not in work.scope.parts or writer not in self._vouchers(part, work)
                        or not set(members) <= set(work.members)):
                    continue
                said.setdefault((part, members, digest), {})[writer] = record.p2p
                work.first_seen.setdefault(part, ctx.clock.monotonic())
                if not set(self._owners(part, work)) <= set(members):
                    work.orphaned.add(part)  # an owner says the other one's own contribution failed
        for (i, members), (digest, _) in work.computed.items():
            said.setdefault((i, members, digest), {})[ctx.peer] = ctx.p2p
        agreed: Agreed = {}
        for (i, members, digest), writers in said.items():
            if (ctx.authority in writers) if single else self._vouchers(i, work) <= set(writers):
                sources = dict(writers)
                if single:
                    sources.update({o: mr.ready_set[o].p2p for o in self._owners(i, work) if o not in sources})
                addresses = [a for w, a in sorted(sources.items()) if w != ctx.peer]
                agreed.setdefault(i, {})[members] = (digest, addresses)
        return agreed

    def _coordinator_fetched(self, mr: MergeRound, work: ReduceWork) -> set[str] | None:
        """The contributors whose contributions the coordinator fetched this round (`FetchedRecord`),
        read until it says (None until then)."""
        ctx = self.ctx
        if work.coordinator is None:
            found = dht_io.by_writer(ctx.read(ctx.keys.fetched(mr.round), FetchedRecord, ctx.clock.now()))
            record = found.get(ctx.authority)
            if record is not None and record.round == mr.round:
                work.coordinator = set(record.members)
        return work.coordinator

    def collect(self, mr: MergeRound) -> Reduced | None:
        """Collect every part: which contributors each part accepted (ours, or as both owners say),
        the final set (accepted by every part), then every part reduced over it: ours, or
        downloaded from an owner and checked against the owners' digest. Parts whose owners are
        silent, dead or disagree past the deadline are fetched raw and reduced here. None while
        parts are still to come."""
        ctx, work = self.ctx, mr.work
        agreed = self.agreed_parts(mr, work)
        for i, versions in agreed.items():
            if i not in work.accepted:  # the versions are nested: the widest is what the part accepted
                work.accepted[i] = set(max(versions, key=len))
        now = ctx.clock.monotonic()
        late = now > mr.deadline

        def overdue(i: int) -> bool:
            """Past the deadline; or one owner published and the other stayed silent for the grace,
            or is not in the round as far as its co-owner could tell (then we check it ourselves).
            With one owner per part only the coordinator's record is read: the grace runs from
            when we began collecting, which is when the owners publish theirs."""
            seen = work.first_seen.get(i, work.began if ctx.cfg.part_owners == 1 else None)
            return late or i in work.orphaned or (seen is not None and now > seen + ctx.cfg.merge_grace)

        # The final set is usually every part's accepted set (and what the coordinator fetched):
        # download the parts agreed over what the parts known so far accepted while the last
        # owners are still reducing theirs.
        fetched = self._coordinator_fetched(mr, work) if work.final is None and work.await_coordinator else None
        also = [fetched] if fetched is not None else []
        likely = tuple(sorted(set(work.members).intersection(*work.accepted.values(), *also)))
        if work.final is None:
            self.download_parts(mr, work, likely, agreed)
        unknown = [i for i in work.scope.parts if i not in work.accepted]
        if unknown:
            if not all(overdue(i) for i in unknown):
                return None
            self.fallback(mr, work, unknown)
        if work.final is None:
            if work.await_coordinator and fetched is None and not late:
                return None  # the coordinator is up and has not said whom it fetched yet
            work.final = sorted(set(work.members).intersection(*work.accepted.values(), *also))
            mr.mark("final", ctx.clock.monotonic())
        final = tuple(work.final)
        self.download_parts(mr, work, final, agreed)
        for i in work.scope.parts:
            if i in work.reduced:
                continue
            if i in work.held and set(final) <= set(work.held[i]):
                # The coordinator serves every part it reduced, vouching or not: peers that missed the
                # round take it from those parts (`replay`) when the owners have moved on.
                work.reduced[i] = self.reduce_part(mr, work, i, list(final),
                                                   publish=ctx.is_authority or ctx.peer in self._vouchers(i, work))
            elif (i, final) in work.fetched:
                work.reduced[i] = work.fetched.pop((i, final))
        self.publish_parts(mr, work)
        missing = [i for i in work.scope.parts if i not in work.reduced]
        if missing:
            if not all(overdue(i) for i in missing):
                return None
            self.fallback(mr, work, missing)
            unreachable = [i for i in missing if not set(final) <= set(work.held[i])]
            if unreachable:
                log.warning("round %d: could not get every contribution to part %d; catching up", mr.round,
                            unreachable[0])
                return Reduced(None, list(final))
            for i in missing:
                work.reduced[i] = self.reduce_part(mr, work, i, list(final), publish=False)
        work.fetched.clear()
        totals = {name: t.double() for i in work.scope.parts for name, t in work.reduced[i].items()}
        return Reduced(totals, list(final))

    def download_parts(self, mr: MergeRound, work: ReduceWork, members: tuple[str, ...], agreed: Agreed) -> None:
        """Download, a few at a time, every part both its owners published reduced over `members`
        that we neither hold nor could reduce ourselves (into `work.fetched`). Each peer starts at
        a different part, so that the owners' uplinks share the load; and of a part's sources
        (its two owners, or its owner and the coordinator) members consecutive in the round's order
        (in which the owners are consecutive too) ask different ones first, so that each source
        serves its part to about as many readers as the other."""
        ctx, parts = self.ctx, list(work.scope.parts)
        n = len(parts)
        readers = plan.ordered(work.members, mr.order)
        me = readers.index(ctx.peer) if ctx.peer in readers else ctx.spread(len(readers))
        start = me * n // len(work.members) if ctx.peer in work.members else ctx.spread(n)
        todo = [i for i in parts[start:] + parts[:start] if i not in work.reduced
                and (i, members) not in work.fetched and members in agreed.get(i, {})
                and not (i in work.held and set(members) <= set(work.held[i]))]
        if not todo:
            return

        bound = reduced_bound(ctx, mr.ready_set, members)

        def one(i: int) -> dict | None:
            digest, addresses = agreed[i][members]
            return download_part(ctx, mr.round, i, list(members), digest, addresses, first=me + i, bound=bound)

        for k, tensors in ctx.clock.gather(one, todo, ctx.cfg.parallel_downloads):
            ctx.keep_alive()
            if tensors is not None:
                work.fetched[(todo[k], members)] = tensors

    def fallback(self, mr: MergeRound, work: ReduceWork, parts: list[int]) -> None:
        """Owners did not deliver these parts in time: fetch every contribution's part ourselves."""
        todo = [i for i in parts if i not in work.held]
        work.raw.update(parts)
        if todo:
            log.warning("round %d: %d of %d parts not reduced by their owners in time; fetching them raw",
                        mr.round, len(todo), len(work.scope.parts))
            self.fetch_parts(mr, work, todo)
