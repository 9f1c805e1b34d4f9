"""W merged in fragments (lte.fragments): which parts a round covers, that a round moves only its
fragment's part of W and leaves the rest of every head's change to accumulate, and who reduces."""

from __future__ import annotations

import pytest
import torch

from swarm.config import load_config
from swarm.errors import ConfigError
from swarm.lte_model import LTEModel, LTESpec
from swarm.rounds import plan
from swarm.wire import plan_parts, round_parts, targets_of
from tests.conftest import ROOT, randomize_heads, tiny_mlp


@pytest.mark.parametrize("n_parts,k", [(8, 1), (8, 3), (8, 4), (3, 5)])
def test_each_part_is_merged_once_every_k_rounds_and_the_last_round_merges_all(n_parts, k):
    total = 11
    covered = [round_parts(n_parts, k, r, total) for r in range(total)]
    assert covered[-1] == list(range(n_parts))
    assert all(c for c in covered)
    turns = min(k, n_parts)
    for start in range(total - turns):  # every window of k rounds covers every part exactly once
        window = sorted(i for r in range(start, start + turns) for i in covered[r])
        assert window == list(range(n_parts)), (start, covered)
    if turns > 1:
        assert max(len(c) for c in covered[:-1]) <= -(-n_parts // turns)


def test_a_round_moves_only_its_fragment_and_the_rest_accumulates_until_its_turn():
    """Fragment 0, then fragment 1 of two: after the first round W and the shared parameters
    outside fragment 0 are untouched and the heads' changes there are still all unmerged; after
    the second W is what one merge of everything would give."""
    n = 3
    spec = LTESpec(n_heads=n, rank=2, alpha=8.0, nonlinear="replicate")
    model, reference = LTEModel(tiny_mlp(), spec, list(range(n))), LTEModel(tiny_mlp(), spec, list(range(n)))
    randomize_heads(model, seed=4)
    randomize_heads(reference, seed=4)
    parts = plan_parts(model, 4)
    first, second = (targets_of(parts, round_parts(len(parts), 2, r, None)) for r in (0, 1))
    assert first and second and not first & second and first | second == set(model.layer_names) | set(model.replicated)
    before = {k: v.clone() for k, v in model.shared_state().items()}
    pending = model.weight_deltas(targets=second)
    model.merge(targets=first)
    for key, value in model.shared_state().items():
        target = key.removesuffix(".weight") if key.removesuffix(".weight") in model.layer_names else key
        if target in first:
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    for name, delta in model.weight_deltas(targets=second).items():
        assert torch.equal(delta, pending[name])
    assert all(d.abs().max() == 0 for d in model.weight_deltas(targets=first).values())
    model.merge(targets=second)
    reference.merge()
    for key, value in model.shared_state().items():
        torch.testing.assert_close(value, reference.shared_state()[key], rtol=0, atol=1e-12, msg=key)
    assert all(d.abs().max() == 0 for d in model.weight_deltas().values())


def test_a_fragments_parts_are_reduced_by_members_spread_over_the_swarm():
    members = [f"{i:02d}" for i in range(4)]
    among = (1, 5)  # fragment 1 of 4 of 8 parts: in a round of every part both belong to members 01 and 02
    assert plan.owners(1, members, 2) == plan.owners(5, members, 2) == ("01", "02")
    owners = [o for part in among for o in plan.owners(part, members, 2, among)]
    assert sorted(owners) == members


def test_more_fragments_than_parts_is_refused():
    cfg = load_config(ROOT / "configs" / "digits-vit-tiny.yaml")
    assert cfg.with_overrides({"lte.fragments": cfg.n_parts}).lte.fragments == cfg.n_parts
    with pytest.raises(ConfigError, match="lte.fragments .* exceeds the parts"):
        cfg.with_overrides({"lte.fragments": cfg.n_parts + 1})


def test_a_contribution_carrying_anything_outside_the_rounds_fragment_is_refused_whole():
    """A blob for a fragment round may carry that fragment's tensors alone: one with another
    fragment's layer, or a tensor of no target at all, is refused in every check, a whole one or
    a part's (whose other tensors were not its business before)."""
    from safetensors.torch import load as st_load, save as st_save

    from swarm.wire import ContributionError, check_parts, decode_contribution, encode_contribution, parse_contribution

    spec = LTESpec(n_heads=2, rank=2, alpha=8.0, nonlinear="replicate")
    peer, receiver = LTEModel(tiny_mlp(), spec, [0]), LTEModel(tiny_mlp(), spec, [])
    randomize_heads(peer, seed=1, scale=0.01)
    parts = plan_parts(peer, 4)
    fragment = targets_of(parts, round_parts(len(parts), 2, 0, None))
    honest = encode_contribution(peer, [0], targets=fragment)[0]
    got = decode_contribution(honest, "p", receiver, 10.0, part=fragment, scope=fragment)
    assert set(got.weights) | set(got.replicas) == set(fragment)
    whole = encode_contribution(peer, [0])[0]  # all of W, offered in a round of one fragment
    with pytest.raises(ContributionError, match="outside the round's merge"):
        decode_contribution(whole, "p", receiver, 10.0, part=fragment, scope=fragment)
    tensors = dict(st_load(honest))
    tensors["w/nowhere/A"] = torch.zeros(1)
    stray = st_save(tensors, metadata=parse_contribution(honest).meta)
    for scope in (fragment, None):
        checked = check_parts(parse_contribution(stray), "p", receiver, 10.0, 1.0, [parts[0], parts[2]], scope=scope)
        assert all(isinstance(c, ContributionError) and "outside the round's merge" in str(c) for c in checked)
