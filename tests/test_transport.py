"""The blob transport over real hivemind nodes on loopback. A download whose dial broke in the
security handshake (as when two peers dial each other at the same moment, both fetching the
other's blobs) dials again after a pause past libp2p's dial backoff and completes once the peer
answers properly, within the caller's timeout; a download from a peer that is gone fails at once.
Pushes come from admitted senders only, and a stream that stalls or trickles, pushed or downloaded,
is dropped once it falls behind the minimum rate."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from swarm.transport import DIAL_BACKOFF, BlobServer, TransferError

pytestmark = pytest.mark.timeout(120)


def _server(tmp_path, fetcher, port: int = 0):
    """A node with a stable peer id (its key in tmp_path), serving one blob."""
    import hivemind

    node = hivemind.DHT(start=True, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
                        initial_peers=fetcher.get_visible_maddrs(), identity_path=str(tmp_path / "server.key"))
    blobs = BlobServer(node, namespace="t")
    blobs.publish("w", BLOB)
    return node, blobs


BLOB = bytes(range(256)) * 4000


class _BrokenHandshakes:
    """A listener at `port` that takes each connection and closes it mid-handshake."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.recv(64)
            conn.close()

    def close(self) -> None:
        try:  # wakes the thread blocked in accept, which would otherwise keep the port taken
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_a_dial_broken_in_its_handshake_is_dialed_again_and_a_gone_peer_fails_at_once(tmp_path):
    import hivemind

    fetcher = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = BlobServer(fetcher, namespace="t")
    node, blobs = _server(tmp_path, fetcher)
    port = int(str(node.get_visible_maddrs()[0]).split("/tcp/")[1].split("/")[0])
    peer = str(node.peer_id)
    try:
        assert client.fetch(peer, "w", timeout=10, max_bytes=len(BLOB)) == BLOB  # connected once
        blobs.shutdown()
        node.shutdown()
        broken = _BrokenHandshakes(port)
        got: dict = {}

        def fetch() -> None:
            started = time.monotonic()
            try:
                got["blob"] = client.fetch(peer, "w", timeout=3 * DIAL_BACKOFF, max_bytes=len(BLOB))
            except TransferError as exc:
                got["error"] = exc
            got["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=fetch)
        thread.start()
        deadline = time.monotonic() + DIAL_BACKOFF
        while broken.accepted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broken.accepted >= 1  # the first dial reached the address and broke in its handshake
        broken.close()
        node, blobs = _server(tmp_path, fetcher, port=port)  # the peer answers at the same address
        assert str(node.peer_id) == peer
        thread.join(timeout=5 * DIAL_BACKOFF)
        assert got.get("blob") == BLOB, got
        assert got["seconds"] >= DIAL_BACKOFF, got  # it waited out libp2p's backoff before dialing again

        blobs.shutdown()
        node.shutdown()
        started = time.monotonic()
        with pytest.raises(TransferError):  # nobody listens there now: no pause, no second dial
            client.fetch(peer, "w", timeout=3 * DIAL_BACKOFF, max_bytes=len(BLOB))
        assert time.monotonic() - started < DIAL_BACKOFF / 2
    finally:
        for closing in (client.shutdown, blobs.shutdown, node.shutdown, fetcher.shutdown):
            try:
                closing()
            except Exception:
                pass


def test_pushes_are_taken_from_admitted_senders_only_and_a_stalled_push_is_dropped():
    """Over real nodes: the receiver's rule sees the pusher's authenticated peer id and refuses a
    sender it does not admit before keeping a byte; an admitted sender's push lands; a push stream
    that sends a chunk and stalls is dropped after the grace, freeing the sender's stream slot."""
    import asyncio

    import hivemind
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from swarm.transport import _BlobServicer

    receiver_node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sender_node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                               initial_peers=receiver_node.get_visible_maddrs())
    receiver, sender = BlobServer(receiver_node, namespace="t"), BlobServer(sender_node, namespace="t")
    try:
        receiver.inbox.limit_bytes = 1 << 24
        receiver.grace, receiver.min_rate = 1.0, 1 << 20
        seen: list[str] = []
        me = str(sender_node.peer_id)
        receiver.inbox.admits = lambda who: seen.append(who) or False
        with pytest.raises(TransferError):  # refused, or its stream closed under it
            sender.push(str(receiver_node.peer_id), BLOB, timeout=30)
        assert seen == [me] and receiver.bytes_received == 0  # the rule saw who it was, nothing was kept
        receiver.inbox.admits = lambda who: who == me
        sender.push(str(receiver_node.peer_id), BLOB, timeout=30)
        assert receiver.lookup("sha256:" + __import__("hashlib").sha256(BLOB).hexdigest()) == BLOB

        async def stalled() -> bytes:
            stub = _BlobServicer.get_stub(sender._p2p, PeerID.from_base58(str(receiver_node.peer_id)), namespace="t")

            async def chunks():
                yield runtime_pb2.ExpertRequest(metadata=b"x" * 1000)
                await asyncio.sleep(30)  # and nothing more
            return (await stub.rpc_push(chunks())).metadata

        pending = asyncio.run_coroutine_threadsafe(stalled(), sender._loop)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not receiver.inbox._streams:  # until the receiver reads it
            time.sleep(0.05)
        assert receiver.inbox._streams == {me: 1}
        while time.monotonic() < deadline and receiver.inbox._streams:
            time.sleep(0.05)
        assert receiver.inbox._streams == {}  # dropped after the grace, well before the 30 s stall ends
        assert receiver.bytes_received == len(BLOB)  # nothing of it was kept
        pending.cancel()
    finally:
        receiver.shutdown()
        sender.shutdown()
        sender_node.shutdown()
        receiver_node.shutdown()


def test_a_download_that_trickles_is_dropped_once_it_falls_behind_the_minimum_rate():
    """A peer that sends the header and then a few bytes now and then holds a reader for the
    grace and the bytes it sent at the minimum rate, not for the caller's whole timeout."""
    import asyncio

    import hivemind
    from hivemind.proto import runtime_pb2

    from swarm.transport import _HEADER, _BlobServicer

    async def trickle(self, request, context):
        yield runtime_pb2.ExpertResponse(metadata=_HEADER.pack(1, 1 << 20))
        for _ in range(100):
            yield runtime_pb2.ExpertResponse(metadata=b"x" * 100)
            await asyncio.sleep(0.5)

    # named as the real servicer: its handlers are registered under the class's name
    Trickler = type("_BlobServicer", (_BlobServicer,), {"rpc_fetch": trickle})

    server_node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    reader_node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                               initial_peers=server_node.get_visible_maddrs())
    server, reader = BlobServer(server_node, namespace="t"), BlobServer(reader_node, namespace="t")
    try:
        server._run(server._servicer.remove_p2p_handlers(server._p2p, namespace="t"), timeout=10)
        server._run(Trickler(server).add_p2p_handlers(server._p2p, namespace="t"), timeout=10)
        reader.grace, reader.min_rate = 2.0, 1000.0
        started = time.monotonic()
        with pytest.raises(TransferError, match="slower than 1000"):
            reader.fetch(str(server_node.peer_id), "w", timeout=60, max_bytes=1 << 21)
        assert time.monotonic() - started < 10  # 2 s of grace and a few hundred bytes' worth, not 60 s
    finally:
        reader.shutdown()
        server.shutdown()
        reader_node.shutdown()
        server_node.shutdown()
