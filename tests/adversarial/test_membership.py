"""Closed runs: only keys the coordinator listed or invited hold heads. In an open run a stranger
with keys of its own can take free heads from the first round on (claims back-dated by the clock
skew the run allows win them); a closed run ignores such keys, forged invites and invites copied
from members."""

from __future__ import annotations

import time

import pytest

from peers.coordinator import coordinator_identity
from swarm import dht_io
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.keys import RunKeys, make_run_id
from swarm.membership import invite_problem, sign_invite
from swarm.schemas import InviteRecord, LeaseRecord
from tests.adversarial.test_rules import _assert_unharmed, _config
from tests.memswarm import MemorySwarm, named_identity, tiny_config

pytestmark = pytest.mark.timeout(120)



def test_an_invite_admits_only_its_member_to_its_run_until_it_expires():
    authority, member, stranger = Identity(), Identity(), Identity()
    keys = RunKeys(make_run_id("closed", authority.fingerprint))
    now = time.time()
    good = sign_invite(authority, keys.run_id, member.fingerprint, int(now + 60))
    assert invite_problem(good, keys, now) is None

    other_run = RunKeys(make_run_id("other", authority.fingerprint))
    assert "not to" in invite_problem(good, other_run, now)
    assert "expired" in invite_problem(good, keys, now + 120)
    # a stranger signing with its own key, naming itself the authority, or the coordinator's key
    forged = sign_invite(stranger, keys.run_id, stranger.fingerprint, int(now + 60))
    assert "not signed with the key" in invite_problem(forged, keys, now)
    claims_authority = forged.model_copy(update={"authority": good.authority})
    assert "signature" in invite_problem(claims_authority, keys, now)
    # a member's invite edited to name someone else, or to last longer
    for change in ({"member": stranger.fingerprint}, {"expires": good.expires + 3600}):
        assert "signature" in invite_problem(good.model_copy(update=change), keys, now)
    garbled = good.model_copy(update={"authority": good.authority[:40] + "]"})
    assert invite_problem(garbled, keys, now) is not None


def _run(tmp_path, name: str, closed: bool, attack: bool, for_seconds: float | None = None) -> MemorySwarm:
    """Coordinator, p0 and p1 invited, p2 listed in the config; with `attack`, a stranger claims
    every head from before the first round on, back-dated, and publishes p0's invite as its own."""
    members = (named_identity("p2").fingerprint,) if closed else ()
    cfg = _config(closed=closed, members=members)
    mem = MemorySwarm(cfg, tmp_path / name)
    coordinator = mem.coordinator()
    authority = coordinator_identity(coordinator.role.run_dir)
    expires = int(mem.clock.now() + 3600)
    invites = {n: sign_invite(authority, mem.run_id, named_identity(n).fingerprint, expires) for n in ("p0", "p1")}
    if attack:
        rogue, identity = mem.signing_dht("rogue")
        copier, copier_identity = mem.signing_dht("copier")
        keys = RunKeys(mem.run_id)
        original = mem._step

        def claim_everything():
            dht_io.store(copier, keys.members, copier_identity, invites["p0"], mem.clock.now() + 60)
            stolen = invites["p0"].model_copy(update={"member": identity.fingerprint})
            dht_io.store(rogue, keys.members, identity, stolen, mem.clock.now() + 60)
            for head in range(3):
                dht_io.store(rogue, keys.leases, identity,
                              LeaseRecord(head=head, claimed_at=mem.clock.now() - cfg.swarm.clock_skew),
                              mem.clock.now() + 5, tag=str(head))

        def step(node):
            if mem.clock.now() - step.last > 2:
                claim_everything()
                step.last = mem.clock.now()
            original(node)
            if node.state == "running" and hasattr(node.role, "leases"):
                mem.rogue_held |= identity.fingerprint in node.role.leases.holders().values()
        step.last = float("-inf")
        mem._step = step
        mem.rogue, mem.rogue_held = identity.fingerprint, False
    for name_ in ("p0", "p1", "p2"):
        mem.trainer(name_, invite=invites.get(name_) if closed else None)
    if for_seconds is None:
        mem.run(max_seconds=300)
    else:
        end = mem.clock.now() + for_seconds
        mem.run(until=lambda s: s.clock.now() >= end)
    return mem


