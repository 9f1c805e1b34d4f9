"""Who does what in a closed round, from its members' ready records alone, so that every peer
derives the same division of labour: whether the round is owner-reduced or all-gathered, which
members own (reduce and serve) which parts, and who vouches for a part's reduced values."""

from __future__ import annotations

from swarm.config import SwarmConfig
from swarm.schemas import ReadyRecord

MIN_REDUCE_MEMBERS = 3  # below this, two owners per part means everyone reduces everything: gather instead


def servers(ready_set: dict[str, ReadyRecord]) -> list[str]:
    """The round's contributors that accept connections: only they own parts."""
    return sorted(p for p, rec in ready_set.items() if rec.pushed is None)


def reduces(cfg: SwarmConfig, ready_set: dict[str, ReadyRecord]) -> bool:
    """Owner-reduced, or (too few members or owners to make it worth it) all-gathered."""
    return cfg.merge == "reduce" and len(ready_set) >= MIN_REDUCE_MEMBERS and len(servers(ready_set)) >= 2


def owners(part: int, members: list[str], count: int = 2, among: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """The `count` members that reduce `part`: consecutive in fingerprint order, so every member
    owns about count/P of the parts. Two owners check each other; one owner is checked by the
    coordinator's recomputation (`swarm.part_owners`). Only members that accept connections own
    parts (`servers`). A round that merges only some parts (`among`, one fragment's) spreads
    those over all the members, not over the few that would own them in a round of every part."""
    n = len(members)
    slot = part if among is None else among.index(part) * n // len(among)
    return tuple(dict.fromkeys(members[(slot + k) % n] for k in range(count)))


def vouchers(cfg: SwarmConfig, part: int, servers_: list[str], authority: str,
             among: tuple[int, ...] | None = None) -> set[str]:
    """Who reduces and serves a part: its two owners, whose equal digests make it trusted; or
    its one owner and the coordinator, which recomputes every part and whose digest alone
    makes it trusted (the owner serves it under that digest if its sum agreed)."""
    return set(owners(part, servers_, cfg.part_owners, among)) | ({authority} if cfg.part_owners == 1 else set())
