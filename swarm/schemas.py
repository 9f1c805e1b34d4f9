"""The typed records peers write into the DHT, and how they go on the wire (`parse`, `dump`).
Anything read back is validated against these models; a record that does not fit is dropped (and
logged), never trusted. Storing and reading them is `swarm.dht_io`'s."""

from __future__ import annotations

import enum
import logging
from typing import Annotated, Any, ClassVar, TypeVar

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import RecordValidatorBase
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from swarm.identity import FINGERPRINT_CHARS

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)


MAX_RECORD_TTL = 3600.0  # no record of a run is meant to live longer (checked when read)

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")]
PeerAddress = Annotated[str, StringConstraints(min_length=1, max_length=128)]
HeadId = Annotated[int, Field(ge=0, le=1_000_000)]


class _Record(BaseModel):
    """A record of the run. The records a round reads again and again (leases, ready records,
    votes, the sums of the parts, the progress) name their fields on the wire by a letter or two
    (`alias`): every read of such a key carries every member's record, and spelled-out names were
    a sixth to a third of its bytes. Either name parses; `dump` writes the short one."""

    # Floats must be finite: an infinite ready time or training time would stall every round.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              validate_by_name=True, validate_by_alias=True)
    COMPACT: ClassVar[bool] = True  # stored without the fields at their defaults (see `dump`)


class RunRecord(_Record):
    run_id: str
    config: dict[str, Any]
    coordinator: Fingerprint = Field(description="fingerprint of the coordinator's signing key")
    created: float


class RunAnnouncement(_Record):
    created: float
    model: str


class LeaseRecord(_Record):
    """A claim on `head` by the record's writer (named by its subkey)."""

    head: HeadId = Field(alias="h")
    claimed_at: float = Field(alias="c")
    released: bool = Field(False, alias="x")


class InviteRecord(_Record):
    """The coordinator's signature admitting `member` (a key fingerprint) to a closed run until
    `expires`. `authority` is the coordinator's public key, so that anyone can check the signature
    against the fingerprint the run id pins. Its holder publishes it under its own subkey."""

    run_id: str = Field(max_length=63)
    member: Fingerprint
    expires: int = Field(ge=0)
    authority: str = Field(max_length=2048)
    signature: str = Field(max_length=2048)


class MemberRecord(_Record):
    """A member of a closed run says where it is reached: `p2p`, its libp2p peer id, which the
    transport authenticates on every connection, so the writer's signature over this record binds
    its key to that peer id. A member the run's config does not list adds the coordinator's
    `invite` admitting its key. Written under the member's own subkey of the run's member key."""

    p2p: PeerAddress = Field(alias="p")
    invite: InviteRecord | None = Field(None, alias="i")


class RevocationRecord(_Record):
    """Members of a closed run whose invites no longer admit them, written by the coordinator
    (only its record counts): a member is out as soon as the nodes read it."""

    revoked: list[Fingerprint] = Field(max_length=4096, alias="v")


class DonorRecord(_Record):
    """The writer can hand out W of `round` (hashing to `digest`) from P2P address `p2p`."""

    round: int = Field(ge=0, alias="r")
    digest: Digest = Field(alias="d")
    p2p: PeerAddress = Field(alias="p")


class ReadyRecord(_Record):
    """A contribution to merge round `round`: the heads it covers, their local steps, its size,
    and where to download it."""

    round: int = Field(ge=0, alias="r")
    heads: list[HeadId] = Field(min_length=1, max_length=4096, alias="h")
    head_steps: int = Field(ge=0, alias="s")
    nbytes: int = Field(ge=0, alias="n")
    ready_at: float = Field(alias="t")
    train_seconds: float = Field(0.0, ge=0.0, alias="ts", description="how long its T steps took")
    p2p: PeerAddress = Field(alias="p")
    pushed: Digest | None = Field(
        None, alias="u", description="set by a peer that cannot accept connections: the sha256 of the JSON list of its blobs' "
                          "digests (the whole contribution, then each part), which it pushes to peers that can")
    zero_baseline: bool = Field(
        False, alias="z", description="its heads' baseline factors are all zero (none of their work is in W yet): its compact "
                           "blobs leave them out and anyone can put them back")
    starts: list[Digest] | None = Field(
        None, max_length=4096, alias="g", description="per head (in `heads` order), the digest of what its round began "
        "from (`peers.verify.RoundStart`), which the writer serves: the round can be redone from it and W")

    @field_validator("heads")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("a head is listed twice")
        return value

    @model_validator(mode="after")
    def _one_start_per_head(self) -> "ReadyRecord":
        if self.starts is not None and len(self.starts) != len(self.heads):
            raise ValueError("starts and heads differ in length")
        return self


