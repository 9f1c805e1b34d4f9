"""Peer-to-peer blobs over hivemind's P2P: each peer serves named byte strings (its contribution to a
merge round, its current W) and downloads those of others, with bounded waits and byte counters.

A peer that cannot accept connections (behind NAT, hivemind's client mode) pushes its blobs to
peers that can instead: they keep them in an `Inbox`, by sha256, and serve them to anyone as
`sha256:<digest>`. Content addressing makes a pushed blob verifiable wherever it came from: its
writer's signed record names the digest.

hivemind's averager returns each peer `average - own part`, so peers end a round equal only up to
rounding. lte-swarm needs bit-identical W on every peer, so it moves the exact bytes of every
contribution instead (an all-gather) and lets every peer do the same arithmetic on them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import random
import struct
import threading
import time
from typing import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.proto import runtime_pb2

from swarm.errors import Stopped

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_HEADER = struct.Struct("<BQ")  # found flag, total length
# Every stream, a download or a push, must move this many bytes a second on average, after a grace
# for its first ones: a member on a slow uplink sends far faster (32 kbit/s is the floor), and a
# stream that trickles or stalls is dropped instead of holding its reader for a whole timeout.
STREAM_MIN_RATE = 4 * 1024
STREAM_GRACE = 15.0
# libp2p refuses to dial a peer again for about this long after a dial to it failed (5 s, growing
# with repeated failures).
DIAL_BACKOFF = 5.0


class TransferError(Exception):
    """A download failed: the peer is gone, timed out, does not have the blob or sent too much."""


# What the peer loop treats as "the network let us down": warn, retry or skip, never crash.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    TransferError, TimeoutError, asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, ConnectionError, OSError,
)

Provider = Callable[[], bytes]
PUSHED = "sha256:"  # prefix of the name under which a pushed blob is served


def pushed_name(digest: str) -> str:
    return PUSHED + digest


def judged(rule: Callable[[str], bool], peer: str, what: str) -> bool:
    """`rule(peer)`, a door's verdict on a peer; a rule that fails lets nobody through."""
    try:
        return bool(rule(peer))
    except Exception:
        log.exception("could not decide whether %s may %s", peer[-8:], what)
        return False


class Inbox:
    """Blobs other peers pushed to us, by sha256, and the rules of who may push how much.

    A push is taken only from a sender `admits` accepts (by its libp2p peer id, which the transport
    authenticates; everyone by default, the merge protocol narrows it to the run's members that
    push); each sender holds at most `per_sender_bytes` (its newest pushes: an older one of its own
    makes room for a newer, never another sender's), all senders together at most `limit_bytes`
    (a push past it is refused: a flood costs the flooder's pushes, not our memory), and at most
    `max_streams` pushes of one sender are read at once. Blobs expire after `keep_seconds`.
    Thread-safe."""

    def __init__(self, limit_bytes: int = 0, keep_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 per_sender_bytes: int | None = None, max_streams: int = 2):
        self.limit_bytes, self.keep_seconds, self._clock = limit_bytes, keep_seconds, clock
        self.per_sender_bytes = per_sender_bytes  # None: limit_bytes
        self.max_streams = max_streams
        self.admits: Callable[[str], bool] = lambda sender: True
        self._blobs: dict[str, tuple[float, bytes, str]] = {}  # digest -> (when, data, sender)
        self._streams: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, sender: str) -> bool:
        """Whether `sender` may push to us at all (a failing rule admits nobody)."""
        return judged(self.admits, sender, "push")

    def sender_limit(self) -> int:
        return self.limit_bytes if self.per_sender_bytes is None else min(self.per_sender_bytes, self.limit_bytes)

    def open_stream(self, sender: str) -> bool:
        """Count a push of `sender` being read; False (and nothing counted) past `max_streams`."""
        with self._lock:
            if self._streams.get(sender, 0) >= self.max_streams:
                return False
            self._streams[sender] = self._streams.get(sender, 0) + 1
            return True

    def close_stream(self, sender: str) -> None:
        with self._lock:
            left = self._streams.get(sender, 0) - 1
            if left > 0:
                self._streams[sender] = left
            else:
                self._streams.pop(sender, None)

    def put(self, data: bytes, sender: str = "") -> str | None:
        """Keep `data` pushed by `sender`; its digest, or None if refused."""
        digest = hashlib.sha256(data).hexdigest()
        now = self._clock()
        with self._lock:
            for key in [k for k, (t, _, _) in self._blobs.items() if now - t > self.keep_seconds]:
                del self._blobs[key]
            if digest in self._blobs:
                return digest
            if len(data) > self.sender_limit():
                return None
            own = sorted((t, k) for k, (t, _, who) in self._blobs.items() if who == sender)
            held = sum(len(self._blobs[k][1]) for _, k in own)
            while own and held + len(data) > self.sender_limit():  # the sender's oldest make room
                _, key = own.pop(0)
                held -= len(self._blobs.pop(key)[1])
            if sum(len(b) for _, b, _ in self._blobs.values()) + len(data) > self.limit_bytes:
                return None
            self._blobs[digest] = (now, data, sender)
        return digest

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            found = self._blobs.get(digest)
        return None if found is None else found[1]