def test_a_member_joining_just_after_the_invites_were_read_is_in_the_first_round(tmp_path):
    """The coordinator read the run's invites when the first member claimed a head; the second
    member publishes its invite and claims a moment later. Its claim, written after that read, has
    the coordinator read them again: every node merges the same members from round 0 on."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=2, closed=True)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    authority = coordinator_identity(coordinator.role.run_dir)
    expires = int(mem.clock.now() + 3600)
    invite = {n: sign_invite(authority, mem.run_id, named_identity(n).fingerprint, expires) for n in ("p0", "p1")}
    p0 = mem.trainer("p0", invite=invite["p0"])
    mem.run(until=lambda s: bool(p0.role.leases.held))
    p1 = mem.trainer("p1", invite=invite["p1"])
    mem.run()
    members = {named_identity(n).fingerprint for n in ("p0", "p1")}
    for node in (coordinator, p0, p1):
        rounds = node.events.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3]
        assert all(set(r["members"]) == members and not r.get("resynced") for r in rounds), (node.name, rounds)


def test_in_a_closed_run_a_strangers_claims_and_stolen_invites_take_no_head(tmp_path):
    attacked = _run(tmp_path, "closed", closed=True, attack=True)
    assert not attacked.rogue_held  # in nobody's view, at any step
    _assert_unharmed(attacked, _run(tmp_path, "baseline", closed=True, attack=False))


def test_in_an_open_run_the_same_stranger_does_take_heads(tmp_path):
    """The attack the closed run stops is real: in an open run the stranger's back-dated claims win
    every head before anyone trained one, and the run cannot start."""
    attacked = _run(tmp_path, "open", closed=False, attack=True, for_seconds=120)
    assert set(attacked.coordinator_role().leases.holders().values()) == {attacked.rogue} and attacked.rogue_held
    assert not attacked["coordinator"].events.of("round")


def test_a_peer_without_an_invite_is_told_what_to_do(tmp_path):
    mem = MemorySwarm(tiny_config(heads=2, closed=True), tmp_path)
    mem.coordinator()
    with pytest.raises(ConfigError, match="closed.*--invite"):
        mem.trainer("p0")
    foreign = sign_invite(Identity(), mem.run_id, named_identity("p1").fingerprint, int(mem.clock.now() + 60))
    with pytest.raises(ConfigError, match="not signed with the key"):
        mem.trainer("p1", invite=foreign)
    authority = coordinator_identity(mem.coordinator_role().run_dir)
    for_someone_else = sign_invite(authority, mem.run_id, named_identity("p0").fingerprint, int(mem.clock.now() + 60))
    with pytest.raises(ConfigError, match="pass the key it was made for"):
        mem.trainer("p2", invite=for_someone_else)


def test_the_status_view_of_a_closed_run_lists_members_only(tmp_path):
    from peers.monitor import snapshot
    from swarm.dht_io import publish_status
    from swarm.schemas import PeerPhase, PeerStatus

    mem = MemorySwarm(tiny_config(heads=2, rounds=2, closed=True), tmp_path)
    mem.coordinator()
    authority = coordinator_identity(mem.coordinator_role().run_dir)
    mem.trainer("p0", invite=sign_invite(authority, mem.run_id, named_identity("p0").fingerprint,
                                         int(mem.clock.now() + 600)))
    mem.run(until=lambda s: s["p0"].role.phase is PeerPhase.TRAINING)
    rogue, identity = mem.signing_dht("rogue")
    keys = RunKeys(mem.run_id)
    fake = PeerStatus(run_id=mem.run_id, peer=identity.fingerprint, state=PeerPhase.TRAINING, heads=[0, 1], round=0,
                      step=0, last_merged_round=-1, loss=None, samples_per_second=0.0, bytes_sent=0,
                      bytes_received=0, device="cpu", storage="fp32", digest="ab" * 32, time=mem.clock.now())
    publish_status(rogue, keys, identity, fake, expiration=mem.clock.now() + 10, roster_expiration=mem.clock.now() + 10)
    view = snapshot(mem["p0"].rt.dht, keys, mem.cfg, mem.clock)
    assert [p["peer"] for p in view["peers"]] == [mem["p0"].rt.peer]
    assert all(h["peer"] in (None, mem["p0"].rt.peer) for h in view["heads"])


def test_invite_records_that_do_not_fit_are_dropped():
    with pytest.raises(Exception):
        InviteRecord(run_id="x", member="not-a-fingerprint", expires=1, authority="a", signature="b")


def test_invite_files_from_the_command_line(tmp_path):
    """`lte-swarm key` and `lte-swarm invite`, and what `join --invite` reads back; bad files are
    one line saying what to do."""
    import json
    import os

    from peers.invites import read_invite
    from tests.conftest import assert_one_error_line, run_cli

    mem = MemorySwarm(tiny_config(heads=2, closed=True), tmp_path / "swarm")
    mem.coordinator()
    run_dir = mem.coordinator_role().run_dir

    printed = run_cli("key", tmp_path / "me.key")
    assert printed.exit_code == 0 and printed.stdout.strip() == Identity.load_or_create(tmp_path / "me.key").fingerprint
    assert run_cli("key", tmp_path / "me.key").stdout == printed.stdout  # the same key, not a new one

    mine = run_cli("invite", "--run-dir", run_dir, "--member", printed.stdout.strip(), "--out", tmp_path / "mine.json")
    assert mine.exit_code == 0, mine.stderr
    invite, key = read_invite(tmp_path / "mine.json")
    assert (invite.member, invite.run_id, key) == (printed.stdout.strip(), mem.run_id, None)
    assert invite_problem(invite, RunKeys(mem.run_id), time.time()) is None

    bearer = run_cli("invite", "--run-dir", run_dir, "--out", tmp_path / "bearer.json", "--days", "1")
    assert bearer.exit_code == 0 and "privately" in bearer.stderr
    assert os.stat(tmp_path / "bearer.json").st_mode & 0o077 == 0
    invite, key = read_invite(tmp_path / "bearer.json")
    assert key is not None and key.fingerprint == invite.member

    body = json.loads((tmp_path / "mine.json").read_text())
    body["invite"]["expires"] += 86400
    (tmp_path / "edited.json").write_text(json.dumps(body))
    (tmp_path / "garbage.json").write_text("{not json")
    for name, expected in (("edited.json", "signature"), ("garbage.json", "not an invite file")):
        assert_one_error_line(run_cli("join", "--initial-peers", "/ip4/127.0.0.1/tcp/9", "--invite",
                                      tmp_path / name), expected)
    assert_one_error_line(run_cli("invite", "--run-dir", tmp_path / "nowhere", "--out", tmp_path / "x.json"),
                          "holds no readable run")
    assert_one_error_line(run_cli("invite", "--run-dir", run_dir, "--member", "bob", "--out", tmp_path / "x.json"),
                          "not a key fingerprint")


def test_a_revoked_member_is_out_within_seconds_and_cannot_join_again(tmp_path, monkeypatch):
    """`lte-swarm revoke` while the run goes on: the coordinator publishes it, every node stops
    counting the member's claims (its heads go free, and to a member waiting for one), and the
    revoked key is told so when it tries to join again; a file that is not a list of keys is one
    line saying what to do."""
    import swarm.membership
    from peers.invites import revoke
    from tests.conftest import assert_one_error_line, run_cli

    monkeypatch.setattr(swarm.membership, "READ_EVERY", 1.0)  # nodes read revocations every second here
    rounds = 8
    cfg = tiny_config(heads=2, merge_every=2, rounds=rounds, min_heads=2, closed=True)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    authority = coordinator_identity(coordinator.role.run_dir)
    expires = int(mem.clock.now() + 3600)
    invites = {n: sign_invite(authority, mem.run_id, named_identity(n).fingerprint, expires) for n in ("p0", "p1", "p2")}
    for name in ("p0", "p1"):
        mem.trainer(name, invite=invites[name])
    mem.run(until=lambda s: any(e["new_round"] >= 2 for e in s["coordinator"].events.of("round")))
    spare = mem.trainer("p2", invite=invites["p2"])  # waits: both heads are held
    revoked = named_identity("p1").fingerprint
    done = run_cli("revoke", "--run-dir", coordinator.role.run_dir, "--member", revoked)
    assert done.exit_code == 0, done.stderr
    at = coordinator.events.of("round")[-1]["new_round"]
    mem.run(max_seconds=600)
    rounds_seen = coordinator.events.of("round")
    assert rounds_seen[-1]["new_round"] == rounds
    # rounds here take under a second of fake time, and nodes read revocations every second
    after = [r for r in rounds_seen if r["round"] >= at + 3]
    assert after and all(revoked not in r["members"] for r in after)
    assert any(spare.rt.peer in r["members"] for r in after)  # its head went to the member waiting
    assert mem["p1"].state == "failed" and "revoked this peer's key" in str(mem["p1"].error)  # told, and gone
    from swarm.membership import Membership

    dht, _ = mem.signing_dht("p1-again")
    again = Membership(dht, RunKeys(mem.run_id), cfg.swarm, mem.clock, invites["p1"])
    with pytest.raises(ConfigError, match="revoked key"):
        again.check_member(named_identity("p1"))
    assert revoke(coordinator.role.run_dir, revoked) == [revoked]  # once is enough
    (coordinator.role.run_dir / "revoked.json").write_text('{"not": "a list"}')
    assert_one_error_line(run_cli("revoke", "--run-dir", coordinator.role.run_dir, "--member", revoked),
                          "revoked.json is not a list of key fingerprints")
