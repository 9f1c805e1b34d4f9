"""The typed records peers write into the DHT. Anything read back is validated against these
models; a record that does not fit is dropped (and logged), never trusted."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import threading
from typing import Annotated, Any, ClassVar, TypeVar

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.timed_storage import ValueWithExpiration
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from swarm.identity import FINGERPRINT_CHARS, Identity, split_subkey
from swarm.keys import RunKeys

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

    @field_validator("heads")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("a head is listed twice")
        return value


class HashRecord(_Record):
    """A peer's W after merge round `round`, and the contributors it merged (sorted fingerprints)."""

    round: int = Field(ge=0, alias="r")
    digest: Digest = Field(alias="d")
    members: list[Fingerprint] = Field(max_length=4096, alias="m")


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


# hivemind.DHT hands every call to its process through one pipe, and a pipe's writes from two
# threads may interleave (a merge round runs beside training with swarm.overlap): one call is
# handed over at a time; the waits for the answers run side by side.
_HAND_OVER = threading.Lock()


def store(dht, key: str, identity: Identity, record: BaseModel, expiration: float, tag: str = "",
          wait: bool = True) -> bool:
    """Write one typed record under `key`, in the writer's own signed subkey (tagged `tag`); the
    boolean is only a hint, as in hivemind. `wait=False` returns once the record is handed over
    (True), not once the nodes answered: a record nothing depends on never stalls the caller."""
    with _HAND_OVER:
        if hasattr(dht, "run_coroutine"):
            future = dht.run_coroutine(functools.partial(_store_nearest, key=key, value=dump(record),
                                                         expiration=expiration, subkey=identity.subkey(tag)),
                                       return_future=True)
        else:  # the in-memory DHT stores where hivemind's search would
            future = dht.store(key, dump(record), expiration_time=expiration, subkey=identity.subkey(tag),
                               return_future=True)
    return bool(future.result()) if wait else True


def _known_nearest(node, key_id) -> list | None:
    """The node ids that hold records at `key_id`, nearest first: every node this node knows
    (itself included, unless in client mode: a copy it keeps serves nobody else). While a node
    knows fewer nodes than fill one k-bucket, its routing table holds every node it has heard of
    and no search would find nearer ones; None once it knows more: then it must search."""
    protocol = node.protocol
    known = protocol.routing_table.uid_to_peer_id
    if len(known) >= protocol.bucket_size:
        return None
    return sorted([*known, *([] if protocol.client_mode else [node.node_id])], key=key_id.xor_distance)


async def _ask_in_turn(candidates: list, want: int, ask) -> list:
    """`ask` the `want` nearest of `candidates` at once, and the next nearest for each that does
    not answer (returns None), as hivemind's store does; the answers."""
    answers: list = []
    while candidates and len(answers) < want:
        batch, candidates = candidates[:want - len(answers)], candidates[want - len(answers):]
        answers += [a for a in await asyncio.gather(*(ask(n) for n in batch)) if a is not None]
    return answers


async def _store_nearest(_dht, node, key: str, value: Any, expiration: float, subkey: bytes) -> bool:
    """Runs in the DHT's process. hivemind's store first searches for the key's nearest nodes,
    and every node the search asks answers with all the key holds: a store into a key that holds
    a record of each of 8 peers moved 28 KB on a 9-node loopback DHT (32 with RSA keys), storing
    straight at the 5 nearest nodes 7 KB. While a node knows fewer nodes than fill one k-bucket,
    its routing table holds every node it has heard of and no search would find nearer ones than
    it knows (`_known_nearest`): it stores at the `num_replicas` nearest of them straight away,
    taking the next nearest for each that does not answer, as hivemind's store does. A node that
    knows more searches first, as hivemind does."""
    from hivemind.dht.validation import DHTRecord

    protocol = node.protocol
    key_id = DHTID.generate(source=key)
    candidates = _known_nearest(node, key_id)
    if candidates is None:
        return bool(await node.store(key, value, expiration, subkey=subkey))
    known = dict(protocol.routing_table.uid_to_peer_id)  # as the candidates were taken: nodes may leave it meanwhile
    record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), protocol.serializer.dumps(value),
                       expiration)
    signed = protocol.record_validator.sign_value(record) if protocol.record_validator is not None else record.value

    async def one(node_id) -> bool | None:
        if node_id == node.node_id:
            if protocol.record_validator is not None and not protocol.record_validator.validate(
                    dataclasses.replace(record, value=signed)):
                return False
            return protocol.storage.store(key_id, signed, expiration, subkey=subkey)
        answer = await protocol.call_store(known[node_id], keys=[key_id], values=[signed],
                                           expiration_time=[expiration], subkeys=[subkey])
        return None if answer is None else bool(answer[0])

    return any(await _ask_in_turn(candidates, node.num_replicas, one))


