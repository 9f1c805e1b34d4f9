"""Who does what in a closed round, from its members' ready records and the round's seed alone, so
that every peer derives the same division of labour: whether the round is owner-reduced or
all-gathered, which members own (reduce and serve) which parts, and who vouches for a part's reduced
values.

Owners are consecutive in an order that the coordinator's beacon draws afresh every few rounds
(`seed`): in fingerprint order two members that chose keys sorting next to each other would own the
same parts in every round, and agree on a forged digest for them whenever nobody recomputes the
parts. The order holds for OWNER_TURNS turns of each part, as an owner keeps each member's factors of
its parts from one turn to the next, which is what lets contributions travel compact."""

from __future__ import annotations

import hashlib

from swarm.config import SwarmConfig
from swarm.schemas import ReadyRecord

MIN_REDUCE_MEMBERS = 3  # below this, two owners per part means everyone reduces everything: gather instead
OWNER_TURNS = 8  # turns of each part (k rounds each, with k fragments) under one order of the owners


def epoch(r: int, fragments: int = 1) -> int:
    """Which order of the owners round r uses: one per OWNER_TURNS turns of every part."""
    return r // (OWNER_TURNS * max(1, fragments))


def seed(run_id: str, epoch_: int, beacon: str | None) -> str:
    """The seed that orders an epoch's owners: the coordinator's beacon for it (`BeaconRecord`), a
    value nobody else can compute before the coordinator publishes it, in the epoch's first round
    or the round before. Members choose their keys, and with an order anyone could compute ahead
    of time they could choose them to own parts together; a member invited before the beacon was
    out cannot. A peer that finds no beacon (the coordinator down) orders by the run and epoch
    alone."""
    return hashlib.sha256(f"{run_id}|{epoch_}|{beacon or ''}".encode()).hexdigest()


def ordered(members, order: str = "") -> list[str]:
    """`members` in the order the round's `order` seed draws (fingerprint order without one)."""
    if not order:
        return sorted(members)
    return sorted(members, key=lambda p: (hashlib.sha256(f"{order}|{p}".encode()).hexdigest(), p))


def servers(ready_set: dict[str, ReadyRecord], order: str = "") -> list[str]:
    """The round's contributors that accept connections (only they own parts), in the round's
    order (`ordered`)."""
    return ordered((p for p, rec in ready_set.items() if rec.pushed is None), order)


def reduces(cfg: SwarmConfig, ready_set: dict[str, ReadyRecord]) -> bool:
    """Owner-reduced, or (too few members or owners to make it worth it) all-gathered."""
    return cfg.merge == "reduce" and len(ready_set) >= MIN_REDUCE_MEMBERS and len(servers(ready_set)) >= 2


def owners(part: int, members: list[str], count: int = 2, among: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """The `count` members that reduce `part`: consecutive in the round's order of `members`
    (`servers`), so every member owns about count/P of the parts. Two owners check each other;
    one owner is checked by the coordinator's recomputation (`swarm.part_owners`). Only members
    that accept connections own parts. A round that merges only some parts (`among`, one
    fragment's) spreads those over all the members, not over the few that would own them in a
    round of every part."""
    n = len(members)
    slot = part if among is None else among.index(part) * n // len(among)
    return tuple(dict.fromkeys(members[(slot + k) % n] for k in range(count)))


def vouchers(cfg: SwarmConfig, part: int, servers_: list[str], authority: str,
             among: tuple[int, ...] | None = None) -> set[str]:
    """Who reduces and serves a part: its two owners, whose equal digests make it trusted; or
    its one owner and the coordinator, which recomputes every part and whose digest alone
    makes it trusted (the owner serves it under that digest if its sum agreed)."""
    return set(owners(part, servers_, cfg.part_owners, among)) | ({authority} if cfg.part_owners == 1 else set())