class HashRecord(_Record):
    """A peer's W after merge round `round`, and the contributors it merged (sorted fingerprints)."""

    round: int = Field(ge=0, alias="r")
    digest: Digest = Field(alias="d")
    members: list[Fingerprint] = Field(max_length=4096, alias="m")


class BeaconRecord(_Record):
    """The coordinator's seed for an epoch of rounds (`rounds.plan.epoch`): a value nobody else can
    compute, from which every peer orders the epoch's owners alike (`rounds.plan.servers`)."""

    epoch: int = Field(ge=0, alias="e")
    seed: Digest = Field(alias="s")


class FetchedRecord(_Record):
    """The contributors of merge round `round` whose whole contributions the coordinator fetched and
    accepted, published once it has fetched them all (it recomputes every part): the other peers
    leave out of the round whom it could not fetch, so that their W is the coordinator's."""

    round: int = Field(ge=0, alias="r")
    members: list[Fingerprint] = Field(max_length=4096, alias="m")


class Verdict(_Record):
    """One contribution redone: its writer, the heads redone, how far the contribution was from the
    redo (`peers.verify.mismatch`, capped), and whether that is within the tolerance."""

    writer: Fingerprint = Field(alias="w")
    heads: list[HeadId] = Field(min_length=1, max_length=4096, alias="h")
    mismatch: float = Field(ge=0.0, le=1e9, alias="m")
    passed: bool = Field(alias="p")


class VerdictRecord(_Record):
    """Verdicts on the contributions of merge round `round` its writer redid: the coordinator's, or
    a verifier's on the checks the coordinator gave it (`RoundChecks`)."""

    round: int = Field(ge=0, alias="r")
    verdicts: list[Verdict] = Field(max_length=4096, alias="v")


class Check(_Record):
    """One contribution to redo: its writer and heads, the digests of the starts its writer
    committed to (its ready record's, in `heads` order) and the sha256 of the contribution."""

    writer: Fingerprint = Field(alias="w")
    heads: list[HeadId] = Field(min_length=1, max_length=4096, alias="h")
    starts: list[Digest] = Field(min_length=1, max_length=4096, alias="g")
    contribution: Digest = Field(alias="c")


class RoundChecks(_Record):
    """The coordinator's checks of merge round `round`, given to `verifiers` (spare volunteers): W
    as the round began (`w`, its state digest) and the checked writers' starts and contributions,
    all to be fetched from the coordinator at `p2p`."""

    round: int = Field(ge=0, alias="r")
    w: Digest = Field(alias="d")
    p2p: PeerAddress = Field(alias="p")
    verifiers: list[Fingerprint] = Field(min_length=1, max_length=8, alias="v")
    checks: list[Check] = Field(min_length=1, max_length=4096, alias="c")


class CheckRecord(_Record):
    """The rounds whose checks are out (`RoundChecks`), oldest first: one record that every spare
    volunteer reads now and then to learn whether it has work."""

    rounds: list[RoundChecks] = Field(max_length=16, alias="k")


class Undone(_Record):
    """A writer's contributions taken out of W again: those of `rounds` merge rounds from `first`
    to `last` that no verdict passed, each covering `heads` heads (what bounds their values)."""

    writer: Fingerprint = Field(alias="w")
    first: int = Field(ge=0, alias="f")
    last: int = Field(ge=0, alias="l")
    rounds: int = Field(ge=1, le=1_000_000, alias="n")
    heads: int = Field(ge=1, le=4096, alias="h")


class RolledBack(_Record):
    """Every contribution merged in rounds `first` to `last` taken out again: `contributions` of
    them, covering `heads` heads in all (what bounds their values)."""

    first: int = Field(ge=0, alias="f")
    last: int = Field(ge=0, alias="l")
    contributions: int = Field(ge=1, le=1_000_000, alias="n")
    heads: int = Field(ge=1, le=1_000_000, alias="h")


class UndoRecord(_Record):
    """The coordinator's word that merge round `round` subtracts from its totals what the
    contributions `undone` added to theirs (their writers' found not to reproduce), as one reduced
    blob (the run's `reduced_dtype`) that hashes, with `undone`, to `digest` (`wire.reduced_digest`)."""

    round: int = Field(ge=0, alias="r")
    undone: list[Undone] = Field(min_length=1, max_length=64, alias="u")
    digest: Digest = Field(alias="d")
    rollback: RolledBack | None = Field(
        None, alias="b", description="the blob takes out every contribution of these rounds (the undone writers' "
                                     "among them), and every head starts afresh after the round")


