"""Signed records: only the holder of the key named in a record's owner marker can write it, every
change to a signed record breaks it, anything malformed is refused, and the key survives a save."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from swarm.errors import ConfigError
from swarm.identity import Identity, SignatureValidator, split_subkey, verify


def _record(identity: Identity, value=None, tag: str = "ready") -> DHTRecord:
    plain = DHTRecord(key=b"run_round3_ready", subkey=identity.subkey(tag),
                      value=MSGPackSerializer.dumps(value or {"round": 3}), expiration_time=1000.0)
    return dataclasses.replace(plain, value=identity.validator.sign_value(plain))


def test_a_signed_record_validates_anywhere_and_any_change_breaks_it():
    writer, other = Identity(), Identity()
    signed = _record(writer)
    checker = SignatureValidator(Identity().key)  # any node: its own key plays no part in checking
    assert checker.validate(signed)
    assert checker.strip_value(signed) == MSGPackSerializer.dumps({"round": 3})
    tail = len(signed.value) - len(checker.strip_value(signed))
    assert tail == 69  # the marker and the 64 raw bytes of the signature
    changed = [
        dataclasses.replace(signed, expiration_time=1001.0),
        dataclasses.replace(signed, key=b"run_round4_ready"),
        dataclasses.replace(signed, subkey=writer.subkey("hash")),
        dataclasses.replace(signed, value=MSGPackSerializer.dumps({"round": 4}) + signed.value[-tail:]),
        dataclasses.replace(signed, subkey=other.subkey("ready")),               # claimed for another key
        dataclasses.replace(signed, value=signed.value[:-tail]),                 # the signature cut off
        dataclasses.replace(signed, value=signed.value[:-1]),                    # a byte of it cut off
        dataclasses.replace(signed, value=signed.value + signed.value[-tail:]),  # two signatures
        dataclasses.replace(signed, value=signed.value[:-tail] + signed.value),  # two, the other way
        dataclasses.replace(signed, subkey=writer.subkey("ready") + other.owner),  # two owners
    ]
    for record in changed:
        assert not checker.validate(record), record
    forged = dataclasses.replace(_record(other), subkey=writer.subkey("ready"))  # other's signature, writer's marker
    assert not checker.validate(forged)


@pytest.mark.parametrize("owner, signature", [
    (b"[owner:not base64!]", None),
    (b"[owner:" + b"A" * 40 + b"]", None),       # base64, but not 32 bytes
    (None, b"[sig]" + b"A" * 63),                 # a byte short
    (None, b"[sig]" + b"A" * 65),                 # a byte too many
    (None, b"[sig]" + b"\x00" * 64),              # 64 bytes, not a signature
    (None, b"[signature:" + b"A" * 88 + b"]"),   # hivemind's base64 form
])
def test_malformed_keys_and_signatures_are_refused_not_raised(owner, signature):
    writer = Identity()
    signed = _record(writer)
    if owner is not None:
        signed = dataclasses.replace(signed, subkey=b"ready" + owner)
    if signature is not None:
        signed = dataclasses.replace(signed, value=writer.validator.strip_value(signed) + signature)
    assert not SignatureValidator(writer.key).validate(signed)


def test_records_without_an_owner_are_not_its_business_and_are_not_signed():
    identity = Identity()
    plain = DHTRecord(key=b"k", subkey=b"s", value=b"v", expiration_time=1.0)
    assert identity.validator.validate(plain)
    assert identity.validator.sign_value(plain) == b"v"
    assert identity.validator.sign_value(dataclasses.replace(plain, subkey=None)) == b"v"
    someone_elses = dataclasses.replace(plain, subkey=Identity().subkey("x"))
    assert identity.validator.sign_value(someone_elses) == b"v"  # it signs only what its key owns


def test_a_signature_and_an_owner_cost_a_fifth_of_hivemind_rsa():
    """Every read of a round's records carries each writer's owner marker and signature."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    identity = Identity()
    rsa = RSASignatureValidator(RSAPrivateKey())
    plain = DHTRecord(key=b"k", subkey=b"ready", value=b"v", expiration_time=1.0)
    ours = len(identity.owner) + len(identity.validator.sign_value(dataclasses.replace(plain, subkey=identity.owner)))
    theirs = len(rsa.local_public_key) + len(rsa.sign_value(dataclasses.replace(plain, subkey=rsa.local_public_key)))
    assert ours * 4 < theirs, (ours, theirs)


def test_detached_signatures_verify_only_for_their_key_and_data():
    identity = Identity()
    signature = identity.sign(b"invite")
    assert verify(identity.owner, b"invite", signature)
    assert not verify(identity.owner, b"invites", signature)
    assert not verify(Identity().owner, b"invite", signature)
    assert not verify(b"[owner:garbage]", b"invite", signature)
    assert not verify(identity.owner + b"x", b"invite", signature)
    assert not verify(identity.owner, b"invite", signature[:-4])


def test_the_key_survives_a_save_and_the_dht_process(tmp_path):
    identity = Identity.load_or_create(tmp_path / "node.key")
    again = Identity.load_or_create(tmp_path / "node.key")
    assert again.fingerprint == identity.fingerprint and (tmp_path / "node.key").stat().st_mode & 0o077 == 0
    assert Identity.from_bytes(identity.to_bytes()).owner == identity.owner
    assert split_subkey(identity.subkey("hash")) == ("hash", identity.fingerprint)
    travelled = pickle.loads(pickle.dumps(identity.validator))  # validators reach the DHT's process pickled
    signed = dataclasses.replace(_record(identity), value=b"")
    plain = dataclasses.replace(signed, value=MSGPackSerializer.dumps({"round": 3}))
    assert travelled.sign_value(plain) == identity.validator.sign_value(plain)


def test_a_key_file_of_another_kind_is_a_one_line_error(tmp_path):
    from hivemind.utils.crypto import RSAPrivateKey

    (tmp_path / "rsa.key").write_bytes(RSAPrivateKey().to_bytes())
    (tmp_path / "junk.key").write_bytes(b"not a key")
    for name in ("rsa.key", "junk.key"):
        with pytest.raises(ConfigError) as err:
            Identity.load_or_create(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"cannot read the signing key {tmp_path / name}: ") and "\n" not in message
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        Identity.load_or_create(tmp_path / "rsa.key")


def test_a_key_is_never_written_through_a_link_and_processes_creating_it_at_once_share_it(tmp_path):
    """A link planted where the temporary file used to go (`node.key.tmp`) is left alone, and of
    several processes creating the same key at once every one ends with the same key."""
    import multiprocessing

    target = tmp_path / "victim"
    target.write_text("keep me")
    (tmp_path / "node.key.tmp").symlink_to(target)
    identity = Identity.load_or_create(tmp_path / "node.key")
    assert target.read_text() == "keep me" and not (tmp_path / "node.key").is_symlink()
    assert Identity.load_or_create(tmp_path / "node.key").fingerprint == identity.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.key.tmp", "victim"]  # no leftovers

    with multiprocessing.get_context("fork").Pool(4) as pool:
        prints = pool.map(_fingerprint_of, [str(tmp_path / "shared.key")] * 8)
    assert len(set(prints)) == 1 and prints[0] == Identity.load_or_create(tmp_path / "shared.key").fingerprint


def _fingerprint_of(path: str) -> str:
    return Identity.load_or_create(Path(path)).fingerprint
