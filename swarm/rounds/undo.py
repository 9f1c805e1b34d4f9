"""Taking a contribution found not to reproduce out of W again, identically on every peer.

The coordinator redoes a share of each merged round's heads (`peers.verify`). When a contribution
to round r does not reproduce, what its writer added to the totals of every round no verdict
passed, round r's included (each contribution's clipped share, `wire.clipped_share`, summed as the
coordinator merged them), is subtracted from the totals of round r + UNDO_DELAY: the coordinator
serves it as one blob in the run's reduced precision and names it in a signed `UndoRecord` before
it begins round r + 1; every peer reads the record when it settles round r + UNDO_DELAY and
subtracts the blob's values from that round's totals before it applies them and votes. The merge
is a sum, so W then holds what it would had those contributions been left out (with an outer
momentum, once the momentum has spent both), and every peer adds the same bits. A cheat cannot
tell a round that will be redone from one that will not (the draw comes after it offered), so the
rounds it got through undrawn go with the one it was caught in.

A rollback (`swarm.rollback_rounds`) takes out more: every contribution merged in rounds f to r,
f being the first round no verdict passed of the writer caught (the coordinator keeps what each
recent round added to W, `note`), named in the record's `rollback`; round r + 2 then merges none
of its own contributions (they were trained on the poisoned W) and takes out, besides the blob,
what round r + 1 added, which every peer applied itself and keeps. W after round r + 2 is W as
round f began, to the rounding of the sums, and every volunteer's heads start afresh (their factors
and moments were trained on the poisoned W too).

Why two rounds on: a peer settles round r + 2 only after round r + 1 was agreed, which waits for
the coordinator's vote while the coordinator is up, and the coordinator stores the record before
it begins round r + 1, so the record is there before anyone looks. A peer that cannot fetch the
blob merges without it, finds its W differs from the agreed one and re-syncs, as a peer that
missed a contribution does."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from swarm import dht_io
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.types import MergeRound
from swarm.schemas import RolledBack, Undone, UndoRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import (ContributionError, ReducedBound, decode_reduced, dequantized, encode_reduced, merged_shapes,
                        reduced_digest, reduced_tensors, shapes_of)

log = logging.getLogger(__name__)

UNDO_DELAY = 2  # a contribution to round r found not to reproduce is taken out at round r + UNDO_DELAY


def _labels(undone: list[Undone], rollback: RolledBack | None = None) -> list[str]:
    """What an undo blob's digest binds its values to: the contributions it takes out."""
    rolled = [] if rollback is None else [f"all {rollback.first}-{rollback.last}x{rollback.contributions}"]
    return [f"{u.first}-{u.last}x{u.rounds}/{u.writer}" for u in undone] + rolled


def _bound(undone: list[Undone], rollback: RolledBack | None) -> tuple[int, int]:
    """(heads, contributions) whose sum the undo's values are: a rollback's, or the writers'."""
    if rollback is not None:
        return rollback.heads, rollback.contributions
    return sum(u.heads * u.rounds for u in undone), sum(u.rounds for u in undone)


# A writer absent from the merged rounds this long is forgotten: what it added stays in W.
FORGET_AFTER = 64


@dataclass
class Pending:
    """What one writer added to W in the rounds no verdict passed: which, and the sum (float64)."""

    undone: Undone
    total: dict[str, torch.Tensor]


class Unverified:
    """(The coordinator's) per writer, the sum of its contributions' shares in rounds no verdict
    passed: one W-sized sum per writer, however many rounds, so that a writer honest for long and
    then cheating in the rounds nobody drew loses all of them when one is."""

    def __init__(self):
        self._by_writer: dict[str, Pending] = {}

    def add(self, writer: str, r: int, heads: int, share: dict[str, torch.Tensor]) -> None:
        found = self._by_writer.get(writer)
        if found is None:
            self._by_writer[writer] = Pending(Undone(writer=writer, first=r, last=r, rounds=1, heads=heads),
                                              {name: value.double().clone() for name, value in share.items()})
            return
        found.undone = found.undone.model_copy(update={  # a verdict may come in after later rounds
            "first": min(found.undone.first, r), "last": max(found.undone.last, r), "rounds": found.undone.rounds + 1,
            "heads": max(found.undone.heads, heads)})
        for name, value in share.items():
            found.total[name] = found.total[name] + value.double() if name in found.total else value.double().clone()

    def pop(self, writer: str) -> Pending | None:
        return self._by_writer.pop(writer, None)

    def forget(self, r: int) -> None:
        """Drop writers whose last unverified round is FORGET_AFTER rounds before round r."""
        for writer in [w for w, p in self._by_writer.items() if p.undone.last < r - FORGET_AFTER]:
            del self._by_writer[writer]


