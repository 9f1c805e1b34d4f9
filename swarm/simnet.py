"""The in-memory network on a modelled internet, for discrete-event swarms (`swarm.discrete`):
- DHT records live on the `STORE_REPLICAS` reachable nodes whose ids are nearest to the key (a
  node behind NAT stores nothing, as hivemind's client mode), each with hivemind's storage rules;
  a node that leaves takes its records with it, a node that joins starts empty. A store writes to
  those nodes, a read asks as many of them as the real read would and keeps the latest of what
  they answered. Finding them costs round trips (`lookup_hops`); what they answer costs bytes on
  their uplinks. Routing is otherwise perfect: every node knows who is nearest to every key.
- Blobs move over `swarm.links`, their bytes scaled per kind (`scales`), so a tiny model's blobs
  take as long as a chosen model's would while the arithmetic stays cheap.
Every DHT request and every byte is counted per node, DHT and blobs apart."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID

from swarm.discrete import Completion, EventFuture, EventLoop
from swarm.dht_io import STORE_REPLICAS
from swarm.links import Links
from swarm.memnet import MemoryBlobServer, MemoryDHT, MemoryNetwork, _Entry
from swarm.transport import PUSHED, TransferError

RECORD_OVERHEAD = 64  # bytes of key, subkey, expiration and framing around each value a node sends
REQUEST_BYTES = 200  # bytes of one DHT request (ids, key, a signature-free header)


def blob_kind(name: str) -> str:
    """What a blob is, by its name (`swarm.keys`): "state" (W handed to a joining peer), "reduced"
    (a reduced part of W's change), or "contribution" (a head's factors, whole, a part, compact,
    pushed)."""
    if name.startswith(PUSHED):
        return "contribution"
    if name.endswith("/state"):
        return "state"
    return "reduced" if "/reduced/" in name else "contribution"


class SimNetwork(MemoryNetwork):
    """Storage spread over the reachable nodes, links between all of them."""

    def __init__(self, clock, links: Links, scales: dict[str, float] | None = None, seed: int = 0):
        super().__init__(clock)
        self.rng = random.Random(seed)
        self.links = links
        self.scales = scales or {}
        self.ids: dict[str, int] = {}  # reachable, live DHT nodes -> node id
        self.held: dict[str, dict[str, _Entry]] = {}  # node -> its storage
        self._nearest: dict[str, list[str]] = {}
        self._loaded: dict = {}

    @property
    def loop(self) -> EventLoop:
        return self.links.loop

    def join(self, node: str, reachable: bool) -> None:
        if reachable:
            self.ids[node] = int(DHTID.generate(source=node.encode()))
            self.held[node] = {}
            self._nearest.clear()

    def leave(self, node: str) -> None:
        """A node left or crashed: what it stored is gone, its transfers end."""
        if self.ids.pop(node, None) is not None:
            self.held.pop(node, None)
            self._nearest.clear()
        self.links.drop(node)

    def nearest(self, key: str, count: int = STORE_REPLICAS) -> list[str]:
        found = self._nearest.get(key)
        if found is None:
            target = int(DHTID.generate(source=key))
            found = self._nearest[key] = sorted(self.ids, key=lambda n: self.ids[n] ^ target)[:STORE_REPLICAS]
        return found[:count]

    def lookup_hops(self) -> int:
        """Round trips of an iterative search to a key's nearest nodes among `len(ids)` (hivemind's
        k-buckets of 20: about one hop per factor of 20, and one to ask)."""
        return 1 + max(1, math.ceil(math.log(max(2, len(self.ids))) / math.log(20)))

    def load(self, record) -> Any:
        """Each stored value decoded once (a thousand readers poll the same records); readers
        only read what they get."""
        cache_key = (record.key, record.subkey, record.value)
        found = self._loaded.get(cache_key)
        if found is None:
            if len(self._loaded) > 50_000:
                self._loaded.clear()
            found = self._loaded[cache_key] = MemoryNetwork.load(self, record)
        return found

    def scaled(self, kind: str, nbytes: int) -> float:
        return nbytes * self.scales.get(kind, 1.0)

    # ---- storage, replica by replica -------------------------------------------------------------
    def _on(self, node: str, action: Callable[[], Any]) -> Any:
        kept = self.storage
        self.storage = self.held[node]
        try:
            return action()
        finally:
            self.storage = kept

    def put(self, key: str, subkey: Any, value: bytes, expiration: float) -> bool:
        with self.lock:
            stored = [self._on(n, lambda: MemoryNetwork.put(self, key, subkey, value, expiration))
                      for n in self.nearest(key)]
        return any(stored)

    def fetch_entry(self, key: str, holders: list[str] | None = None) -> _Entry | None:
        """The latest of what `holders` (default: every node a record is stored at) hold at `key`."""
        with self.lock:
            found = [e for n in (self.nearest(key) if holders is None else holders) if n in self.held
                     if (e := self._on(n, lambda: MemoryNetwork.fetch_entry(self, key))) is not None]
        return merged(found)


def merged(entries: list[_Entry]) -> _Entry | None:
    """One view of several nodes' answers: per subkey, the latest expiration wins (as a reader's
    merge of hivemind's answers)."""
    if not entries:
        return None
    regular = [e for e in entries if e.subkeys is None]
    if regular:
        return max(regular, key=lambda e: e.expiration)
    subkeys: dict = {}
    for entry in entries:
        for s, (value, expiration) in entry.subkeys.items():
            if s not in subkeys or expiration > subkeys[s][1]:
                subkeys[s] = (value, expiration)
    return _Entry(max(e.expiration for e in entries), subkeys=subkeys)