class Reduction(_Record):
    """One part of W reduced by its owner: which of its record's members it sums (ascending
    indices into `PartRecord.members`) and the digest of its values and members."""

    part: int = Field(ge=0, le=1_000_000, alias="i")
    members: list[Annotated[int, Field(ge=0, le=4095)]] = Field(max_length=4096, alias="m")
    digest: Digest = Field(alias="d")


class PartRecord(_Record):
    """Every reduction an owner published in merge round `round`, and where to download them. One
    record per owner, rewritten as it reduces more: a round's polls read all of them, and each
    record carries its writer's key and signature (most of its bytes). The contributors are
    listed once, and each reduction names its own by index: a record that spelled them out in
    every reduction would grow with the square of the round's size."""

    round: int = Field(ge=0, alias="r")
    members: list[Fingerprint] = Field(max_length=4096, alias="m")
    reductions: list[Reduction] = Field(max_length=4096, alias="x")
    p2p: PeerAddress = Field(alias="p")

    @model_validator(mode="after")
    def _indices(self) -> "PartRecord":
        if self.members != sorted(set(self.members)):
            raise ValueError("members are not sorted and distinct")
        for rec in self.reductions:
            if rec.members != sorted(set(rec.members)) or (rec.members and rec.members[-1] >= len(self.members)):
                raise ValueError(f"part {rec.part} names members by indices that are not ascending and in range")
        return self

    @classmethod
    def of(cls, round_: int, reductions: list[tuple[int, tuple[str, ...], str]], p2p: str) -> "PartRecord":
        """The record of (part, sorted contributors, digest) reductions."""
        members = sorted({m for _, summed, _ in reductions for m in summed})
        index = {m: k for k, m in enumerate(members)}
        return cls(round=round_, members=members, p2p=p2p, reductions=[
            Reduction(part=part, members=sorted(index[m] for m in summed), digest=digest)
            for part, summed, digest in reductions])

    def reduced(self) -> list[tuple[int, tuple[str, ...], str]]:
        """(part, sorted contributors, digest) of each reduction: what `of` was given."""
        return [(rec.part, tuple(self.members[k] for k in rec.members), rec.digest) for rec in self.reductions]