class Undoing:
    """One peer's side of undoing contributions: the coordinator schedules, everyone loads the
    values at the round that subtracts them (`subtract`)."""

    def __init__(self, ctx: RoundContext, collection: Collection):
        self.ctx, self.collection = ctx, collection
        # What the latest rounds added to W (`note`): the coordinator's last `rollback_rounds`, what a
        # rollback takes out; everyone's last one, which the round that rolls back takes out itself.
        self.applied: dict[int, dict[str, torch.Tensor]] = {}
        cfg = ctx.cfg
        self._keep = (0 if cfg.verify_rate <= 0 or cfg.rollback_rounds <= 0
                      else cfg.rollback_rounds if ctx.is_authority else 1)
        # (the coordinator's) round -> the values it subtracts, and whether it rolls back
        self._scheduled: dict[int, tuple[dict[str, torch.Tensor], bool]] = {}

    def schedule(self, r: int, undone: list[Undone], shares: dict[str, torch.Tensor],
                 rollback: RolledBack | None = None) -> None:
        """(The coordinator) Round r subtracts `shares` (float64, what the `undone` contributions
        added to their rounds, or with `rollback` every contribution of its rounds): serve them
        rounded as a reduced part travels, and say so."""
        ctx = self.ctx
        full = {name: shares[name] if name in shares else torch.zeros(shape, dtype=torch.float64)
                for name, shape in merged_shapes(ctx.model).items()}
        tensors = reduced_tensors(full, ctx.cfg.reduced_dtype)
        digest = reduced_digest(tensors, _labels(undone, rollback))
        ctx.serve(r, ctx.keys.undo_blob(r, digest), encode_reduced(tensors))
        self._scheduled[r] = (dequantized(tensors, ctx.cfg.reduced_dtype, shapes_of(full)), rollback is not None)
        dht_io.store(ctx.dht, ctx.keys.undo(r), ctx.identity,
                     UndoRecord(round=r, undone=undone, digest=digest, rollback=rollback), ctx.expiration())

    def load(self, mr: MergeRound) -> dict[str, torch.Tensor] | None:
        """What round `mr.round` subtracts from its totals: the coordinator's own, or, read from its
        record and fetched from it, checked against the record's digest and against what the
        contributions it names could have added. None if nothing (or it cannot be had)."""
        ctx, r = self.ctx, mr.round
        if ctx.is_authority:
            for old in [k for k in self._scheduled if k < r]:
                del self._scheduled[old]
            values, mr.rolled_back = self._scheduled.pop(r, (None, False))
            return values
        if ctx.cfg.verify_rate <= 0:
            return None
        record = dht_io.by_writer(ctx.read(ctx.keys.undo(r), UndoRecord, ctx.clock.now(), thorough=True)).get(ctx.authority)
        if record is None or record.round != r:
            return None
        mr.rolled_back = record.rollback is not None  # the heads start afresh, whether or not we get the blob
        cfg = ctx.cfg
        heads, contributions = _bound(record.undone, record.rollback)
        bound = ReducedBound(heads=heads, contributions=contributions, max_update=cfg.max_update,
                             max_relative_update=cfg.max_relative_update, reach=ctx.reach)
        targets = frozenset(merged_shapes(ctx.model))
        for address in self.collection.coordinator_p2p(mr):
            try:
                blob = ctx.server.fetch(address, ctx.keys.undo_blob(r, record.digest), cfg.request_timeout,
                                        ctx.max_contribution_bytes)
                values = decode_reduced(blob, ctx.model, targets, _labels(record.undone, record.rollback),
                                        record.digest, cfg.reduced_dtype, bound)
            except ContributionError as exc:
                log.warning("round %d: the coordinator's undo is bad: %s", r, exc)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: could not fetch what the round undoes: %s", r, exc)
            else:
                log.info("round %d: taking out %s", r, ", ".join(_labels(record.undone)))
                return values
        return None


    def taken_out(self, mr: MergeRound, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What round `mr.round` adds to W: its totals less what it undoes; or, when it rolls back,
        none of its own (its contributions were trained on the W it takes back) and out what the
        undo names and what the round before added (which this peer applied itself: one that did
        not ends on another W than the agreed one, and re-syncs)."""
        if not mr.rolled_back:
            return subtract(totals, mr.undo) if mr.undo is not None else totals
        out = {name: torch.zeros_like(value) for name, value in totals.items()}
        if mr.undo is not None:
            out = subtract(out, mr.undo)
        before = self.applied.get(mr.round - 1)
        return subtract(out, before) if before is not None else out

    def note(self, r: int, totals: dict[str, torch.Tensor]) -> None:
        """Round r added `totals` to our W (kept as far as a rollback may need them)."""
        if self._keep <= 0:
            return
        self.applied[r] = {name: value.detach().float().clone() for name, value in totals.items()}
        for old in [k for k in self.applied if k <= r - self._keep]:
            del self.applied[old]


def subtract(totals: dict[str, torch.Tensor], undo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A round's totals less what it undoes (float64; names the round does not merge are added
    where the undo moves them)."""
    out = dict(totals)
    for name, value in undo.items():
        if name in out:
            out[name] = out[name].double() - value.double()
        elif bool(value.any()):
            out[name] = -value.double()
    return out
