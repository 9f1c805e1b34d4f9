"""The all-gather merge: every peer fetches every member's whole contribution and reduces all of W
itself. What a round does with fewer than three members, with fewer than two members that accept
connections, or with `swarm.merge: gather`; and the reference the owner-reduced merge must equal."""

from __future__ import annotations

import torch

from swarm.rounds.collection import Collection
from swarm.rounds.context import RoundContext
from swarm.rounds.types import MergeRound
from swarm.wire import clipped_shares, dither_seed, merged_totals


def gather(ctx: RoundContext, collection: Collection, mr: MergeRound) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The merge over every member whose contribution arrived and passed its checks (in
    fingerprint order), and the members left out (`mr.rejected`)."""
    peers = sorted(mr.ready_set)
    found = [passed[None] for passed in collection.fetch(mr, [(None, p) for p in peers])]
    contributions = [c for c in found if c is not None]
    mr.rejected = [p for p, c in zip(peers, found) if c is None]
    if ctx.is_authority and ctx.cfg.verify_rate > 0:  # what undoing one of them would take
        mr.shares = clipped_shares(ctx.model, contributions, ctx.cfg.robust_clip, mr.scope.targets)
    totals = merged_totals(ctx.model, contributions, ctx.cfg.robust_clip, ctx.cfg.reduced_dtype, mr.scope.targets,
                           dither_seed(ctx.cfg.reduced_rounding, mr.round))
    return totals, sorted(c.peer for c in contributions)
