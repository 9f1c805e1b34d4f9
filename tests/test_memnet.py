"""The in-memory DHT keeps hivemind's storage rules: the same writes give the same answers and the
same values as a real hivemind DHT node, and signed subkeys are as unforgeable."""

from __future__ import annotations

import pytest
from hivemind.utils import get_dht_time

from swarm.clock import FakeClock
from swarm.memnet import MemoryBlobServer, MemoryDHT, MemoryNetwork
from swarm.transport import TransferError

pytestmark = pytest.mark.timeout(60)

# (key, subkey, value, expiration offset): an ordinary value, later/equal/earlier rewrites, a
# dictionary growing, a regular value shadowing a dictionary and one failing to, expired writes.
WRITES = [
    ("plain", None, "v1", 100), ("plain", None, "v2", 50), ("plain", None, "v3", 100), ("plain", None, "v4", 150),
    ("dict", "a", 1, 100), ("dict", "b", 2, 200), ("dict", "a", 3, 50), ("dict", "a", 4, 120), ("dict", "b", 5, 200),
    ("shadowed", "a", 1, 100), ("shadowed", None, "regular", 300), ("shadowed", "b", 2, 200), ("shadowed", "c", 3, 400),
    ("kept", "a", 1, 300), ("kept", None, "regular", 200),
    ("blocked", None, "regular", 300), ("blocked", "a", 1, 200),
    ("expired", None, "late", -10), ("expired", "a", 1, -10),
]


def _apply(dht, now: float) -> tuple[list[bool], dict]:
    results = [bool(dht.store(k, v, expiration_time=now + dt, subkey=s)) for k, s, v, dt in WRITES]
    seen = {}
    for key in dict.fromkeys(k for k, *_ in WRITES):
        found = dht.get(key, latest=True)
        if found is None:
            seen[key] = None
        elif isinstance(found.value, dict):
            seen[key] = {s: (item.value, round(item.expiration_time - now)) for s, item in found.value.items()}
        else:
            seen[key] = (found.value, round(found.expiration_time - now))
    return results, seen


def test_the_same_writes_give_the_same_answers_as_a_real_hivemind_node():
    import hivemind

    real = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        expected = _apply(real, get_dht_time())
    finally:
        real.shutdown()
    clock = FakeClock()
    got = _apply(MemoryDHT(MemoryNetwork(clock), "a"), clock.now())
    assert got == expected


def test_records_expire_with_the_clock_and_signed_subkeys_cannot_be_forged():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    clock = FakeClock()
    net = MemoryNetwork(clock)
    owner_signer, forger_signer = RSASignatureValidator(RSAPrivateKey()), RSASignatureValidator(RSAPrivateKey())
    owner, forger = MemoryDHT(net, "owner", [owner_signer]), MemoryDHT(net, "forger", [forger_signer])
    assert owner.store("k", {"x": 1}, clock.now() + 10, subkey=owner_signer.local_public_key)
    assert not forger.store("k", {"x": 2}, clock.now() + 20, subkey=owner_signer.local_public_key)
    assert forger.store("k", {"x": 3}, clock.now() + 5, subkey=forger_signer.local_public_key)
    found = owner.get("k").value
    assert sorted(v.value["x"] for v in found.values()) == [1, 3]
    clock.advance(6)
    assert [v.value["x"] for v in owner.get("k").value.values()] == [1]
    clock.advance(5)
    assert owner.get("k") is None


def test_blobs_come_only_from_live_peers_and_within_the_size_limit():
    net = MemoryNetwork(FakeClock())
    a, b = MemoryBlobServer(net, "a"), MemoryBlobServer(net, "b")
    a.publish("w", b"12345")
    a.publish("lazy", lambda: b"made on demand")
    assert b.fetch("a", "w", 1.0, 10) == b"12345" and b.fetch("a", "lazy", 1.0, 100) == b"made on demand"
    assert a.bytes_sent == 5 + 14 and b.bytes_received == 5 + 14
    with pytest.raises(TransferError, match="more than the limit"):
        b.fetch("a", "w", 1.0, 4)
    with pytest.raises(TransferError, match="does not have"):
        b.fetch("a", "missing", 1.0, 10)
    a.crash()
    with pytest.raises(TransferError, match="no route"):
        b.fetch("a", "w", 1.0, 10)
