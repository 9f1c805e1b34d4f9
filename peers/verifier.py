"""A spare volunteer's checks: a volunteer standing by without a head redoes the rounds the
coordinator gives it (`peers.verification`), so that the coordinator does not.

Now and then (each time it asks for a free head) it reads the coordinator's record of the checks
that are out; for a round that names it, it downloads from the coordinator W as the round began
(accepted only if it hashes to the digest the signed record names), each checked writer's
contribution and the starts it committed to (the record names their digests, copied from the
writer's signed ready record), redoes each head's round on the run's own data and publishes its
verdicts, signed. Its work costs it one W and the checked blobs per round given, and a head's T
steps per check; a volunteer whose data is not the run's cannot redo anyone's round and does not
offer to."""

from __future__ import annotations

import hashlib
import logging

from peers.data import DataSource
from peers.models import create_lte_model
from peers.verify import judge, start_bound, verdict
from swarm import dht_io
from swarm.config import RunConfig
from swarm.lte_model import LTEModel
from swarm.rounds.context import RoundContext
from swarm.rounds.state_transfer import state_timeout
from swarm.schemas import CheckRecord, RoundChecks, Verdict, VerdictRecord
from swarm.transport import NETWORK_ERRORS
from swarm.wire import ContributionError, decode_state

log = logging.getLogger(__name__)


class Verifier:
    """The checks of one spare volunteer (`ctx`: its rounds' context; `source`: the run's data)."""

    def __init__(self, cfg: RunConfig, ctx: RoundContext, source: DataSource, events, device="cpu"):
        self.cfg, self.ctx, self.source, self.events, self.device = cfg, ctx, source, events, device
        self.done: set[int] = set()  # rounds whose checks given to us we did (or gave up)
        self.checked = 0  # contributions redone, all run long
        self._w: LTEModel | None = None  # holds W of the round checked (not the volunteer's own W)
        self._start_bytes = start_bound(ctx.model)  # what fetching one head's start may take

    def poll(self) -> None:
        """Read the checks that are out; do those given to us that we have not done."""
        ctx = self.ctx
        record = dht_io.by_writer(ctx.read(ctx.keys.checks, CheckRecord, ctx.clock.now())).get(ctx.authority)
        if record is None:
            return
        for given in record.rounds:
            if ctx.peer in given.verifiers and given.round not in self.done:
                self.done.add(given.round)
                self._check(given)

    def _check(self, given: RoundChecks) -> None:
        ctx, r = self.ctx, given.round
        swarm = ctx.cfg
        if self._w is None:
            self._w = create_lte_model(self.cfg, [], self.device)
        try:
            blob = ctx.server.fetch(given.p2p, ctx.keys.check_blob(r, "w"),
                                    state_timeout(swarm.request_timeout, ctx.max_state_bytes), ctx.max_state_bytes)
            decode_state(blob, self._w, expect_digest=given.w, expect_round=r)
        except NETWORK_ERRORS + (ContributionError,) as exc:
            log.warning("round %d: cannot check: W as the round began is not to be had: %s", r, exc)
            return
        w = self._w.shared_state()
        verdicts = []
        for check in given.checks:
            ctx.keep_alive()
            try:
                contribution = ctx.server.fetch(given.p2p, ctx.keys.check_blob(r, check.writer), swarm.request_timeout,
                                                ctx.max_contribution_bytes)
                starts = [ctx.server.fetch(given.p2p, ctx.keys.check_blob(r, f"{check.writer}/{head}"),
                                           swarm.request_timeout, self._start_bytes) for head in check.heads]
            except NETWORK_ERRORS as exc:
                log.info("round %d: cannot fetch the check of %s: %s", r, check.writer[:8], exc)
                continue
            if hashlib.sha256(contribution).hexdigest() != check.contribution:
                log.warning("round %d: the contribution of %s handed out is not the one checked", r, check.writer[:8])
                continue
            distance, _ = judge(self.cfg, w, self._w, check.writer, check.heads, check.starts, starts, contribution,
                                self.source)
            found = verdict(check.writer, check.heads, distance)
            verdicts.append(self.judged(found))
            self.checked += 1
            self.events.emit("checked", round=r, writer=check.writer, mismatch=found.mismatch, passed=found.passed)
        if verdicts:
            dht_io.store(ctx.dht, ctx.keys.verdicts(r), ctx.identity, VerdictRecord(round=r, verdicts=verdicts),
                         ctx.expiration())

    def judged(self, verdict: Verdict) -> Verdict:
        """The verdict we publish on a check we redid (what a dishonest verifier would change)."""
        return verdict
