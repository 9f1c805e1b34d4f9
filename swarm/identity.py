"""Who wrote a record. Every node signs with an RSA key of its own; every record it writes sits under
an owner subkey (`<tag>[owner:<public key>]`), which hivemind's `RSASignatureValidator` lets only
that key's holder write. A record's writer is therefore known, and it is named in the protocol by
the fingerprint of its key. A run's coordinator key is pinned by the run id, which ends in that
key's fingerprint.

The writer's P2P address is a field of its records, not its identity: blobs are named after the
fingerprint, so pointing at another peer's address fetches nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import ConfigError

FINGERPRINT_CHARS = 20  # hex digits: 80 bits, far beyond grinding a key that matches a run id
_OWNER = re.compile(rb"\[owner:(.+?)\]")
_FINGERPRINT = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")


def fingerprint(public_key: bytes) -> str:
    """The short name of a public key (the bytes inside `[owner:...]`, or the whole marker)."""
    found = _OWNER.search(public_key)
    raw = found.group(1) if found else public_key
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_CHARS]


def is_fingerprint(text: str) -> bool:
    return bool(_FINGERPRINT.match(text))


class Identity:
    """A node's signing key, the validator that signs with it, and its fingerprint."""

    def __init__(self, key: RSAPrivateKey | None = None):
        self.key = key or RSAPrivateKey()
        self.validator = RSASignatureValidator(self.key)
        self.owner: bytes = self.validator.local_public_key
        self.fingerprint = fingerprint(self.owner)

    def sign(self, data: bytes) -> str:
        """A signature of `data` that `verify(self.owner, data, signature)` accepts."""
        return self.key.sign(data).decode()

    def subkey(self, tag: str = "") -> bytes:
        """An owner subkey: only this identity can write it."""
        return tag.encode() + self.owner

    @classmethod
    def from_bytes(cls, der: bytes) -> "Identity":
        """The identity of a private key saved with `key.to_bytes()` (DER); ValueError if it is not one."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key._private_key, rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """The identity saved at `path`, or a new one saved there (readable by its owner only), so
        that a restarted coordinator keeps its run id and authority."""
        path = Path(path)
        if path.exists():
            try:
                return cls.from_bytes(path.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
        identity = cls()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.key.to_bytes())
        tmp.replace(path)
        return identity


def verify(owner: bytes, data: bytes, signature: str) -> bool:
    """Whether `signature` is the signature of `data` by the key in the owner marker `owner`;
    False for anything malformed."""
    from hivemind.utils.crypto import RSAPublicKey

    found = _OWNER.fullmatch(owner)
    if found is None:
        return False
    try:
        return RSAPublicKey.from_bytes(found.group(1)).verify(data, signature.encode())
    except Exception:  # an unreadable key from a stranger is a failed check, nothing more
        return False


def split_subkey(subkey: Any) -> tuple[str, str] | None:
    """(tag, writer fingerprint) of an owner subkey; None for anything else (unsigned, foreign)."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER.search(subkey)
    if found is None or found.end() != len(subkey):
        return None
    try:
        tag = subkey[:found.start()].decode()
    except UnicodeDecodeError:
        return None
    return tag, fingerprint(found.group(0))


def _plain(value: Any, depth: int = 0) -> bool:
    """msgpack's plain types only, nested at most 32 deep: nothing a reader could choke on."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int, bytes)) and _plain(v, depth + 1) for k, v in value.items())
    return False


class SignedOnlyValidator(RecordValidatorBase):
    """The storage policy of every node of a run: only signed records under owner subkeys, with
    finite expirations, whose value is plain msgpack data. An ordinary value could block a key,
    a record that never expires could freeze what a node sees, and a value a reader cannot decode
    would stop hivemind's search for that key (its future is never resolved). Deliberately
    independent of the reading node's clock: hivemind drops a node's whole dictionary if one
    subkey fails, so a time-dependent rule would let a stranger split the peers' views (how far
    ahead a record may expire is checked per record when it is read, `schemas.read`)."""

    def validate(self, record: DHTRecord) -> bool:
        from hivemind.utils.serializer import MSGPackSerializer

        if not isinstance(record.subkey, bytes) or not _OWNER.search(record.subkey):
            return False
        if not math.isfinite(record.expiration_time):
            return False
        try:
            return _plain(MSGPackSerializer.loads(record.value))
        except Exception:
            return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedOnlyValidator)
