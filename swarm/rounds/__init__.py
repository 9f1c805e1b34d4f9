"""Merge rounds: how every peer's W moves from round r to round r + 1 identically.

`machine` sequences a round (its module docstring shows who sends what to whom, and each step);
the rest are the round's parts, one concern each:

- `types`: the round's values (`MergeRound`, `RoundStep`, `RoundResult`, `ReduceWork`);
- `context`: what every part shares (identity, DHT, blob server, config, model);
- `agreement`: whose records count, the votes, the coordinator's word, the trusted W;
- `state_transfer`: this peer's W and its round, handed out to and taken from donors;
- `plan`: who does what in a closed round (reduced or gathered, the parts' owners);
- `collection`: contributions in and out (serving, pushing from behind NAT, fetching, checking);
- `reduction`: the owner-reduced merge; `gather`: the all-gather.
"""

from swarm.rounds.agreement import agreed_vote
from swarm.rounds.machine import CLOSED_EVERY, MergeProtocol
from swarm.rounds.plan import owners
from swarm.rounds.types import MergeRound, ReduceWork, RoundResult, RoundStep

__all__ = ["CLOSED_EVERY", "MergeProtocol", "MergeRound", "ReduceWork", "RoundResult", "RoundStep", "agreed_vote",
           "owners"]
