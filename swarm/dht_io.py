"""Storing and reading the run's typed records (`swarm.schemas`) in the DHT: straight at the nodes
nearest to a key while they are known, through a read handler that leaves out hivemind's neighbour
lists, each entry checked on its own. Every value stored is a record; every value read back is
parsed against its record type and dropped if it does not fit."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import threading
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time
from hivemind.utils.timed_storage import ValueWithExpiration
from pydantic import BaseModel

from swarm.identity import Identity, split_subkey
from swarm.keys import RunKeys
from swarm.schemas import MAX_RECORD_TTL, PeerStatus, T, dump, parse

log = logging.getLogger(__name__)


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


def _known_nearest(node, key_id, members_only: bool = True) -> list | None:
    """The node ids that hold records at `key_id`, nearest first: every node this node knows
    (itself included, unless in client mode: a copy it keeps serves nobody else; in a closed run
    only its members' nodes, `swarm.admission`). While a node
    knows fewer nodes than fill one k-bucket, its routing table holds every node it has heard of
    and no search would find nearer ones; None once it knows more: then it must search."""
    protocol = node.protocol
    known = protocol.routing_table.uid_to_peer_id
    if len(known) >= protocol.bucket_size:
        return None
    policy = getattr(protocol, "lte_storage_policy", None)  # a closed run: its members' nodes only
    members = policy.member_peers(get_dht_time()) if policy is not None and members_only else None
    if members is not None:
        kept = {uid: peer for uid, peer in known.items() if peer.to_base58() in members}
        if len(kept) < len(known):  # a stranger, or a member joined since the last read: read them again soon
            policy.wants_refresh = True
            getattr(protocol, "lte_refresh", lambda now: None)(get_dht_time())
        known = kept
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
# A reader looks at no more subkeys of one writer under one key than this (the first, in subkey
# order): no writer of a run needs more (a peer's head claims are the most, one per head it holds,
# `swarm.max_heads_per_peer`), and a stranger writing thousands under a key the swarm polls would
# have every poll check every one of their signatures and parse every record.
MAX_SUBKEYS_PER_WRITER = 64
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


REBOOTSTRAP_EVERY = 5.0  # seconds between checks that a node still knows another node


async def keep_routing(_dht, node, initial_peers: list[str]) -> None:
    """Runs in the DHT's process, once, when the node starts. hivemind drops a node from the routing
    table when a call to it fails, whatever the cause, and never bootstraps again: a node whose
    every neighbour failed it once (gone for a moment, or its answers too large for p2pd) knows
    nobody for good, and every key reads as empty until it restarts. While its table is empty, this
    dials its initial peers again every REBOOTSTRAP_EVERY seconds, pings them into the table and
    looks up its neighbours, as hivemind's start does."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    targets = []
    for text in initial_peers:
        try:
            maddr = Multiaddr(str(text))
            peer_id = PeerID.from_base58(maddr["p2p"])
            targets.append((peer_id, maddr.decapsulate(Multiaddr(f"/p2p/{maddr['p2p']}"))))
        except Exception:
            continue
    if not targets:
        return

    async def watch() -> None:
        while node.is_alive:
            await asyncio.sleep(REBOOTSTRAP_EVERY)
            if node.protocol.routing_table.uid_to_peer_id:
                continue
            log.warning("this DHT node knows no other node: bootstrapping again from its %d initial peers", len(targets))
            for peer_id, maddr in targets:
                try:
                    await asyncio.wait_for(node.p2p._client.connect(peer_id, [maddr]), node.protocol.wait_timeout)
                except Exception as exc:  # the ping may still reach it, through an address p2pd kept
                    log.info("could not dial initial peer %s at %s: %s", peer_id, maddr, exc)
                await node.protocol.call_ping(peer_id)
            try:
                await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), node.protocol.wait_timeout)
            except Exception:
                pass

    asyncio.create_task(watch())


async def _read_nearest(_dht, node, key: str, replicas: int, members_only: bool = True):
    """Runs in the DHT's process: what the `replicas` nodes nearest to `key` hold there (this
    node among them, unless in client mode), merged as hivemind's `get` merges (the latest entry
    of each subkey, signatures stripped). Every entry is checked by this node's validators; one
    that fails is dropped alone (hivemind drops the node's whole answer, so a node that adds one
    forged entry would hide every record it holds there).
    A node that does not answer is replaced by the next nearest, as `_store_nearest` does; one
    that has no `serve_reads` handler is asked through hivemind's `rpc_find`. A read of fewer than
    the STORE_REPLICAS nodes every record is stored at (a poll) asks a random few of them: nodes
    whose ids a stranger chose next to the key, answering every read with nothing, would
    otherwise be the only ones a poll ever asks. A node that knows
    a k-bucket's worth of nodes searches, as hivemind does (`_known_nearest`). `members_only=False`
    asks every node known in a closed run too: the read that learns who the members are."""
    from hivemind.dht.node import _SearchState
    from hivemind.p2p import P2PDaemonError, P2PHandlerError
    from hivemind.proto import dht_pb2

    protocol = node.protocol
    key_id = DHTID.generate(source=key)
    candidates = _known_nearest(node, key_id, members_only)
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
            for subkey, (entry, expiration) in _bounded(value.items()):
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

    if replicas < STORE_REPLICAS:  # see the docstring: which of the nearest a poll asks is drawn
        nearest = candidates[:STORE_REPLICAS]
        random.shuffle(nearest)
        candidates = nearest + candidates[STORE_REPLICAS:]
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


def _bounded(items) -> list:
    """(subkey, entry) pairs of one key, at most MAX_SUBKEYS_PER_WRITER of each writer's (the first
    in subkey order; an entry of no writer passes, for the checks that drop it)."""
    per_writer: dict[str, int] = {}
    out = []
    for subkey, entry in sorted(items, key=lambda kv: kv[0] if isinstance(kv[0], bytes) else b""):
        who = split_subkey(subkey)
        if who is not None:
            per_writer[who[1]] = per_writer.get(who[1], 0) + 1
            if per_writer[who[1]] > MAX_SUBKEYS_PER_WRITER:
                continue
        out.append((subkey, entry))
    return out


def _records(found, key: str, model: type[T], now: float) -> "Signed[T]":
    """The well-formed signed records of one answer (see `read`)."""
    if found is None or not isinstance(found.value, dict):
        return {}
    out: dict[tuple[str, str], tuple[T, float]] = {}
    latest = now + MAX_RECORD_TTL
    for subkey, item in _bounded(found.value.items()):
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


# ---- peers' status records ----------------------------------------------------------------
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
