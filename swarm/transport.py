"""Peer-to-peer blobs over hivemind's P2P: each peer serves named byte strings (its contribution to a
merge round, its current W) and downloads those of others, with bounded waits and byte counters.

hivemind's averager returns each peer `average - own part`, so peers end a round equal only up to
rounding. lte-swarm needs bit-identical W on every peer, so it moves the exact bytes of every
contribution instead (an all-gather) and lets every peer do the same arithmetic on them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import struct
import threading
import time
from typing import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarm.errors import Stopped

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_HEADER = struct.Struct("<BQ")  # found flag, total length


class TransferError(Exception):
    """A download failed: the peer is gone, timed out, does not have the blob or sent too much."""


# What the peer loop treats as "the network let us down": warn, retry or skip, never crash.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    TransferError, TimeoutError, asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, ConnectionError, OSError,
)

Provider = Callable[[], bytes]


class _BlobServicer(ServicerBase):
    def __init__(self, owner: "BlobServer"):
        self.owner = owner

    async def rpc_fetch(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        data = await asyncio.get_running_loop().run_in_executor(None, self.owner.lookup, request.uid)
        if data is None:
            yield runtime_pb2.ExpertResponse(metadata=_HEADER.pack(0, 0))
            return
        yield runtime_pb2.ExpertResponse(metadata=_HEADER.pack(1, len(data)))
        view = memoryview(data)
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = view[start:start + CHUNK_BYTES].tobytes()
            self.owner.count(sent=len(chunk))
            yield runtime_pb2.ExpertResponse(metadata=chunk)


class BlobServer:
    """Serves named blobs from this peer and fetches them from others, on its own event loop thread.

    The P2P instance is a replica of the DHT's (same p2pd daemon), so no extra port is opened."""

    def __init__(self, dht, namespace: str, stop: threading.Event | None = None):
        self.namespace = namespace
        self.stop = stop  # a set stop event cuts a download short (raising Stopped)
        self._blobs: dict[str, bytes | Provider] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
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

    # ---- serving ---------------------------------------------------------------------------
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
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._fetch(peer, name, max_bytes), timeout), self._loop)
        deadline = time.monotonic() + timeout + 5
        while not future.done():
            concurrent.futures.wait([future], timeout=0.2)
            if self.stop is not None and self.stop.is_set() and not future.done():
                future.cancel()
                raise Stopped()
            if time.monotonic() > deadline and not future.done():
                future.cancel()
                raise TransferError(f"timed out after {timeout:.0f}s fetching {name} from {peer[-8:]}")
        try:
            return future.result()
        except TransferError:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            raise TransferError(f"timed out after {timeout:.0f}s fetching {name} from {peer[-8:]}") from None
        except Exception as exc:
            raise TransferError(f"fetching {name} from {peer[-8:]} failed: {type(exc).__name__}: {exc}") from None

    async def _fetch(self, peer: str, name: str, max_bytes: int) -> bytes:
        stub = _BlobServicer.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.namespace)
        stream = await stub.rpc_fetch(runtime_pb2.ExpertRequest(uid=name))
        header = None
        parts: list[bytes] = []
        received = 0
        async for message in stream:
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
