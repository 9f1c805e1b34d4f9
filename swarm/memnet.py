"""An in-memory swarm network: a DHT that applies hivemind 1.1.12's storage rules and a blob
transport, both on an injected clock, so whole rounds of many peers run in one process in
milliseconds and in a reproducible order.

It stands beside the real thing, never instead of it: the loopback swarm tests run real hivemind
peers. What it keeps from hivemind (`hivemind/dht/storage.py`, `node.py`, `validation.py`):
- a value per key, or a dictionary of subkeys each with its own value and expiration;
- for one key (and subkey) the later expiration wins, an equal or earlier one is rejected, and a
  record that has already expired is not stored; expired records vanish on read;
- an ordinary value with a later expiration replaces a whole dictionary and then blocks every
  subkey write with an earlier expiration;
- records pass through the writer's validators (`sign_value`), are checked by the storing side's
  validators (`validate`) and stripped on read (`strip_value`), on the same msgpack bytes.
What it leaves out: routing, replication lag and caching. Every node sees the same storage at once.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import ValueWithExpiration

from swarm.clock import Clock, settled
from swarm.transport import PUSHED, Inbox, TransferError, judged

_REGULAR = DHTProtocol.IS_REGULAR_VALUE


@dataclass
class _Entry:
    """One key: an ordinary value, or subkey -> (value bytes, expiration)."""

    expiration: float
    value: bytes | None = None
    subkeys: dict[Any, tuple[bytes, float]] | None = None


@dataclass
class MemoryNetwork:
    """Everything the nodes share: storage, the validators of the storing side, served blobs."""

    clock: Clock
    storage: dict[str, _Entry] = field(default_factory=dict)
    validator: CompositeValidator = field(default_factory=CompositeValidator)
    servers: dict[str, "MemoryBlobServer"] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    policy: Any = None  # what the storing side keeps (`swarm.admission.StoragePolicy`), once a run sets one

    # ---- storage rules --------------------------------------------------------------------
    def put(self, key: str, subkey: Any, value: bytes, expiration: float) -> bool:
        now = self.clock.now()
        if not expiration >= now:  # also rejects NaN
            return False
        with self.lock:
            entry = self._live(key, now)
            if subkey is None:
                if entry is not None and expiration <= entry.expiration:
                    return False
                self.storage[key] = _Entry(expiration, value=value)
                return True
            if self.policy is not None and not self._kept(key, subkey, value, expiration, now, entry):
                return False
            if entry is None or (entry.subkeys is None and expiration > entry.expiration):
                self.storage[key] = _Entry(expiration, subkeys={subkey: (value, expiration)})
                return True
            if entry.subkeys is None:
                return False
            entry.expiration = max(entry.expiration, expiration)
            old = entry.subkeys.get(subkey)
            if old is not None and old[1] >= now and expiration <= old[1]:
                return False
            entry.subkeys[subkey] = (value, expiration)
            return True

    def _kept(self, key: str, subkey: Any, value: bytes, expiration: float, now: float, entry: _Entry | None) -> bool:
        """The storage policy's verdict; a writer it does not know yet makes it read the members
        first (at once: this network has no lag to model)."""
        held = entry.subkeys if entry is not None and entry.subkeys is not None else {}
        if self.policy.due(now):
            self._refresh_policy(now)
        if self.policy.allows(key, subkey, value, expiration, now, held):
            return True
        if not self.policy.due(now):
            return False
        self._refresh_policy(now)
        return self.policy.allows(key, subkey, value, expiration, now, held)

    def _refresh_policy(self, now: float) -> None:
        reader = MemoryDHT(self, "storage")
        self.policy.learn_found(reader.get(self.policy.keys.members), reader.get(self.policy.keys.revocations), now)

    def load(self, record: DHTRecord) -> Any:
        """A stored value as a read hands it back: stripped by the validators, deserialized."""
        return DHTProtocol.serializer.loads(self.validator.strip_value(record))

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self.storage.get(key)
        if entry is None:
            return None
        if entry.subkeys is not None:
            entry.subkeys = {s: v for s, v in entry.subkeys.items() if v[1] >= now}
            if not entry.subkeys:
                del self.storage[key]
                return None
        elif entry.expiration < now:
            del self.storage[key]
            return None
        return entry

    def fetch_entry(self, key: str) -> _Entry | None:
        with self.lock:
            entry = self._live(key, self.clock.now())
            if entry is None:
                return None
            return dataclasses.replace(entry, subkeys=dict(entry.subkeys) if entry.subkeys is not None else None)


class _PeerId(str):
    """A peer id that prints like hivemind's (str() gives the id)."""

    def to_base58(self) -> str:
        return str(self)


