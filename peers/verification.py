"""The coordinator's side of redoing rounds (`swarm.verify_rate`): which contributions are redone,
by whom, and what follows from the verdicts.

After it merged round r, the coordinator draws a share of the round's heads from its signature
over the round (`peers.verify.sampled`: no holder can tell before it offered), fetches each drawn
contribution and the starts its writer committed to, and gives them out as the round's checks
(`RoundChecks`) to `swarm.verifiers` spare volunteers (standing by without a head; drawn alike),
serving them W as the round began. A verifier redoes each check (`peers.verifier`) and publishes its
verdicts. The rule over them:

- every verifier given the check passed it: it passes (the coordinator redid nothing);
- any verifier failed it, or not all of them answered within a round's timeout: the coordinator
  redoes it itself, and its own verdict decides;
- a verifier whose verdict the coordinator's redo contradicts beyond doubt (it passed a check that
  is far outside the tolerance, or failed one well within it) lied, and is revoked.

So a lying verifier can neither evict an honest volunteer nor pass a cheat alone: only every
verifier of a check lying alike passes a cheat, and a verifier that lies once is out. With no spare
volunteer (or `swarm.verifiers: 0`) the coordinator redoes every drawn contribution at once.

A contribution that does not reproduce is taken out again with all its writer added in the rounds
no verdict passed (`swarm.rounds.undo`), whichever round the verdict comes in."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from peers.data import DataSource, ImageShape
from peers.verify import TOLERANCE, judge, sampled, start_bound, verdict
from swarm import dht_io
from swarm.config import RunConfig
from swarm.rounds import RoundResult
from swarm.rounds.undo import Unverified
from swarm.schemas import (Check, CheckRecord, PeerStatus, ReadyRecord, RolledBack, RoundChecks, Undone, Verdict,
                           VerdictRecord)
from swarm.transport import NETWORK_ERRORS
from swarm.wire import Contribution, clipped_share, encode_shared_state

log = logging.getLogger(__name__)

MAX_OUT = 4  # most rounds whose checks are out at once (each holds a copy of W); older ones the coordinator redoes
# A verifier contradicted by the coordinator's redo lied only beyond doubt: it passed a check at least
# this many times the tolerance from its redo, or failed one within the tolerance over this.
LIE_MARGIN = 2.0


@dataclass
class Held:
    """One contribution out for checking: what its writer committed to, and what it added to W."""

    check: Check
    starts: list[bytes]
    blob: bytes
    share: dict[str, torch.Tensor] | None  # clipped as merged (None: the coordinator did not hold it)


@dataclass
class OutRound:
    """A round whose checks are out: W as it began, the checks, who was given them, until when."""

    round: int
    w: dict[str, torch.Tensor]
    digest: str
    verifiers: list[str]
    held: dict[str, Held]
    due: float
    served: list[str] = field(default_factory=list)
    decided: list[Verdict] = field(default_factory=list)


class Verification:
    """What the coordinator (`coord`: its config, keys, runtime, blob server, model, membership,
    events) knows of the rounds it redoes."""

    def __init__(self, cfg: RunConfig, coord):
        self.cfg, self.coord = cfg, coord
        self.rate = cfg.swarm.verify_rate
        self.unverified = Unverified()  # per writer, what it added in rounds no verdict passed
        self.out: dict[int, OutRound] = {}
        self.round_w: tuple[int, dict[str, torch.Tensor], str] | None = None  # W as the round in progress began
        # swarm.rollback_rounds: per recent round, its contributions and their heads (what it added
        # to W the merge keeps: `Undoing.applied`)
        self.counts: dict[int, tuple[int, int]] = {}
        self._source: DataSource | None = None
        self._start_bytes = start_bound(coord.model)  # what fetching one head's start may take

    # ---- a round begins, a round ends --------------------------------------------------------
    def begin(self, r: int) -> None:
        """Round r begins: keep W as it is, which is what its heads train on."""
        if self.rate > 0:
            state = self.coord.model.shared_state()
            self.round_w = (r, {k: v.detach().clone() for k, v in state.items()}, self.coord.protocol.w_digest())

    def after(self, result: RoundResult, shares: dict[str, dict]) -> tuple[list[str], list[str]]:
        """Round `result.round` is merged (`shares`: what each member added, clipped as merged):
        give out its checks, decide those whose verdicts are in or due. Returns the writers whose
        contributions do not reproduce (to be taken out and revoked) and the verifiers that lied."""
        if self.rate <= 0:
            return [], []
        ready = self._ready(result)
        self._count(result, ready)
        self._draw(result, shares, ready)
        failed, liars = self._decide()
        self.unverified.forget(result.round)
        if self.cfg.swarm.verifiers > 0:
            self._publish()
        return failed, liars

    def take_out(self, writers: list[str], r: int) -> tuple[list[Undone], dict[str, torch.Tensor], RolledBack | None]:
        """What the undo of `writers`' contributions subtracts (decided at the end of round r), and
        forgets it here: all they added in rounds no verdict passed (their checks still out
        included), or, when those rounds are recent enough (`swarm.rollback_rounds`), every
        contribution merged since the first of them, which W then goes back before."""
        for out in self.out.values():
            for writer in [w for w in writers if w in out.held]:
                held = out.held.pop(writer)
                if held.share is not None:
                    self.unverified.add(writer, out.round, len(held.check.heads), held.share)
        undone, total = [], {}
        for writer in writers:
            entry = self.unverified.pop(writer)
            if entry is None:
                continue
            undone.append(entry.undone)
            for name, value in entry.total.items():
                total[name] = total[name] + value if name in total else value
        rolled = self._rollback(min(u.first for u in undone), r) if undone else None
        if rolled is None:
            return undone, total, None
        total, rollback = rolled
        # what every writer added in those rounds is out of W now; what they added before cannot be
        # told apart from it in their sums any more, and stays
        self.unverified = Unverified()
        for out in self.out.values():
            if out.round >= rollback.first:
                for held in out.held.values():
                    held.share = None
        return undone, total, rollback

    def _rollback(self, first: int, last: int) -> tuple[dict[str, torch.Tensor], RolledBack] | None:
        """Every contribution merged in rounds `first` to `last`, summed as applied, if they are
        few enough (`swarm.rollback_rounds`) and all known here."""
        rounds, applied = range(first, last + 1), self.coord.protocol.undoing.applied
        if len(rounds) > self.cfg.swarm.rollback_rounds or any(k not in applied or k not in self.counts for k in rounds):
            return None
        total: dict[str, torch.Tensor] = {}
        for k in rounds:
            for name, value in applied[k].items():
                total[name] = total[name] + value.double() if name in total else value.double()
        return total, RolledBack(first=first, last=last, contributions=sum(self.counts[k][0] for k in rounds),
                                 heads=sum(self.counts[k][1] for k in rounds))

    def _ready(self, result: RoundResult) -> dict[str, ReadyRecord]:
        """The ready records of `result`'s round, by writer."""
        if result.missed or not result.members:
            return {}
        coord, r = self.coord, result.round
        return {who: rec for who, rec in dht_io.by_writer(dht_io.read(coord.dht, coord.keys.ready(r), ReadyRecord,
                                                                      coord.clock.now())).items() if rec.round == r}

    def _count(self, result: RoundResult, ready: dict[str, ReadyRecord]) -> None:
        """How many contributions and heads round `result.round` merged (what bounds a rollback's values)."""
        keep = self.cfg.swarm.rollback_rounds
        if keep <= 0 or result.missed or not result.members:
            return
        r = result.round
        self.counts[r] = (len(result.members), sum(len(ready[w].heads) if w in ready else self.cfg.swarm.max_heads_per_peer
                                                   for w in result.members))
        for old in [k for k in self.counts if k <= r - keep]:
            del self.counts[old]

    def _draw(self, result: RoundResult, shares: dict[str, dict], ready: dict[str, ReadyRecord]) -> None:
        held, coord = self.round_w, self.coord
        if held is None or held[0] != result.round or result.missed or not result.members:
            return
        r, w, digest = held
        heads = sorted(h for writer in result.members if writer in ready for h in ready[writer].heads)
        chosen = set(sampled(coord.rt.identity, coord.keys.run_id, r, heads, self.rate))
        checks: dict[str, Held] = {}
        for writer in sorted(result.members):
            rec, share = ready.get(writer), shares.get(writer) or None
            if rec is None:
                continue
            if chosen & set(rec.heads):
                found = self._fetch(r, writer, rec)
                if found is not None:
                    found.share, checks[writer] = share, found
                    continue
                coord.events.emit("unverifiable", round=r, writer=writer, heads=rec.heads)
            if share is not None:
                self.unverified.add(writer, r, len(rec.heads), share)
        if not checks:
            return
        verifiers = self._verifiers(r, result.members)
        now = coord.clock.now()
        out = OutRound(r, w, digest, verifiers, checks, due=now + self.cfg.swarm.round_timeout if verifiers else now)
        self.out[r] = out
        for old in sorted(self.out)[:-MAX_OUT]:
            self.out[old].due = now  # too many out: the coordinator redoes the oldest now
        if verifiers:
            self._serve(out)
            coord.events.emit("checks", round=r, writers=sorted(checks), verifiers=verifiers)

    def _fetch(self, r: int, writer: str, rec: ReadyRecord) -> Held | None:
        """`writer`'s contribution to round r and the starts it committed to, from it (None when it
        named no start, pushed its blobs from behind a NAT, or they cannot be fetched)."""
        if rec.starts is None or rec.pushed is not None:
            return None
        coord, swarm = self.coord, self.cfg.swarm
        ctx = coord.protocol.ctx
        coord.keep_published()  # fetches take up to a request timeout each
        try:
            starts = [coord.server.fetch(rec.p2p, coord.keys.round_start_blob(r, writer, head), swarm.request_timeout,
                                         self._start_bytes) for head in rec.heads]
            blob = coord.server.fetch(rec.p2p, coord.keys.contribution_blob(r, writer), swarm.request_timeout,
                                      ctx.max_contribution_bytes)
        except NETWORK_ERRORS as exc:
            log.info("round %d: cannot fetch what %s committed to: %s", r, writer[:8], exc)
            return None
        check = Check(writer=writer, heads=rec.heads, starts=rec.starts, contribution=hashlib.sha256(blob).hexdigest())
        return Held(check, starts, blob, None)

    def _verifiers(self, r: int, members: list[str]) -> list[str]:
        """Up to `swarm.verifiers` spare volunteers for round r's checks: in the run's list of peers
        (whose records lapse soon after their peer left), offering to verify, admitted, holding no
        head and not in the round; drawn from the coordinator's signature over the round, so that
        nobody can arrange to check its own contribution."""
        coord, swarm = self.coord, self.cfg.swarm
        if swarm.verifiers <= 0:
            return []
        roster = dht_io.by_writer(dht_io.read(coord.dht, coord.keys.peers, PeerStatus, coord.clock.now()))
        holding = {*coord.leases.holders().values(), *members}
        spare = [who for who, st in roster.items()
                 if st.peer == who and st.verifies and who not in holding and coord.membership.admits(who)
                 and who not in coord.membership.revoked]
        seed = coord.rt.identity.secret_draw(f"{coord.keys.run_id}|verifiers|{r}")
        spare.sort(key=lambda who: hashlib.sha256(f"{seed}|{who}".encode()).hexdigest())
        return spare[:swarm.verifiers]

    def _serve(self, out: OutRound) -> None:
        coord, keys, r = self.coord, self.coord.keys, out.round
        blobs = {keys.check_blob(r, "w"): encode_shared_state(out.w, r, out.digest)}
        for writer, held in out.held.items():
            blobs[keys.check_blob(r, writer)] = held.blob
            for head, start in zip(held.check.heads, held.starts):
                blobs[keys.check_blob(r, f"{writer}/{head}")] = start
        for name, blob in blobs.items():
            coord.server.publish(name, blob)
        out.served = list(blobs)

    def _publish(self) -> None:
        """The rounds whose checks are out, in one record every spare volunteer reads."""
        coord = self.coord
        rounds = [RoundChecks(round=out.round, w=out.digest, p2p=coord.rt.p2p, verifiers=out.verifiers,
                              checks=[h.check for h in out.held.values()])
                  for out in sorted(self.out.values(), key=lambda o: o.round) if out.verifiers and out.held]
        dht_io.store(coord.dht, coord.keys.checks, coord.rt.identity, CheckRecord(rounds=rounds),
                     coord.clock.now() + 3 * self.cfg.swarm.round_timeout, wait=False)

    # ---- deciding ----------------------------------------------------------------------------
    def _reports(self, out: OutRound) -> dict[str, dict[str, Verdict]]:
        """Each verifier of `out` that answered: its verdict per writer."""
        if not out.verifiers:
            return {}
        coord = self.coord
        found = dht_io.by_writer(dht_io.read(coord.dht, coord.keys.verdicts(out.round), VerdictRecord,
                                             coord.clock.now()))
        reports = {}
        for who in out.verifiers:
            record = found.get(who)
            if record is not None and record.round == out.round:
                reports[who] = {v.writer: v for v in reversed(record.verdicts)}  # the first per writer
        return reports

    def _decide(self) -> tuple[list[str], list[str]]:
        failed, liars, now = {}, set(), self.coord.clock.now()
        for r in sorted(self.out):
            out = self.out[r]
            revoked = self.coord.membership.revoked | liars  # a revoked verifier's word counts no more
            if any(v in revoked for v in out.verifiers):
                out.verifiers = [v for v in out.verifiers if v not in revoked]
                if not out.verifiers:
                    out.due = now
            reports = self._reports(out)
            for writer in sorted(out.held):
                said = [reports[v][writer] for v in out.verifiers if writer in reports.get(v, {})]
                doubted = any(v.mismatch > TOLERANCE for v in said)
                if out.verifiers and len(said) == len(out.verifiers) and not doubted:
                    judged, by = Verdict(writer=writer, heads=out.held[writer].check.heads,
                                         mismatch=max(v.mismatch for v in said), passed=True), "verifiers"
                    submitted = None
                elif doubted or now >= out.due:
                    (judged, submitted), by = self._redo(out, writer), "coordinator"
                    liars |= {v for v in out.verifiers if writer in reports.get(v, {})
                              and _lied(reports[v][writer].mismatch, judged.mismatch)}
                else:
                    continue  # its verifiers are still at it
                held = out.held.pop(writer)
                out.decided.append(judged)
                self.coord.events.emit("verdict", round=r, writer=writer, heads=judged.heads,
                                       mismatch=judged.mismatch, passed=judged.passed, by=by)
                if not judged.passed:  # only a redo of ours fails a check (`submitted` is what it read)
                    log.warning("round %d: the contribution of %s (heads %s) is %.3g from its round redone: it does "
                                "not reproduce; taking out what it added in the rounds no verdict passed, and "
                                "revoking its key", r, writer[:8], judged.heads, judged.mismatch)
                    if held.share is None and submitted is not None:  # we did not hold it: as it reads, unclipped
                        held.share = clipped_share(self.coord.model, submitted, {})
                    failed[writer] = held
                    if held.share is not None:
                        self.unverified.add(writer, r, len(held.check.heads), held.share)
            if not out.held:
                self._close(out)
        for liar in sorted(liars):
            log.warning("verifier %s contradicted the coordinator's redo: revoking its key", liar[:8])
            self.coord.events.emit("lying_verifier", verifier=liar)
        return sorted(failed), sorted(liars)

    def _redo(self, out: OutRound, writer: str) -> tuple[Verdict, Contribution | None]:
        """The coordinator's own verdict on `writer`'s contribution to `out`'s round, and the
        contribution as it reads (None if it does not)."""
        cfg, held = self.cfg, out.held[writer]
        if self._source is None:
            self._source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
        self.coord.keep_published()  # a redo takes a head's T steps: peers must not take us for gone meanwhile
        distance, submitted = judge(cfg, out.w, self.coord.model, writer, held.check.heads, held.check.starts,
                                    held.starts, held.blob, self._source)
        self.coord.events.emit("redo", round=out.round, writer=writer)
        return verdict(writer, held.check.heads, distance), submitted

    def _close(self, out: OutRound) -> None:
        """Every check of `out` is decided: publish the verdicts, stop serving its blobs."""
        coord = self.coord
        for name in out.served:
            coord.server.drop(name)
        del self.out[out.round]
        if out.decided:
            dht_io.store(coord.dht, coord.keys.verdicts(out.round), coord.rt.identity,
                         VerdictRecord(round=out.round, verdicts=out.decided),
                         coord.clock.now() + 3 * self.cfg.swarm.round_timeout, wait=False)


def _lied(said: float, redone: float) -> bool:
    """Whether a verifier's mismatch `said` contradicts the coordinator's `redone` beyond doubt."""
    return (said <= TOLERANCE < redone and redone >= LIE_MARGIN * TOLERANCE) or \
        (redone <= TOLERANCE < said and redone <= TOLERANCE / LIE_MARGIN)