# hivemind's `num_replicas`: a record is stored at this many of the nodes nearest to its key.
STORE_REPLICAS = 5
# The handler through which a node hands out what it holds at a key, and nothing else.
READ_HANDLER = "lte_swarm.read"
MAX_KEYS_ASKED = 16  # `_read_nearest` asks one key a call; a larger ask is answered in part


async def serve_reads(_dht, node) -> None:
    """Runs in the DHT's process, once, when the node starts. Answers `_read_nearest`: hivemind's
    `rpc_find` answer (what this node holds at the keys asked) without the nearest neighbours it
    appends to every answer (up to a k-bucket of node ids and peer ids per key, 60
    bytes a node: with 9 nodes a third of what a poll of a round's votes moved, and growing
    with the swarm). Searches still get them from `rpc_find`; a read of a key whose nearest
    nodes are known needs none."""
    from hivemind.proto import dht_pb2

    protocol = node.protocol

    async def answer(request: dht_pb2.FindRequest, context) -> dht_pb2.FindResponse:
        del request.keys[MAX_KEYS_ASKED:]
        response = await protocol.rpc_find(request, context)
        for result in response.results:
            del result.nearest_node_ids[:], result.nearest_peer_ids[:]
        return response

    await protocol.p2p.add_protobuf_handler(READ_HANDLER, answer, dht_pb2.FindRequest)


async def _read_nearest(_dht, node, key: str, replicas: int):
    """Runs in the DHT's process: what the `replicas` nodes nearest to `key` hold there (this
    node among them, unless in client mode), merged as hivemind's `get` merges (the latest entry
    of each subkey, signatures stripped). Every entry is checked by this node's validators; one
    that fails is dropped alone (hivemind drops the node's whole answer, so a node that adds one
    forged entry would hide every record it holds there).
    A node that does not answer is replaced by the next nearest, as `_store_nearest` does; one
    that has no `serve_reads` handler is asked through hivemind's `rpc_find`. A node that knows
    a k-bucket's worth of nodes searches, as hivemind does (`_known_nearest`)."""
    from hivemind.dht.node import _SearchState
    from hivemind.p2p import P2PDaemonError, P2PHandlerError
    from hivemind.proto import dht_pb2

    protocol = node.protocol
    key_id = DHTID.generate(source=key)
    candidates = _known_nearest(node, key_id)
    if candidates is None:
        return await node.get(key, latest=True, beam_size=replicas)
    known = dict(protocol.routing_table.uid_to_peer_id)  # as the candidates were taken: nodes may leave it meanwhile
    key_bytes = key_id.to_bytes()
    found = _SearchState(key_id, float("inf"), serializer=protocol.serializer, record_validator=protocol.record_validator)

    def take(result, source) -> None:
        if result.type == dht_pb2.FOUND_DICTIONARY:
            value = protocol.serializer.loads(result.value)
            if not isinstance(value, DictionaryDHTValue):
                return
            valid = DictionaryDHTValue()  # entry by entry: one forged entry does not hide the others
            for subkey, (entry, expiration) in value.items():
                if protocol._validate_record(key_bytes, protocol.serializer.dumps(subkey), entry, expiration):
                    valid.store(subkey, entry, expiration)
            if len(valid):
                found.add_candidate(ValueWithExpiration(valid, result.expiration_time), source)
        elif result.type == dht_pb2.FOUND_REGULAR and protocol._validate_record(
                key_bytes, protocol.IS_REGULAR_VALUE, result.value, result.expiration_time):
            found.add_candidate(ValueWithExpiration(result.value, result.expiration_time), source)

    async def one(node_id) -> bool | None:
        if node_id == node.node_id:
            found.add_candidate(protocol.storage.get(key_id), node_id)
            return True
        peer_id = known[node_id]
        if peer_id in node.blacklist:
            return None
        request = dht_pb2.FindRequest(keys=[key_bytes], peer=protocol.node_info)
        try:
            try:
                async with protocol.rpc_semaphore:
                    response = await asyncio.wait_for(protocol.p2p.call_protobuf_handler(
                        peer_id, READ_HANDLER, request, dht_pb2.FindResponse), protocol.wait_timeout)
            except (P2PHandlerError, P2PDaemonError):  # a node without the handler: ask it as hivemind would
                answer = await protocol.call_find(peer_id, [key_id])
                if answer is None:
                    raise ConnectionError("no answer")
                value, _ = answer[key_id]
                found.add_candidate(value, node_id)
                return True
            if len(response.results) == 1:
                take(response.results[0], node_id)
        except Exception:
            node.blacklist.register_failure(peer_id)
            asyncio.create_task(protocol.update_routing_table(node_id, peer_id, responded=False))
            return None
        node.blacklist.register_success(peer_id)
        return True

    await _ask_in_turn(candidates, replicas, one)
    found.finish_search()
    return found.future.result()


Signed = dict[tuple[str, str], tuple[T, float]]


READ_TIMEOUT = 10.0  # seconds: a DHT read never blocks a peer for longer