class _BlobServicer(ServicerBase):
    def __init__(self, owner: "BlobServer"):
        self.owner = owner

    async def rpc_fetch(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stream blob `request.uid` to a peer `BlobServer.serves` (a closed run's members); to
        anyone else, and for a name we do not serve, "not found"."""
        loop = asyncio.get_running_loop()
        served = await loop.run_in_executor(None, self.owner.admit, str(context.remote_id))
        data = await loop.run_in_executor(None, self.owner.lookup, request.uid) if served else None
        if data is None:
            yield runtime_pb2.ExpertResponse(metadata=_HEADER.pack(0, 0))
            return
        yield runtime_pb2.ExpertResponse(metadata=_HEADER.pack(1, len(data)))
        view = memoryview(data)
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = view[start:start + CHUNK_BYTES].tobytes()
            self.owner.count(sent=len(chunk))
            yield runtime_pb2.ExpertResponse(metadata=chunk)

    async def rpc_push(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                       ) -> runtime_pb2.ExpertResponse:
        """Take a blob pushed to us in chunks; reply with its digest, or nothing if refused: when
        the inbox does not admit its sender (checked before a byte is read), the sender has
        `max_streams` pushes under way already, the blob outgrows what the sender may hold, or
        it arrives slower than `BlobServer.allowance` lets it (a stream that sends a byte and
        stalls holds nothing for long)."""
        inbox, loop = self.owner.inbox, asyncio.get_running_loop()
        sender = str(context.remote_id)
        refused = runtime_pb2.ExpertResponse(metadata=b"")
        if not await loop.run_in_executor(None, inbox.admit, sender):
            return refused
        if not inbox.open_stream(sender):
            return refused
        try:
            parts, size, limit = [], 0, inbox.sender_limit()
            chunks, started = requests.__aiter__(), loop.time()
            while True:
                left = self.owner.allowance(size) - (loop.time() - started)
                try:
                    request = await asyncio.wait_for(chunks.__anext__(), max(left, 0.0))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    log.info("a push from %s stalled after %d bytes; dropped", sender[-8:], size)
                    return refused
                size += len(request.metadata)
                if size > limit:
                    return refused
                parts.append(request.metadata)
        finally:
            inbox.close_stream(sender)
        self.owner.count(received=size)
        digest = inbox.put(b"".join(parts), sender)
        return runtime_pb2.ExpertResponse(metadata=(digest or "").encode())


class BlobServer:
    """Serves named blobs from this peer and fetches them from others, on its own event loop thread.

    The P2P instance is a replica of the DHT's (same p2pd daemon), so no extra port is opened."""

    def __init__(self, dht, namespace: str, stop: threading.Event | None = None):
        self.namespace = namespace
        self.stop = stop  # a set stop event cuts a download short (raising Stopped)
        self._blobs: dict[str, bytes | Provider] = {}
        self._lock = threading.Lock()
        self.inbox = Inbox()  # its budget and who may push are set by the merge protocol
        self.serves: Callable[[str], bool] = lambda peer: True  # who may fetch: by libp2p peer id
        self.min_rate, self.grace = STREAM_MIN_RATE, STREAM_GRACE
        self.bytes_sent = 0
        self.bytes_received = 0
        self._broken_handshakes: dict[str, float] = {}  # peer -> when a dial to it last broke in its handshake
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lte-blobs", daemon=True)
        self._thread.start()
        self._servicer = _BlobServicer(self)
        self._p2p: P2P = self._run(self._start(dht), timeout=60)

    async def _start(self, dht) -> P2P:
        p2p = await dht.replicate_p2p()
        await self._servicer.add_p2p_handlers(p2p, namespace=self.namespace)
        return p2p

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def allowance(self, nbytes: int) -> float:
        """Seconds a stream may have taken to move `nbytes`: the grace, then `min_rate`."""
        return self.grace + nbytes / self.min_rate

    # ---- serving ---------------------------------------------------------------------------
    def admit(self, peer: str) -> bool:
        """Whether to serve `peer` at all (a failing rule serves nobody)."""
        return judged(self.serves, peer, "fetch")

    def publish(self, name: str, blob: bytes | Provider) -> None:
        with self._lock:
            self._blobs[name] = blob

    def drop(self, name: str) -> None:
        with self._lock:
            self._blobs.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._blobs)

    def lookup(self, name: str) -> bytes | None:
        if name.startswith(PUSHED):
            return self.inbox.get(name[len(PUSHED):])
        with self._lock:
            blob = self._blobs.get(name)
        if blob is None:
            return None
        try:
            return blob() if callable(blob) else blob
        except Exception:  # a provider must never take the server down
            log.exception("could not produce blob %s", name)
            return None

    def count(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    # ---- fetching --------------------------------------------------------------------------
    def fetch(self, peer: str, name: str, timeout: float, max_bytes: int) -> bytes:
        """Download blob `name` from `peer`; raises TransferError on any failure, Stopped if the
        peer is asked to stop meanwhile."""
        return self._wait(self._fetch_redialing(peer, name, max_bytes), timeout, f"fetching {name} from {peer[-8:]}")

    async def _fetch_redialing(self, peer: str, name: str, max_bytes: int) -> bytes:
        """`_fetch`, dialed again after a failed dial while the caller's timeout lasts. Two peers
        that dial each other at the same moment (both fetching the other's blobs as a round's
        transfers begin) can both fail their handshakes, libp2p's simultaneous open, and then
        libp2p refuses to dial that peer for a few seconds; two peers that retried as soon as
        that allowed would collide again. So each waits a random pause past the backoff: the
        first to dial again connects, and the other's request rides on that connection."""
        while True:
            try:
                return await self._fetch(peer, name, max_bytes)
            except ControlFailure as exc:
                pause = self._redial_pause(peer, str(exc))
                if pause is None:
                    raise
                log.info("could not dial %s (%s); dialing again in %.1fs", peer[-8:], str(exc).splitlines()[-1].strip(), pause)
                await asyncio.sleep(pause)

    def _redial_pause(self, peer: str, error: str) -> float | None:
        """How long to wait before dialing `peer` again after `error`, or None to give up now. Only
        a dial that reached the peer but broke in the security handshake is tried again (and the
        dials libp2p then refuses during its backoff): a peer that refuses connections or does
        not answer is gone, and a round must not wait on it. Runs on the transport's loop."""
        now = time.monotonic()
        if "failed to negotiate security protocol" in error:
            self._broken_handshakes[peer] = now
        elif not ("dial backoff" in error and now - self._broken_handshakes.get(peer, -math.inf) < 3 * DIAL_BACKOFF):
            return None
        return random.uniform(1.0, 2.0) * DIAL_BACKOFF

    def push(self, peer: str, data: bytes, timeout: float) -> None:
        """Upload `data` into `peer`'s inbox; raises TransferError if it fails or is refused."""
        digest = self._wait(self._push(peer, data), timeout, f"pushing {len(data)} bytes to {peer[-8:]}")
        if digest != hashlib.sha256(data).hexdigest():
            raise TransferError(f"{peer[-8:]} refused {len(data)} pushed bytes (not a sender it admits, "
                                "or its inbox is full)")

    async def _push(self, peer: str, data: bytes) -> str:
        stub = _BlobServicer.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.namespace)

        async def chunks() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            view = memoryview(data)
            for start in range(0, max(len(data), 1), CHUNK_BYTES):
                yield runtime_pb2.ExpertRequest(metadata=view[start:start + CHUNK_BYTES].tobytes())

        reply = await stub.rpc_push(chunks())
        self.count(sent=len(data))
        return reply.metadata.decode(errors="replace")

    def _wait(self, coro, timeout: float, what: str):
        """Run `coro` on our loop, bounded by `timeout` and cut short by a stop request."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        deadline = time.monotonic() + timeout + 5
        while not future.done():
            concurrent.futures.wait([future], timeout=0.2)
            if self.stop is not None and self.stop.is_set() and not future.done():
                future.cancel()
                raise Stopped()
            if time.monotonic() > deadline and not future.done():
                future.cancel()
                raise TransferError(f"timed out after {timeout:.0f}s {what}")
        try:
            return future.result()
        except TransferError:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            raise TransferError(f"timed out after {timeout:.0f}s {what}") from None
        except Exception as exc:
            raise TransferError(f"{what} failed: {type(exc).__name__}: {exc}") from None

    async def _fetch(self, peer: str, name: str, max_bytes: int) -> bytes:
        stub = _BlobServicer.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.namespace)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stream = (await stub.rpc_fetch(runtime_pb2.ExpertRequest(uid=name))).__aiter__()
        header = None
        parts: list[bytes] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(stream.__anext__(),
                                                 max(self.allowance(received) - (loop.time() - started), 0.0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise TransferError(f"{peer[-8:]} sent {received} bytes of {name} in {loop.time() - started:.0f}s, "
                                    f"slower than {self.min_rate} bytes/s") from None
            if header is None:
                if len(message.metadata) != _HEADER.size:
                    raise TransferError(f"{peer[-8:]} sent a malformed header for {name}")
                found, total = _HEADER.unpack(message.metadata)
                if not found:
                    raise TransferError(f"{peer[-8:]} does not have {name}")
                if total > max_bytes:
                    raise TransferError(f"{peer[-8:]} offers {total} bytes for {name}, more than the limit {max_bytes}")
                header = total
                continue
            received += len(message.metadata)
            if received > header:
                raise TransferError(f"{peer[-8:]} sent more than the {header} bytes it announced for {name}")
            parts.append(message.metadata)
        self.count(received=received)
        if header is None or received != header:
            raise TransferError(f"{peer[-8:]} sent {received} of {header} bytes for {name}")
        return b"".join(parts)

    def shutdown(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._run(self._servicer.remove_p2p_handlers(self._p2p, namespace=self.namespace), timeout=5)
        except Exception:
            pass
        try:
            self._run(self._p2p.shutdown(), timeout=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
