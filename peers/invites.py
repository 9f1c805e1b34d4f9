"""Invite files: how a closed run's coordinator admits a volunteer.

The coordinator signs an invite for a key fingerprint (`lte-swarm invite --member FP`); the
volunteer keeps its own private key and joins with `--invite FILE --signing-key KEY`. Without a
fingerprint, the coordinator makes a key for the volunteer and puts it in the file: simpler to
hand out, but then the file is a secret (whoever holds it is that member), so it is written
readable by its owner only. `lte-swarm revoke --member FP` takes a member out again before its
invite expires (the run dir's revoked.json, which the coordinator publishes).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from pydantic import ValidationError

from peers.checkpoint import checkpoint_run_id
from peers.coordinator import KEY_FILE, coordinator_identity, revoked_members, write_revoked
from swarm.errors import ConfigError
from swarm.identity import Identity, is_fingerprint, write_private
from swarm.keys import RunKeys
from swarm.membership import invite_problem, sign_invite
from swarm.schemas import InviteRecord


def make_invite(run_dir: Path, member: str | None, days: float, out: Path) -> tuple[InviteRecord, bool]:
    """Sign an invite to the run in `run_dir` and write it to `out`; (invite, whether the file
    holds a new private key)."""
    run_dir = Path(run_dir)
    run_id, authority = _coordinator_dir(run_dir)
    if member is not None and not is_fingerprint(member):
        raise ConfigError(f"--member {member!r} is not a key fingerprint (as `lte-swarm key FILE` prints it)")
    key = Identity() if member is None else None
    invite = sign_invite(authority, run_id, member or key.fingerprint, int(time.time() + days * 86400))
    body = {"invite": invite.model_dump()}
    if key is not None:
        body["signing_key"] = base64.b64encode(key.to_bytes()).decode()
    write_private(Path(out), json.dumps(body, indent=1).encode())
    return invite, key is not None


def revoke(run_dir: Path, member: str) -> list[str]:
    """Revoke `member` (a key fingerprint) in the run of `run_dir`: the running coordinator
    publishes the list within a lease, and every node stops admitting the key, invite or not.
    Returns every revoked fingerprint."""
    run_dir = Path(run_dir)
    _coordinator_dir(run_dir)
    if not is_fingerprint(member):
        raise ConfigError(f"--member {member!r} is not a key fingerprint (as `lte-swarm key FILE` prints it)")
    return write_revoked(run_dir, {*revoked_members(run_dir), member})


def _coordinator_dir(run_dir: Path) -> tuple[str, Identity]:
    """(run id, the run's authority) of a coordinator's run dir; a ConfigError for any other dir."""
    run_id = checkpoint_run_id(run_dir)
    if not (run_dir / KEY_FILE).exists():
        raise ConfigError(f"{run_dir / KEY_FILE} is missing: only the coordinator's run dir can admit or revoke")
    authority = coordinator_identity(run_dir)
    if RunKeys(run_id).coordinator != authority.fingerprint:
        raise ConfigError(f"{run_dir / KEY_FILE} is not the key of run {run_id}")
    return run_id, authority


def read_invite(path: Path) -> tuple[InviteRecord, Identity | None]:
    """(invite, the private key the file carries, if any); a `ConfigError` saying what is wrong."""
    try:
        body = json.loads(Path(path).read_text())
        invite = InviteRecord.model_validate(body["invite"])
        key = body.get("signing_key")
        identity = Identity.from_bytes(base64.b64decode(key)) if key is not None else None
    except (OSError, KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ConfigError(f"{path} is not an invite file ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "ask the coordinator for a new one") from None
    if identity is not None and identity.fingerprint != invite.member:
        raise ConfigError(f"{path}: the key it carries is not the member it names; ask the coordinator for a new one")
    problem = invite_problem(invite, RunKeys(invite.run_id), time.time())
    if problem is not None:
        raise ConfigError(f"{path} cannot be used: {problem}; ask the coordinator for a new one")
    return invite, identity