def _ask(dht, key: str, replicas: int = 0):
    """What the DHT holds at `key`, handed over; answered by `_answer`. Only the `replicas` nodes
    nearest to the key are asked (`_read_nearest`); 0: all STORE_REPLICAS nodes a record is
    stored at, for a read that must not miss one."""
    replicas = replicas or STORE_REPLICAS
    with _HAND_OVER:
        if hasattr(dht, "run_coroutine"):
            return dht.run_coroutine(functools.partial(_read_nearest, key=key, replicas=replicas), return_future=True)
        return dht.get(key, latest=True, return_future=True, beam_size=replicas)  # the in-memory DHT


def _answer(future, key: str):
    """What `_ask` found, waited for at most READ_TIMEOUT: None if the DHT does not answer."""
    try:
        return future.result(timeout=READ_TIMEOUT)
    except TimeoutError:
        log.warning("the DHT did not answer for %s within %.0fs", key, READ_TIMEOUT)
        try:
            future.cancel()
        except Exception:
            pass
        return None


def _records(found, key: str, model: type[T], now: float) -> "Signed[T]":
    """The well-formed signed records of one answer (see `read`)."""
    if found is None or not isinstance(found.value, dict):
        return {}
    out: dict[tuple[str, str], tuple[T, float]] = {}
    latest = now + MAX_RECORD_TTL
    for subkey, item in found.value.items():
        who = split_subkey(subkey)
        value, expiration = getattr(item, "value", None), getattr(item, "expiration_time", 0.0)
        if who is None or not isinstance(expiration, (int, float)) or not now <= expiration <= latest:
            continue
        record = parse(model, value, where=f"{key}/{who[0]}:{who[1][:8]}")
        if record is not None:
            out[who] = (record, float(expiration))
    return out


def read(dht, key: str, model: type[T], now: float, replicas: int = 0) -> "Signed[T]":
    """Every unexpired, well-formed, signed record under `key` that does not claim to live longer
    than a record may: (tag, writer) -> (record, expiration). Anything else is dropped. `replicas`:
    see `_ask`."""
    return read_each(dht, [key], model, now, replicas)[key]


def read_each(dht, keys: list[str], model: type[T], now: float, replicas: int = 0) -> "dict[str, Signed[T]]":
    """`read` of several keys, asked all at once: the slowest answer bounds the wait, not their sum."""
    asked = {}
    for key in dict.fromkeys(keys):
        try:
            asked[key] = _ask(dht, key, replicas)
        except Exception as exc:
            log.warning("could not read %s from the DHT: %s", key, exc)
    out = {key: {} for key in keys}
    for key, future in asked.items():
        try:
            out[key] = _records(_answer(future, key), key, model, now)
        except Exception as exc:  # an undecodable value from another node: nothing here is usable
            log.warning("dropping what the DHT holds at %s: %s", key, exc)
    return out


def by_writer(records: "Signed[T]", tag: str = "") -> dict[str, T]:
    """writer -> record, for the records under `tag`."""
    return {who: record for (t, who), (record, _) in records.items() if t == tag}


# ---- signed status records (checked inside the DHT by hivemind's validators) ---------------
# hivemind's SchemaValidator works with pydantic v1 models; `identity.SignatureValidator` makes the
# `[owner:<public key>]` subkey writable only by the holder of that key.

class PeerPhase(str, enum.Enum):
    """What a peer is doing, as its status record says and the status view shows it."""

    SYNCING = "syncing"      # downloading W from a donor
    WAITING = "waiting"      # holds heads; the first round waits for `swarm.min_heads` heads
    STANDBY = "standby"      # no free head: follows the rounds, takes the next head that frees up
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


def publish_status(dht, keys: RunKeys, identity: Identity, status: PeerStatus, expiration: float,
                   roster_expiration: float | None = None, wait: bool = True) -> bool:
    """Store this peer's live status under its own key, valid until `expiration`; with
    `roster_expiration`, in the run's list of peers too (read to find the peers; rewritten seldom,
    as every store there moves the whole list). `wait`: see `store`."""
    stored = store(dht, keys.status(identity.fingerprint), identity, status, expiration, wait=wait)
    if roster_expiration is not None:
        stored = store(dht, keys.peers, identity, status, roster_expiration, wait=wait) and stored
    return stored


def read_statuses(dht, keys: RunKeys, now: float) -> list[PeerStatus]:
    """Live status records of a run, each from the peer it names: the peers the list names, each
    with the newer of its record there and under its own key (the DHT's validators already dropped
    forged and malformed records in the list; the schema checks every record once more)."""
    listed = {who: r for who, r in by_writer(read(dht, keys.peers, PeerStatus, now)).items() if r.peer == who}
    live = read_each(dht, [keys.status(who) for who in listed], PeerStatus, now)
    out = []
    for who, listed_record in listed.items():
        own = by_writer(live[keys.status(who)]).get(who)
        fits = own is not None and own.peer == who and own.run_id == keys.run_id
        out.append(own if fits and own.time >= listed_record.time else listed_record)
    return out


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
