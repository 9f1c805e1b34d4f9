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
from swarm.schemas import Undone, UndoRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import (ContributionError, ReducedBound, decode_reduced, dequantized, encode_reduced, merged_shapes,
                        reduced_digest, reduced_tensors, shapes_of)

log = logging.getLogger(__name__)

UNDO_DELAY = 2  # a contribution to round r found not to reproduce is taken out at round r + UNDO_DELAY


def _labels(undone: list[Undone]) -> list[str]:
    """What an undo blob's digest binds its values to: the contributions it takes out."""
    return [f"{u.first}-{u.last}x{u.rounds}/{u.writer}" for u in undone]


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
        found.undone = found.undone.model_copy(update={"last": r, "rounds": found.undone.rounds + 1,
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
        self._scheduled: dict[int, dict[str, torch.Tensor]] = {}  # (the coordinator's) round -> values

    def schedule(self, r: int, undone: list[Undone], shares: dict[str, torch.Tensor]) -> None:
        """(The coordinator) Round r subtracts `shares` (float64, what the `undone` contributions
        added to their rounds): serve them rounded as a reduced part travels, and say so."""
        ctx = self.ctx
        full = {name: shares[name] if name in shares else torch.zeros(shape, dtype=torch.float64)
                for name, shape in merged_shapes(ctx.model).items()}
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
        bound = ReducedBound(heads=sum(u.heads * u.rounds for u in record.undone),
                             contributions=sum(u.rounds for u in record.undone), max_update=cfg.max_update,
                             max_relative_update=cfg.max_relative_update, reach=ctx.reach)
        targets = frozenset(merged_shapes(ctx.model))
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
