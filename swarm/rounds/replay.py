"""A missed round taken from its reduced parts instead of a whole W.

A peer whose W is round r's and who was not in round r (it came after the close, or stood by without
a head) needs what round r added. Its members added the round's reduced parts, which their owners
and the coordinator serve for a few rounds (`KEEP_CONTRIBUTIONS`): at the wire's reduced precision
all of a round's parts are a fraction of W (int4: about a seventh), so replaying one or two rounds
moves fewer bytes through a home link than downloading W, and draws on many uplinks instead of on
the few donors every newcomer asks. A round of few members all-gathers instead: its members'
contributions are fetched and reduced again.

No source is trusted: a part must hash to the digest a writer of the round's part records named,
and the W it all adds up to must hash to the coordinator's decided digest. Anything else (a part
nobody serves any more, a forged one, a round merged otherwise) makes the replay give up, and the
peer downloads W as before; it loses only the bytes it fetched."""

from __future__ import annotations

import logging

import torch

from swarm import dht_io
from swarm.rounds import plan
from swarm.rounds.agreement import order
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.gather import gather
from swarm.rounds.reduction import download_part, reduced_bound
from swarm.rounds.types import KEEP_CONTRIBUTIONS, MergeRound, RoundScope
from swarm.schemas import HashRecord, PartRecord, ReadyRecord
from swarm.wire import split_totals

log = logging.getLogger(__name__)

# Rounds a peer may be behind and still replay them: their parts are served for KEEP_CONTRIBUTIONS
# rounds, the last of them perhaps only until its server's next round begins.
REPLAY_ROUNDS = KEEP_CONTRIBUTIONS - 1


def replayed(ctx: RoundContext, collection: Collection, r: int, decision: HashRecord, recompute: bool = False
             ) -> dict[str, torch.Tensor] | None:
    """What merge round r added to W, as its members added it (the totals `wire.apply_reduced`
    takes), if it can be had and hashes to `decision.digest` on our W; else None. A reduced round
    is taken from its reduced parts; one that all-gathered (few members) from the members'
    contributions, while they come to fewer bytes than W. `recompute`: from the members'
    contributions only, through our own checks and clip, whatever their size: what a coordinator
    that trusts no owner and no voter accepts (a digest that sums of forged parts add up to proves
    nothing about the parts)."""
    members = tuple(sorted(decision.members))
    totals: dict[str, torch.Tensor] | None = {}  # a round nobody was merged in changes nothing
    if members:
        totals = _fetched(ctx, collection, r, members, recompute)
        if totals is None:
            return None
    if ctx.model.digest_after(*split_totals(ctx.model, totals)) != decision.digest:
        log.warning("round %d: what we replayed does not add up to the decided W; downloading W instead", r)
        return None
    return totals


def _fetched(ctx: RoundContext, collection: Collection, r: int, members: tuple[str, ...], recompute: bool = False
             ) -> dict[str, torch.Tensor] | None:
    """What round r added over `members`, from its reduced parts, else (an all-gathered round) from
    the members' contributions while they come to fewer bytes than W; None if neither can be had."""
    ready = {who: rec for who, rec in dht_io.by_writer(ctx.read(ctx.keys.ready(r), ReadyRecord, ctx.clock.now(),
                                                                thorough=True)).items() if rec.round == r}
    if not set(members) <= set(ready):
        return None  # a member's record is gone: neither its heads (the bound) nor the parts' owners are known
    scope = ctx.scope(r)
    if recompute:
        return _gathered(ctx, collection, r, members, ready, scope)
    sources = _sources(ctx, r, members, ready, scope)
    if all(sources.get(i) for i in scope.parts):
        return _from_parts(ctx, r, members, ready, sources, scope.parts)
    if sum(ready[m].nbytes for m in members) < ctx.max_state_bytes:
        return _gathered(ctx, collection, r, members, ready, scope)
    return None


def _gathered(ctx: RoundContext, collection: Collection, r: int, members: tuple[str, ...],
              ready: dict[str, ReadyRecord], scope: RoundScope) -> dict[str, torch.Tensor] | None:
    """Round r all-gathered again: every member's contribution fetched (from it, or from where it
    pushed it) and reduced as the members did."""
    start = ctx.clock.monotonic()
    mr = MergeRound(round=r, contribution=None, ready=None, started=start, deadline=start + ctx.cfg.round_timeout,
                    scope=scope, ready_set={m: ready[m] for m in members})
    totals, got = gather(ctx, collection, mr)
    return totals if tuple(got) == members else None


def _from_parts(ctx: RoundContext, r: int, members: tuple[str, ...], ready: dict[str, ReadyRecord],
                sources: dict[int, list[tuple[str, list[str]]]], parts: tuple[int, ...]
                ) -> dict[str, torch.Tensor] | None:
    """Round r's parts reduced over `members`, downloaded from their `sources`."""
    bound = reduced_bound(ctx, ready, members)
    first = ctx.spread(len(parts))

    def one(i: int) -> dict[str, torch.Tensor] | None:
        for digest, addresses in sources[i]:
            values = download_part(ctx, r, i, list(members), digest, addresses, first + i, bound)
            if values is not None:
                return values
        return None

    totals: dict[str, torch.Tensor] = {}
    for _, values in ctx.clock.gather(one, list(parts), ctx.cfg.parallel_downloads):
        ctx.keep_alive()
        if values is None:
            return None
        totals.update({name: t.double() for name, t in values.items()})
    return totals


def _sources(ctx: RoundContext, r: int, members: tuple[str, ...], ready: dict[str, ReadyRecord],
             scope: RoundScope) -> dict[int, list[tuple[str, list[str]]]]:
    """part -> [(digest, addresses)], the digests named for the part reduced over `members` by the
    round's part records, from the coordinator's or a contributor's of the round: the coordinator's
    digest first, then those most writers named. With one owner per part the owners name nothing;
    the coordinator's record does, and each part's owner (as the round's records place it) serves it."""
    said: dict[int, dict[str, dict[str, str]]] = {}
    for key in (ctx.keys.parts(r), ctx.keys.sums(r)):
        for writer, record in dht_io.by_writer(ctx.read(key, PartRecord, ctx.clock.now())).items():
            if record.round != r or (writer != ctx.authority and writer not in ready):
                continue
            for part, summed, digest in record.reduced():
                if summed == members and part in scope.parts:
                    said.setdefault(part, {}).setdefault(digest, {})[writer] = record.p2p
    out: dict[int, list[tuple[str, list[str]]]] = {}
    servers = plan.servers(ready, order(ctx, r)) if ctx.cfg.part_owners == 1 and said else []
    for i, digests in said.items():
        ranked = sorted(digests.items(), key=lambda kv: (ctx.authority not in kv[1], -len(kv[1]), kv[0]))
        out[i] = []
        for digest, writers in ranked:
            addresses = [a for w, a in sorted(writers.items()) if w != ctx.peer]
            if ctx.cfg.part_owners == 1:
                owners = plan.owners(i, servers, 1, scope.among)
                addresses += [ready[o].p2p for o in owners if o in ready and ready[o].p2p not in addresses]
            out[i].append((digest, addresses))
    return out