class MemoryDHT:
    """The part of `hivemind.DHT` the swarm uses: store, get, add_validators, peer_id, shutdown."""

    def __init__(self, network: MemoryNetwork, peer_id: str, validators: list[RecordValidatorBase] | None = None):
        self.network = network
        self.peer_id = _PeerId(peer_id)
        self.validator = CompositeValidator()
        self.alive = True
        if validators:
            self.add_validators(validators)

    def add_validators(self, validators: list[RecordValidatorBase]) -> None:
        """Sign with them here; every storing node checks records with them from now on (as every
        honest node of a run installs the run's validators)."""
        self.validator.extend(validators)
        with self.network.lock:
            self.network.validator.extend(validators)

    def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None, return_future: bool = False,
              **_):
        if return_future:
            return settled(lambda: self.store(key, value, expiration_time, subkey))
        if not self.alive:
            raise ConnectionError("this DHT node was shut down")
        serializer = DHTProtocol.serializer
        key_bytes = DHTID.generate(source=key).to_bytes()
        subkey_bytes = _REGULAR if subkey is None else serializer.dumps(subkey)
        record = DHTRecord(key_bytes, subkey_bytes, serializer.dumps(value), expiration_time)
        record = dataclasses.replace(record, value=self.validator.sign_value(record))
        if not self.network.validator.validate(record):
            return False
        return self.network.put(key, subkey, record.value, expiration_time)

    def install_storage_policy(self, policy) -> None:
        """What every storing node keeps from now on (`swarm.admission`); the first one stays."""
        with self.network.lock:
            if self.network.policy is None:
                self.network.policy = policy

    def get(self, key: str, latest: bool = True, return_future: bool = False, **_):
        if return_future:
            return settled(lambda: self.get(key, latest))
        if not self.alive:
            raise ConnectionError("this DHT node was shut down")
        return self.decoded(key, self.network.fetch_entry(key))

    def decoded(self, key: str, entry: _Entry | None):
        """What a read hands back for what storage holds at `key`: values stripped of their signatures."""
        if entry is None:
            return None
        serializer = DHTProtocol.serializer
        key_bytes = DHTID.generate(source=key).to_bytes()

        def load(subkey_bytes: bytes, value: bytes, expiration: float) -> Any:
            return self.network.load(DHTRecord(key_bytes, subkey_bytes, value, expiration))

        if entry.subkeys is None:
            return ValueWithExpiration(load(_REGULAR, entry.value, entry.expiration), entry.expiration)
        items = {s: ValueWithExpiration(load(serializer.dumps(s), v, e), e) for s, (v, e) in entry.subkeys.items()}
        return ValueWithExpiration(items, entry.expiration)

    def get_visible_maddrs(self) -> list[str]:
        return [f"/memory/p2p/{self.peer_id}"]

    def shutdown(self) -> None:
        self.alive = False


class MemoryBlobServer:
    """The blob transport of `swarm.transport.BlobServer`, between nodes of one `MemoryNetwork`.
    A node that crashed (`crash()`) or shut down serves nothing: fetches from it fail as a dead
    peer's would."""

    def __init__(self, network: MemoryNetwork, peer: str):
        self.network, self.peer = network, str(peer)
        self._blobs: dict[str, bytes | Callable[[], bytes]] = {}
        self.inbox = Inbox(clock=network.clock.monotonic)
        self.serves: Callable[[str], bool] = lambda peer: True  # who may fetch from it, as BlobServer.serves
        self.unreachable = False  # a client-mode node: it can fetch and push, nobody can fetch from it
        self.stall = 0.0  # seconds each fetch from it takes (a link that trickles), in fake time
        self.stalled_fetches = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        network.servers[self.peer] = self

    def publish(self, name: str, blob: bytes | Callable[[], bytes]) -> None:
        self._blobs[name] = blob

    def drop(self, name: str) -> None:
        self._blobs.pop(name, None)

    def names(self) -> list[str]:
        return list(self._blobs)

    def lookup(self, name: str) -> bytes | None:
        if name.startswith(PUSHED):
            return self.inbox.get(name[len(PUSHED):])
        blob = self._blobs.get(name)
        return blob() if callable(blob) else blob

    def _reach(self, peer: str, what: str) -> "MemoryBlobServer":
        server = self.network.servers.get(str(peer))
        if server is None or server.unreachable:
            raise TransferError(f"{what} {str(peer)[-8:]} failed: no route to the peer")
        return server

    def push(self, peer: str, data: bytes, timeout: float) -> None:
        server = self._reach(peer, "pushing to")
        if not server.inbox.admit(self.peer) or server.inbox.put(bytes(data), self.peer) is None:
            raise TransferError(f"{str(peer)[-8:]} refused {len(data)} pushed bytes "
                                "(not a sender it admits, or its inbox is full)")
        self.bytes_sent += len(data)
        server.bytes_received += len(data)

    def fetch(self, peer: str, name: str, timeout: float, max_bytes: int) -> bytes:
        server = self._reach(peer, f"fetching {name} from")
        if server.stall > 0:  # it answers, then trickles: the fetch takes its time, or its whole timeout
            server.stalled_fetches += 1
            self.network.clock.advance(min(server.stall, timeout))
            if server.stall >= timeout:
                raise TransferError(f"timed out after {timeout:.0f}s fetching {name} from {str(peer)[-8:]}")
        data = server.lookup(name) if judged(server.serves, self.peer, "fetch") else None
        if data is None:
            raise TransferError(f"{str(peer)[-8:]} does not have {name}")
        if len(data) > max_bytes:
            raise TransferError(f"{str(peer)[-8:]} offers {len(data)} bytes for {name}, more than the limit {max_bytes}")
        server.bytes_sent += len(data)
        self.bytes_received += len(data)
        return bytes(data)

    def crash(self) -> None:
        self.network.servers.pop(self.peer, None)

    def shutdown(self) -> None:
        self.crash()
