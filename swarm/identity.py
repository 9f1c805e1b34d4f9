"""Who wrote a record. Every node signs with an Ed25519 key of its own; every record it writes sits
under an owner subkey (`<tag>[owner:<public key>]`), which `SignatureValidator` (hivemind's rule for
protected records) lets only that key's holder write. A record's writer is therefore known, and it
is named in the protocol by the fingerprint of its key. A run's coordinator key is pinned by the run
id, which ends in that key's fingerprint.

Ed25519 rather than hivemind's RSA keys because every read of a round's records carries every
writer's key and signature: 52 and 69 bytes here against 388 and 356 for a 2048-bit RSA key, which
made up three quarters of a typical record and of the DHT traffic a round costs each peer.

The writer's P2P address is a field of its records, not its identity: blobs are named after the
fingerprint, so pointing at another peer's address fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm.errors import ConfigError

FINGERPRINT_CHARS = 20  # hex digits: 80 bits, far beyond grinding a key that matches a run id
_OWNER = re.compile(rb"\[owner:(.+?)\]")
# A signed value ends in this marker and the 64 raw bytes of the signature: 69 bytes, where
# hivemind's `[signature:<base64>]` form would take 100 (every record a round reads carries one).
_SIGNED = b"[sig]"
_FINGERPRINT = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")
_PUBLIC_BYTES, _SIGNATURE_BYTES = 32, 64


def fingerprint(public_key: bytes) -> str:
    """The short name of a public key (the bytes inside `[owner:...]`, or the whole marker)."""
    found = _OWNER.search(public_key)
    raw = found.group(1) if found else public_key
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_CHARS]


def is_fingerprint(text: str) -> bool:
    return bool(_FINGERPRINT.match(text))


def _unb64(text: bytes, size: int) -> bytes | None:
    """`size` bytes from strict base64, None for anything else."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _public_key(marker_key: bytes) -> Ed25519PublicKey | None:
    raw = _unb64(marker_key, _PUBLIC_BYTES)
    if raw is None:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


def _verify(public_key: Ed25519PublicKey, data: bytes, raw: bytes | None) -> bool:
    if raw is None or len(raw) != _SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(raw, data)
    except InvalidSignature:
        return False
    return True


class SignatureValidator(RecordValidatorBase):
    """hivemind's protected records with Ed25519 keys: a record whose key or subkey holds
    `[owner:<public key>]` is valid only with exactly one signature at the end of its value (the
    `[sig]` marker, then the signature's 64 raw bytes), by that key, over the record without it
    (as hivemind's `RSASignatureValidator` has it, there with base64 text). It signs the records
    its own key owns. Runs first (priority 10): the validators after it see the value without the
    signature."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._local_public_key = b"[owner:" + base64.b64encode(raw) + b"]"

    @property
    def local_public_key(self) -> bytes:
        return self._local_public_key

    def validate(self, record: DHTRecord) -> bool:
        owners = set(_OWNER.findall(record.key))
        if record.subkey is not None:
            owners |= set(_OWNER.findall(record.subkey))
        if not owners:
            return True  # not a protected record
        if len(owners) > 1:
            return False
        public_key = _public_key(owners.pop())
        value, signature = _split_signed(record.value)
        if public_key is None or signature is None or _SIGNED in value:  # exactly one signature
            return False
        return _verify(public_key, _serialized(dataclasses.replace(record, value=value)), signature)

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._local_public_key not in record.key and self._local_public_key not in (record.subkey or b""):
            return record.value
        return record.value + _SIGNED + self._private_key.sign(_serialized(record))

    def strip_value(self, record: DHTRecord) -> bytes:
        return _split_signed(record.value)[0]

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignatureValidator)  # one signer per node: the first one added

    def __getstate__(self) -> dict:
        """Validators travel to the DHT's process pickled; the key as its raw private bytes."""
        raw = self._private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
        return {"raw": raw}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Ed25519PrivateKey.from_private_bytes(state["raw"]))


def _split_signed(value: bytes) -> tuple[bytes, bytes | None]:
    """(value, signature) of a signed value; (value, None) for one that does not end in one."""
    cut = len(value) - _SIGNATURE_BYTES - len(_SIGNED)
    if cut < 0 or value[cut:cut + len(_SIGNED)] != _SIGNED:
        return value, None
    return value[:cut], value[cut + len(_SIGNED):]