def _size(entry: _Entry | None) -> int:
    if entry is None:
        return 32
    if entry.subkeys is None:
        return len(entry.value) + RECORD_OVERHEAD
    return sum(len(v) + RECORD_OVERHEAD for v, _ in entry.subkeys.values())


class SimDHT(MemoryDHT):
    """A DHT node whose stores and reads take their round trips and bytes."""

    network: SimNetwork

    def _after(self, delay: float, start: Callable[[], tuple[list[Completion], Any]]) -> Completion:
        """A completion that, `delay` seconds from now, starts transfers (`start`) and is done with
        its value once they all landed."""
        done = Completion(self.network.loop)

        def begin() -> None:
            transfers, value = start()
            pending = [t for t in transfers if not t.done]
            if not pending:
                done.finish(value)
                return
            left = [len(pending)]

            def one() -> None:
                left[0] -= 1
                if left[0] == 0:
                    done.finish(value)
            for t in pending:
                t.then(one)
        self.network.loop.call_at(self.network.clock.t + delay, begin)
        return done

    def _lookup_delay(self, key: str) -> float:
        holders = self.network.nearest(key, 1)
        peer = holders[0] if holders else str(self.peer_id)
        return (self.network.lookup_hops() - 1) * self.network.links.rtt(str(self.peer_id), peer)

    def _finish(self, done: Completion, return_future: bool):
        if return_future:
            return EventFuture(self.network.loop, done)
        self.network.loop.wait(done)
        if done.error is not None:
            raise done.error
        return done.value

    def store(self, key: str, value: Any, expiration_time: float, subkey: Any = None, return_future: bool = False,
              **_):
        if not self.alive:
            raise ConnectionError("this DHT node was shut down")
        me, links = str(self.peer_id), self.network.links
        nbytes = len(DHTProtocol.serializer.dumps(value)) + RECORD_OVERHEAD + 96  # and its signature

        def start():
            stored = MemoryDHT.store(self, key, value, expiration_time, subkey)
            transfers = []
            for n in self.network.nearest(key):
                links.requests[n] += 1
                transfers.append(links.send(me, n, nbytes + REQUEST_BYTES, "dht", shared=False))
            return transfers, stored
        return self._finish(self._after(self._lookup_delay(key), start), return_future)

    def get(self, key: str, latest: bool = True, return_future: bool = False, beam_size: int = 0, **_):
        if not self.alive:
            raise ConnectionError("this DHT node was shut down")
        me, links, network = str(self.peer_id), self.network.links, self.network

        def start():
            transfers, answers = [], []
            nearest = network.nearest(key)
            asked = nearest if not beam_size or beam_size >= len(nearest) else network.rng.sample(nearest, beam_size)
            for n in asked:  # a poll asks a random few of them, as the real read does
                links.requests[n] += 1
                answers.append(answer := network.fetch_entry(key, [n]))
                transfers.append(links.send(me, n, REQUEST_BYTES, "dht", shared=False))
                transfers.append(links.send(n, me, _size(answer), "dht", shared=False))
            return transfers, self.decoded(key, merged([a for a in answers if a is not None]))
        return self._finish(self._after(self._lookup_delay(key), start), return_future)


class SimBlobServer(MemoryBlobServer):
    """Blobs that take their time over both ends' links."""

    network: SimNetwork

    def _carry(self, src: str, dst: str, name: str, nbytes: int, timeout: float) -> None:
        kind = blob_kind(name)
        done = self.network.links.send(src, dst, self.network.scaled(kind, nbytes), kind)
        self.network.loop.wait(done, timeout)
        if done.error is not None:
            raise TransferError(f"transfer of {name} from {src[-8:]} failed: {done.error}")
        if not done.done:
            raise TransferError(f"timed out after {timeout:.0f}s fetching {name} from {src[-8:]}")

    def fetch(self, peer: str, name: str, timeout: float, max_bytes: int) -> bytes:
        data = super().fetch(peer, name, timeout, max_bytes)
        self._carry(str(peer), self.peer, name, len(data), timeout)
        return data

    def push(self, peer: str, data: bytes, timeout: float) -> None:
        self._reach(peer, "pushing to")
        self._carry(self.peer, str(peer), PUSHED, len(data), timeout)
        super().push(peer, data, timeout)
