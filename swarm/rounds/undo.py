"""Taking a contribution found not to reproduce out of W again, identically on every peer.

The coordinator redoes a share of each merged round's heads (`peers.verify`). What a contribution
to round r that does not reproduce added to round r's totals (its clipped share,
`wire.clipped_share`) is subtracted from the totals of round r + UNDO_DELAY: the coordinator
serves it as one blob in the run's reduced precision and names it in a signed `UndoRecord` before
it begins round r + 1; every peer reads the record when it settles round r + UNDO_DELAY and
subtracts the blob's values from that round's totals before it applies them and votes. The merge
is a sum, so W then holds what it would had the contribution been left out of round r (with an
outer momentum, once the momentum has spent both), and every peer adds the same bits.

Why two rounds on: a peer settles round r + 2 only after round r + 1 was agreed, which waits for
the coordinator's vote while the coordinator is up, and the coordinator stores the record before
it begins round r + 1, so the record is there before anyone looks. A peer that cannot fetch the
blob merges without it, finds its W differs from the agreed one and re-syncs, as a peer that
missed a contribution does."""

from __future__ import annotations

import logging

import torch

from swarm import dht_io
from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.types import MergeRound
from swarm.schemas import Undone, UndoRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import (ContributionError, ReducedBound, decode_reduced, dequantized, encode_reduced, merged_shapes,
                        reduced_digest, reduced_tensors, shapes_of)

log = logging.getLogger(__name__)

UNDO_DELAY = 2  # a contribution to round r found not to reproduce is taken out at round r + UNDO_DELAY


def _labels(undone: list[Undone]) -> list[str]:
    """What an undo blob's digest binds its values to: the contributions it takes out."""
    return [f"{u.round}/{u.writer}" for u in undone]


def _shapes(ctx: RoundContext, undone: list[Undone]) -> dict[str, tuple[int, ...]]:
    """What an undo blob holds: the layers and parameters the rounds it undoes merged (all of W, or
    their fragments'), which every peer can tell from the rounds alone."""
    scopes = [ctx.scope(u.round).targets for u in undone]
    shapes = merged_shapes(ctx.model)
    if any(targets is None for targets in scopes):  # a round that merged all of W
        return shapes
    return {name: shape for name, shape in shapes.items() if any(name in targets for targets in scopes)}


class Undoing:
    """One peer's side of undoing contributions: the coordinator schedules, everyone loads the
    values at the round that subtracts them (`subtract`)."""

    def __init__(self, ctx: RoundContext, collection: Collection):
        self.ctx, self.collection = ctx, collection
        self._scheduled: dict[int, dict[str, torch.Tensor]] = {}  # (the coordinator's) round -> values

    def schedule(self, r: int, undone: list[Undone], shares: dict[str, torch.Tensor]) -> None:
        """(The coordinator) Round r subtracts `shares` (float64, what the `undone` contributions
        added to their rounds): serve them rounded as a reduced part travels, and say so."""
        ctx = self.ctx
        full = {name: shares[name] if name in shares else torch.zeros(shape, dtype=torch.float64)
                for name, shape in _shapes(ctx, undone).items()}
        tensors = reduced_tensors(full, ctx.cfg.reduced_dtype)
        digest = reduced_digest(tensors, _labels(undone))
        ctx.serve(r, ctx.keys.undo_blob(r, digest), encode_reduced(tensors))
        self._scheduled[r] = dequantized(tensors, ctx.cfg.reduced_dtype, shapes_of(full))
        dht_io.store(ctx.dht, ctx.keys.undo(r), ctx.identity, UndoRecord(round=r, undone=undone, digest=digest),
                     ctx.expiration())

    def load(self, mr: MergeRound) -> dict[str, torch.Tensor] | None:
        """What round `mr.round` subtracts from its totals: the coordinator's own, or, read from its
        record and fetched from it, checked against the record's digest and against what the
        contributions it names could have added. None if nothing (or it cannot be had)."""
        ctx, r = self.ctx, mr.round
        if ctx.is_authority:
            for old in [k for k in self._scheduled if k < r]:
                del self._scheduled[old]
            return self._scheduled.pop(r, None)
        if ctx.cfg.verify_rate <= 0:
            return None
        record = dht_io.by_writer(ctx.read(ctx.keys.undo(r), UndoRecord, ctx.clock.now(), thorough=True)).get(ctx.authority)
        if record is None or record.round != r:
            return None
        cfg = ctx.cfg
        bound = ReducedBound(heads=sum(u.heads for u in record.undone), contributions=len(record.undone),
                             max_update=cfg.max_update, max_relative_update=cfg.max_relative_update, reach=ctx.reach)
        targets = frozenset(_shapes(ctx, record.undone))
        for address in self.collection.coordinator_p2p(mr):
            try:
                blob = ctx.server.fetch(address, ctx.keys.undo_blob(r, record.digest), cfg.request_timeout,
                                        ctx.max_contribution_bytes)
                values = decode_reduced(blob, ctx.model, targets, _labels(record.undone), record.digest,
                                        cfg.reduced_dtype, bound)
            except ContributionError as exc:
                log.warning("round %d: the coordinator's undo is bad: %s", r, exc)
            except NETWORK_ERRORS as exc:
                log.warning("round %d: could not fetch what the round undoes: %s", r, exc)
            else:
                log.info("round %d: taking out %s", r, ", ".join(_labels(record.undone)))
                return values
        return None


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
