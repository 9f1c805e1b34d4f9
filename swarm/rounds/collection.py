"""Contributions in and out: serving ours (whole, per part, compact), pushing it when nobody can
connect to us, and fetching, parsing once and checking the members' contributions.

A peer behind NAT (hivemind's client mode) cannot be fetched from: it names the digests of its
blobs in its signed ready record and pushes each blob to the peers that need it (a part to its
owners and the whole to the coordinator, or the whole to every reachable member); they keep what
is pushed to them within a budget, and anyone fetches a pushed blob from a peer it was pushed to.
A blob that carries the factors we kept from the member's last blob travels compact (`wire`)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Callable

import torch

from swarm.rounds import plan
from swarm.rounds.context import RoundContext
from swarm.rounds.types import KEEP_CONTRIBUTIONS, MergeRound
from swarm.schemas import DonorRecord, ReadyRecord
from swarm.transport import NETWORK_ERRORS, TransferError, pushed_name
from swarm.wire import (Contribution, ContributionError, ParsedBlob, check_parts, compact_part, expand_parsed,
                        parse_contribution, parsed_factors, split_contribution)

log = logging.getLogger(__name__)

LISTING_BYTES = 1 << 16  # bound on the digest list of an unreachable peer's pushed blobs
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Collection:
    """One peer's side of moving contributions in a round. `donors` reads who hands out W (the
    coordinator's address is looked up there)."""

    def __init__(self, ctx: RoundContext, donors: Callable[[], dict[str, DonorRecord]]):
        self.ctx, self.donors = ctx, donors
        # The current factors of our last contribution and of each of its parts (blob key: i + 1 for
        # part i, `RoundScope.whole` for the whole), the baseline of our next one; and those of every
        # peer's last blob we received, by (peer, key): what compact blobs leave out
        # (`wire.compact_part`). With fragments a part's next turn is k rounds on: kept until then.
        self._sent_factors: dict[int, dict[str, torch.Tensor]] = {}
        self._bases: dict[tuple[str, int], tuple[int, str, dict[str, torch.Tensor]]] = {}
        # Pushed blobs are kept within a budget: every head's contribution, in the worst case; of
        # it, one sender holds its latest two rounds' pushes to us at most (a contribution, or its
        # parts, and their digest list each), its older ones making room for them.
        inbox = ctx.server.inbox
        inbox.limit_bytes = ctx.model.spec.n_heads * (ctx.max_contribution_bytes + LISTING_BYTES)
        inbox.per_sender_bytes = 2 * (ctx.max_contribution_bytes + LISTING_BYTES)
        inbox.keep_seconds = KEEP_CONTRIBUTIONS * 2 * ctx.cfg.round_timeout

    # ---- ours --------------------------------------------------------------------------------
    def offer(self, mr: MergeRound, contribution: bytes, ready: ReadyRecord) -> ReadyRecord:
        """Serve our contribution of round `mr.round` (whole, per part, and compact) and return
        the ready record that announces it: marked when its baseline is zero, and naming the
        digest list of what we will push when nobody can connect to us."""
        ctx, r, scope = self.ctx, mr.round, mr.scope
        ctx.serve(r, ctx.keys.contribution_blob(r, ctx.peer), contribution)
        ours = list(scope.parts) if ctx.cfg.merge == "reduce" else []
        parts = split_contribution(contribution, [ctx.parts[i] for i in ours])
        for part, blob in [(None, contribution), *zip(ours, parts)]:
            if part is not None:
                ctx.serve(r, ctx.keys.contribution_part_blob(r, ctx.peer, part), blob)
            key = scope.whole if part is None else part + 1
            compact, self._sent_factors[key], base = compact_part(blob, self._sent_factors.get(key))
            ctx.serve(r, ctx.keys.contribution_compact_blob(r, ctx.peer, part), compact)
            if part is None and base == "zero":  # nothing of its heads is in W: anyone can rebuild it
                ready = ready.model_copy(update={"zero_baseline": True})
        if not ctx.reachable:  # what we will push, named in our signed record by its digest
            blobs = [contribution, *parts]
            listing = json.dumps([hashlib.sha256(b).hexdigest() for b in blobs]).encode()
            mr.pushed = {hashlib.sha256(b).hexdigest(): b for b in [listing, *blobs]}
            ready = ready.model_copy(update={"pushed": hashlib.sha256(listing).hexdigest()})
        return ready

    def push(self, mr: MergeRound) -> None:
        """We cannot be fetched from: push the digest list and what each peer needs of our
        contribution to it: each part to its owners and the whole to the coordinator (reduced
        merge), or the whole to every reachable member and the coordinator (all-gather)."""
        ctx = self.ctx
        listing = mr.pushed[mr.ready_set[ctx.peer].pushed]
        digests = json.loads(listing)
        targets: dict[str, list[bytes]] = {}
        if plan.reduces(ctx.cfg, mr.ready_set):
            servers = plan.servers(mr.ready_set, mr.order)
            for slot, i in enumerate(mr.scope.parts):
                for owner in plan.owners(i, servers, ctx.cfg.part_owners, mr.scope.among):
                    targets.setdefault(mr.ready_set[owner].p2p, [listing]).append(mr.pushed[digests[slot + 1]])
            if ctx.cfg.coordinator_recomputes:
                for address in self.coordinator_p2p(mr):
                    targets.setdefault(address, [listing]).append(mr.pushed[digests[0]])
        else:
            for address in self._holders(mr, 0):
                targets.setdefault(address, [listing]).append(mr.pushed[digests[0]])

        def push(address: str, blobs: list[bytes]) -> None:
            for blob in blobs:
                try:
                    ctx.server.push(address, blob, ctx.cfg.request_timeout)
                except NETWORK_ERRORS as exc:
                    log.warning("round %d: could not push our contribution to %s: %s", mr.round, address[-8:], exc)
                    return

        for _ in ctx.clock.gather(lambda target: push(*target), list(targets.items()), ctx.cfg.parallel_downloads):
            ctx.keep_alive()

    # ---- theirs ------------------------------------------------------------------------------
    def forget(self, r: int) -> None:
        """Drop the factors kept from peers whose last blob is rounds older than round r."""
        for key in [k for k, held in self._bases.items() if held[0] < r - self.ctx.keep_bases]:
            del self._bases[key]

    def awaiting_pushes(self, mr: MergeRound) -> bool:
        """Whether a blob we need from an unreachable member has reached neither us nor anyone we
        could fetch it from yet."""
        needed = self._needed_pushes(mr)
        for peer, rec in mr.ready_set.items():
            if rec.pushed is None or peer == self.ctx.peer:
                continue
            try:
                if any(self._pushed_blob(mr, peer, index) is None for index in needed):
                    return True
            except ContributionError:
                continue  # a malformed digest list: rejected when its contribution is fetched
        return False

    def fetch(self, mr: MergeRound, jobs: list[tuple[int | None, str]], check: list[int | None] | None = None
              ) -> list[dict[int | None, Contribution | None]]:
        """Each job (part, member) fetched, a few at a time: the member's whole contribution (part
        None) or one part of it, parsed once and checked for each of `check` (None: the whole
        contribution; i: part i; by default the part fetched). Per job, what passed by what was
        checked; what failed is None (and logged). Leases are kept alive meanwhile."""
        ctx = self.ctx
        found: list = [None] * len(jobs)
        for i, passed in ctx.clock.gather(lambda job: self._one(mr, job[0], job[1], [job[0]] if check is None else check),
                                          jobs, ctx.cfg.parallel_downloads):
            found[i] = passed
            ctx.keep_alive()  # a long collection must not let our leases lapse
        return found

    def _one(self, mr: MergeRound, part: int | None, peer: str, check: list[int | None]
             ) -> dict[int | None, Contribution | None]:
        ctx, r = self.ctx, mr.round
        rec = mr.ready_set[peer]
        out: dict[int | None, Contribution | None] = dict.fromkeys(check)
        name = ctx.keys.contribution_blob(r, peer) if part is None else ctx.keys.contribution_part_blob(r, peer, part)
        what = "all" if part is None else part
        try:
            if peer == ctx.peer and mr.contribution is not None:
                blob = ctx.server.lookup(name)
                if blob is None:
                    raise ContributionError("our own contribution is not served")
                parsed = parse_contribution(blob)
            elif rec.nbytes > ctx.max_contribution_bytes:
                raise ContributionError(f"it announces {rec.nbytes} bytes, more than this model's contributions "
                                        f"can take ({ctx.max_contribution_bytes})")
            else:
                bound = ctx.max_contribution_bytes if part is None else ctx.max_part_bytes[part]
                parsed = self._contribution(mr, peer, 0 if part is None else part + 1, name, bound)
        except ContributionError as exc:
            log.warning("round %d: rejected the contribution of %s (part %s): %s", r, peer[:8], what, exc)
            return out
        except NETWORK_ERRORS as exc:
            log.warning("round %d: no contribution (part %s) from %s: %s", r, what, peer[:8], exc)
            return out
        checked = check_parts(parsed, peer, ctx.model, ctx.cfg.max_update, ctx.cfg.max_relative_update,
                              [mr.scope.targets if j is None else ctx.parts[j] for j in check], ctx.cfg.contribution_dtype,
                              reach=ctx.reach, scope=mr.scope.targets)
        for j, c in zip(check, checked):
            if not isinstance(c, ContributionError) and sorted(c.heads) != sorted(rec.heads):
                c = ContributionError(f"heads {list(c.heads)} differ from its ready record")
            if isinstance(c, ContributionError):
                log.warning("round %d: rejected part %s of %s's contribution: %s", r, "all" if j is None else j,
                            peer[:8], c)
            else:
                out[j] = c
        return out

    def _contribution(self, mr: MergeRound, peer: str, index: int, name: str, bound: int) -> ParsedBlob:
        """A member's whole contribution (index 0) or part index - 1, parsed: fetched from the
        member (compact when we kept the factors of its last such blob: its baseline, if that went
        into W), or, for a member nobody can connect to, from what it pushed."""
        rec = mr.ready_set[peer]
        if rec.pushed is not None:
            blob = self._pushed_blob(mr, peer, index)
            if blob is None:
                raise TransferError("what it pushed reached neither us nor the peers it pushed to in time")
            if len(blob) > bound:
                raise ContributionError(f"it pushed {len(blob)} bytes, more than the limit {bound}")
            return parse_contribution(blob)
        key = mr.scope.whole if index == 0 else index
        r, held = mr.round, self._bases.get((peer, key))
        parsed = None
        if rec.zero_baseline or (held is not None and held[0] >= r - self.ctx.keep_bases):
            compact = self.ctx.keys.contribution_compact_blob(r, peer, None if index == 0 else index - 1)
            parsed = expand_parsed(parse_contribution(self._fetch_member(mr, rec, compact, bound)),
                                   None if held is None else held[1:], zero=rec.zero_baseline)
        if parsed is None:
            parsed = parse_contribution(self._fetch_member(mr, rec, name, bound))
        digest, factors = parsed_factors(parsed)
        self._bases[(peer, key)] = (r, digest, factors)
        return parsed

    def _fetch_member(self, mr: MergeRound, rec: ReadyRecord, name: str, bound: int) -> bytes:
        """One of a member's blobs, from the member. A member that let a fetch of this round run
        into its deadline (stalling, or trickling bytes) is not asked again this round, for this
        blob or any other: it costs a round one timeout, not one per part we need of it."""
        ctx = self.ctx
        if rec.p2p in mr.slow:
            raise TransferError("it let a fetch of this round time out already")

        def fetch() -> bytes:
            started = ctx.clock.monotonic()
            try:
                return ctx.server.fetch(rec.p2p, name, ctx.cfg.request_timeout, bound)
            except NETWORK_ERRORS:
                if ctx.clock.monotonic() - started > ctx.cfg.request_timeout / 2:
                    mr.slow.add(rec.p2p)
                raise

        try:
            return fetch()
        except NETWORK_ERRORS as exc:
            # A stream cut short on a busy home link must not leave a live member out of the round
            # (its part's owners would then disagree): asked once more, unless it was slow.
            if rec.p2p in mr.slow:
                raise
            log.info("round %d: fetching %s again after: %s", mr.round, name, exc)
        return fetch()

    # ---- what unreachable members pushed -------------------------------------------------------
    def coordinator_p2p(self, mr: MergeRound) -> list[str]:
        """The coordinator's address, looked up in the DHT once per round."""
        if mr.coordinator_p2p is None:
            donor = self.donors().get(self.ctx.authority)
            mr.coordinator_p2p = [donor.p2p] if donor is not None and donor.p2p != self.ctx.p2p else []
        return mr.coordinator_p2p

    def _holders(self, mr: MergeRound, index: int | None) -> list[str]:
        """Addresses that were pushed an unreachable member's blob `index` (0: the whole
        contribution, i + 1: part i; None: its digest list, which all of them got)."""
        servers = plan.servers(mr.ready_set, mr.order)
        if index is not None and index > 0:
            return [mr.ready_set[o].p2p for o in plan.owners(index - 1, servers, self.ctx.cfg.part_owners,
                                                              mr.scope.among)]
        return [mr.ready_set[s].p2p for s in servers] + self.coordinator_p2p(mr)

    def _needed_pushes(self, mr: MergeRound) -> list[int]:
        """Which blobs of every unreachable member we fetch this round (see `_holders`)."""
        ctx = self.ctx
        if not plan.reduces(ctx.cfg, mr.ready_set):
            return [0]
        if ctx.is_authority and ctx.cfg.coordinator_recomputes:
            return [0]
        servers = plan.servers(mr.ready_set, mr.order)
        return [i + 1 for i in mr.scope.parts
                if ctx.peer in plan.owners(i, servers, ctx.cfg.part_owners, mr.scope.among)]

    def _pushed_blob(self, mr: MergeRound, peer: str, index: int) -> bytes | None:
        """Blob `index` pushed by unreachable member `peer`, found by the digests its signed ready
        record names (in our inbox, or at a peer it was pushed to); None if nowhere yet."""
        ctx = self.ctx
        listing = self._by_digest(mr, mr.ready_set[peer].pushed, None, LISTING_BYTES)
        if listing is None:
            return None
        expected = 1 + (len(mr.scope.parts) if ctx.cfg.merge == "reduce" else 0)
        try:
            digests = json.loads(listing)
            if (not isinstance(digests, list) or len(digests) != expected
                    or not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests)):
                raise ValueError
        except ValueError:
            raise ContributionError("the list of blobs it pushed is malformed") from None
        slot = 0 if index == 0 else 1 + mr.scope.parts.index(index - 1)  # the list names the round's parts only
        return self._by_digest(mr, digests[slot], index, ctx.max_contribution_bytes)

    def _by_digest(self, mr: MergeRound, digest: str, index: int | None, bound: int) -> bytes | None:
        """The blob hashing to `digest`: already held, pushed to us, or fetched from a peer it
        was pushed to (`_holders(mr, index)`, only asked when we do not hold it)."""
        ctx = self.ctx
        found = mr.pushed.get(digest) or ctx.server.inbox.get(digest)
        for address in self._holders(mr, index) if found is None else []:
            if address == ctx.p2p:
                continue
            try:
                data = ctx.server.fetch(address, pushed_name(digest), ctx.cfg.request_timeout, bound)
            except NETWORK_ERRORS:
                continue
            if hashlib.sha256(data).hexdigest() == digest:
                found = data
                break
        if found is not None:
            mr.pushed[digest] = found
        return found