def strip_signature(value: bytes) -> bytes:
    """A stored value without the signature it ends in (unchanged if it has none)."""
    return _split_signed(value)[0]


def _serialized(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps(dataclasses.astuple(record))


class Identity:
    """A node's signing key, the validator that signs with it, and its fingerprint."""

    def __init__(self, key: Ed25519PrivateKey | None = None):
        self.key = key or Ed25519PrivateKey.generate()
        self.validator = SignatureValidator(self.key)
        self.owner: bytes = self.validator.local_public_key
        self.fingerprint = fingerprint(self.owner)

    def sign(self, data: bytes) -> str:
        """A signature of `data` that `verify(self.owner, data, signature)` accepts."""
        return base64.b64encode(self.key.sign(data)).decode()

    def secret_draw(self, text: str) -> str:
        """A value only this key's holder can compute, the same every time for `text`: the sha256
        of its signature over it (Ed25519 signs deterministically). The coordinator's beacons and
        its draw of the rounds it redoes: nobody can know them before it says."""
        return hashlib.sha256(self.sign(text.encode()).encode()).hexdigest()

    def subkey(self, tag: str = "") -> bytes:
        """An owner subkey: only this identity can write it."""
        return tag.encode() + self.owner

    def to_bytes(self) -> bytes:
        """The private key as DER (PKCS #8), as `from_bytes` reads it."""
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @classmethod
    def from_bytes(cls, der: bytes) -> "Identity":
        """The identity of a private key saved with `to_bytes()`; ValueError if it is not one."""
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"a {type(key).__name__.removeprefix('_')}, not an Ed25519 private key "
                             "(lte-swarm signs with Ed25519; start a new run dir or key file)")
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
        # only if no key is there yet: of two processes creating the key at once, both end with the first's
        if not write_private(path, identity.to_bytes(), replace=False):
            return cls.load_or_create(path)
        return identity


def write_private(path: Path, data: bytes, replace: bool = True) -> bool:
    """Write `data` to `path` at once, readable by its owner only: through a new file of a random
    name beside it (created exclusively: never a file or a link someone put there), then renamed
    into place, or with `replace=False` linked there only if nothing is there yet (False if
    something was)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def verify(owner: bytes, data: bytes, signature: str) -> bool:
    """Whether `signature` is the signature of `data` by the key in the owner marker `owner`;
    False for anything malformed."""
    found = _OWNER.fullmatch(owner)
    public_key = None if found is None else _public_key(found.group(1))
    if public_key is None or not isinstance(signature, str):
        return False
    return _verify(public_key, data, _unb64(signature.encode(), _SIGNATURE_BYTES))


def owner_of(subkey: Any) -> bytes | None:
    """The `[owner:<public key>]` marker an owner subkey ends in; None for anything else."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER.search(subkey)
    return found.group(0) if found is not None and found.end() == len(subkey) else None


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


# No record of a run comes near this (a vote or a part record of a round of 1,000 members takes
# 20-40 KB): a larger value is refused by storage, so a stranger cannot make one key's answer a
# few megabytes with a handful of records. Time-independent, as every rule below.
MAX_RECORD_BYTES = 256 * 1024


class SignedOnlyValidator(RecordValidatorBase):
    """The storage policy of every node of a run: only signed records under owner subkeys, with
    finite expirations, whose value is plain msgpack data of at most MAX_RECORD_BYTES. An ordinary value could block a key,
    a record that never expires could freeze what a node sees, and a value a reader cannot decode
    would stop hivemind's search for that key (its future is never resolved). Deliberately
    independent of the reading node's clock: hivemind drops a node's whole dictionary if one
    subkey fails, so a time-dependent rule would let a stranger split the peers' views (how far
    ahead a record may expire is checked per record when it is read, `dht_io.read`)."""

    def validate(self, record: DHTRecord) -> bool:
        if not isinstance(record.subkey, bytes) or not _OWNER.search(record.subkey):
            return False
        if not math.isfinite(record.expiration_time) or len(record.value) > MAX_RECORD_BYTES:
            return False
        try:
            return _plain(MSGPackSerializer.loads(record.value))
        except Exception:
            return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedOnlyValidator)