def parse(model: type[T], value: Any, where: str = "") -> T | None:
    """Validate one DHT value; None (with a warning) if it does not fit the schema."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        log.warning("dropping malformed %s record%s: %s", model.__name__, f" at {where}" if where else "",
                    exc.errors()[0].get("msg", exc))
        return None


def dump(record: BaseModel) -> dict[str, Any]:
    """A record as stored: fields at their defaults are left out (every read of a round's key
    carries every member's record), and `parse` puts them back."""
    return record.model_dump(mode="json", by_alias=True, exclude_defaults=getattr(record, "COMPACT", False))


# ---- signed status records (checked inside the DHT by hivemind's validators) ---------------
# hivemind's SchemaValidator works with pydantic v1 models; `identity.SignatureValidator` makes the
# `[owner:<public key>]` subkey writable only by the holder of that key.

class PeerPhase(str, enum.Enum):
    """What a peer is doing, as its status record says and the status view shows it."""

    SYNCING = "syncing"      # downloading W from a donor
    WAITING = "waiting"      # holds heads; the first round waits for `swarm.min_heads` heads
    STANDBY = "standby"      # no free head: waits for one (following no round), fetches W once it wins it
    TRAINING = "training"    # T local steps of its heads
    MERGING = "merging"      # in a merge round


PEER_STATES = tuple(p.value for p in PeerPhase)


def _status_models():
    """The DHT-side twin of `PeerStatus` (hivemind's SchemaValidator takes pydantic-v1 models),
    built at import time under stable module-level names so that it pickles into the DHT's
    process. A test keeps the two field for field."""
    from typing import Dict, List, Optional

    import pydantic.v1 as v1
    from hivemind.dht.schema import BytesWithPublicKey

    def strict_int(ge: int):
        return v1.conint(ge=ge, strict=True)

    # create_model, not class syntax: this module's postponed annotations are opaque to pydantic v1.
    peer_status = v1.create_model(
        "PeerStatusV1",
        __module__=__name__,
        __config__=type("Config", (), {"extra": v1.Extra.forbid}),
        run_id=(v1.StrictStr, ...),
        peer=(v1.constr(regex=f"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$", strict=True), ...),
        state=(v1.constr(regex=f"^({'|'.join(PEER_STATES)})$", strict=True), ...),
        heads=(List[strict_int(0)], ...),
        round=(strict_int(0), ...),
        step=(strict_int(0), ...),
        last_merged_round=(strict_int(-1), ...),
        loss=(Optional[v1.StrictFloat], None),
        samples_per_second=(v1.confloat(ge=0.0, strict=True), ...),
        bytes_sent=(strict_int(0), ...),
        bytes_received=(strict_int(0), ...),
        device=(v1.StrictStr, ...),
        storage=(v1.StrictStr, ...),
        digest=(v1.StrictStr, ...),
        time=(v1.StrictFloat, ...),
        verifies=(v1.StrictBool, False),
    )
    run_status = v1.create_model("RunStatusSchemaV1", __module__=__name__,
                                 peers=(Dict[BytesWithPublicKey, peer_status], None))
    return peer_status, run_status


PeerStatusV1, RunStatusSchemaV1 = _status_models()


class RunScopeValidator(RecordValidatorBase):
    """Rejects status records under a run's key that name another run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.key_id = DHTID.generate(source=f"{run_id}_peers").to_bytes()

    def validate(self, record) -> bool:
        if record.key != self.key_id:
            return True
        try:
            value = DHTProtocol.serializer.loads(record.value)
        except Exception:
            return False
        return isinstance(value, dict) and value.get("run_id") == self.run_id

    def merge_with(self, other) -> bool:
        return isinstance(other, RunScopeValidator) and other.run_id == self.run_id


def run_validators(run_id: str) -> list:
    """What every node of run `run_id` adds to its DHT once it knows the run, on top of the signing
    validators it started with: the status schema and the run scope."""
    from hivemind.dht.schema import SchemaValidator

    return [SchemaValidator(RunStatusSchemaV1, prefix=run_id), RunScopeValidator(run_id)]


class PeerStatus(_Record):
    """What a peer says about itself, signed with its own key (see `run_validators`)."""

    COMPACT: ClassVar[bool] = False  # hivemind's schema validator refuses a record that parses into more fields

    run_id: str
    peer: Fingerprint
    state: PeerPhase
    heads: list[int]
    round: int = Field(ge=0)
    step: int = Field(ge=0)
    last_merged_round: int = Field(ge=-1)
    loss: float | None = None
    samples_per_second: float = Field(ge=0.0)
    bytes_sent: int = Field(ge=0)
    bytes_received: int = Field(ge=0)
    device: str
    storage: str
    digest: str
    time: float
    verifies: bool = False  # standing by, it redoes the rounds the coordinator gives it (`peers.verifier`)

    @field_validator("state", mode="before")
    @classmethod
    def _phase_from_text(cls, value: Any) -> Any:
        """The DHT carries the phase as its text; strict mode would take only the enum itself."""
        return PeerPhase(value) if isinstance(value, str) and value in PEER_STATES else value

    @field_validator("heads")
    @classmethod
    def _heads_non_negative(cls, value: list[int]) -> list[int]:
        if any(h < 0 for h in value):
            raise ValueError("head ids are never negative")
        return value


DECISIONS_KEPT = 8  # rounds whose decision the progress record repeats


class RoundSummary(_Record):
    round: int = Field(ge=0, alias="r")
    time: float = Field(alias="t")
    samples: int = Field(ge=0, alias="s")
    members: int = Field(ge=0, alias="m")
    accuracy: float | None = Field(None, alias="a")
    loss: float | None = Field(None, alias="l")


class RunProgress(_Record):
    """The coordinator's account of the run: the agreed W (its round and digest), and the rounds
    so far with test accuracy and loss. Newcomers accept only W that hashes to `digest`."""

    round: int = Field(ge=0, alias="r")
    digest: Digest = Field(alias="d")
    rounds_total: int = Field(ge=0, alias="n")
    samples: int = Field(ge=0, alias="s")
    history: list[RoundSummary] = Field(alias="h")
    # The coordinator's votes on the latest rounds it merged, republished with its progress: its
    # vote itself is written once, at the nodes then nearest to the key, and a wave of newcomers
    # nearer to it hides it from every later read. A round's outcome must stay readable.
    decisions: list[HashRecord] = Field(default_factory=list, max_length=DECISIONS_KEPT, alias="v")
