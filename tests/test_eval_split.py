"""The evaluation set is never trained on, whatever the file layout and the number of heads, in the
one-process simulation and in the swarm (trainers and coordinator) alike.

`split_dataset_by_node` hands out whole files when the heads divide the file count and every n-th
record otherwise; the tests cover both, on multi-file local parquet data sets, and read whole
epochs of every head's shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peers.data import DataSource, ImageShape
from swarm.config import DataConfig
from swarm.errors import DataError
from tests.memswarm import MemorySwarm, tiny_config

pytestmark = pytest.mark.timeout(120)

FILES, PER_FILE, HOLDOUT = 4, 100, 60


def _write_parquet(folder, prefix: str, files: int, per_file: int, offset: int = 0) -> None:
    """`files` parquet files of `per_file` distinct 8x8 images each (record i: its index in its
    first two pixels, noise elsewhere)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    for f in range(files):
        ids = np.arange(f * per_file, (f + 1) * per_file) + offset
        images = rng.integers(0, 256, size=(per_file, 8, 8), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
        table = pa.table({"image": [img.tolist() for img in images], "label": (ids % 3).tolist()})
        pq.write_table(table, str(folder / f"{prefix}-{f}.parquet"))


def _keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _shard_records(src: DataSource, shard: int, n: int) -> set[bytes]:
    """Every record shard `shard` of `n` trains on: reads more than a whole epoch of it."""
    it = src.batches(shard, n, 1)
    return set().union(*(_keys(next(it)[0]) for _ in range(FILES * PER_FILE // n + 10)))


@pytest.fixture(scope="module")
def multi_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "train"
    _write_parquet(folder, "train", FILES, PER_FILE)
    return folder


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rotate", [False, True])
def test_no_head_trains_on_the_evaluation_set(multi_file, heads, rotate):
    """4 files: 1, 2 and 4 heads get whole files (where a per-shard skip used to miss records of the
    evaluation set), 3 and 8 heads every n-th record. Every training record is used exactly once
    per epoch across the heads, and none of them is held out."""
    src = DataSource(DataConfig(source=str(multi_file), holdout=HOLDOUT, rotate_shards=rotate), ImageShape(8, 1))
    x_eval, _ = src.eval_set()
    held = _keys(x_eval)
    assert len(held) == HOLDOUT
    shards = [_shard_records(src, i, heads) for i in range(heads)]
    for i, shard in enumerate(shards):
        assert not shard & held, f"head {i} of {heads} trains on {len(shard & held)} held-out records"
    if not rotate:
        assert sum(len(s) for s in shards) == len(set().union(*shards))  # pairwise disjoint
    assert len(set().union(*shards)) == FILES * PER_FILE - HOLDOUT  # nothing else dropped


def test_eval_source_split_is_used_whole_and_training_keeps_every_record(tmp_path):
    """`eval_source: "@validation"` reads the validation split of the same hf: data set; training
    then keeps all of the train split."""
    _write_parquet(tmp_path / "ds", "train", 2, 50)
    _write_parquet(tmp_path / "ds", "validation", 1, 30, offset=1000)
    cfg = DataConfig(source=f"hf:{tmp_path / 'ds'}", eval_source="@validation", holdout=30)
    assert cfg.eval_spec == f"hf:{tmp_path / 'ds'}@validation"
    src = DataSource(cfg, ImageShape(8, 1))
    x_eval, _ = src.eval_set()
    held = _keys(x_eval)
    shards = [_shard_records(src, i, 2) for i in range(2)]
    assert len(held) == 30 and not (shards[0] | shards[1]) & held
    assert len(shards[0] | shards[1]) == 100


@pytest.mark.parametrize("eval_source", [False, True])
def test_the_validation_split_is_carved_out_of_training_and_never_overlaps_the_test_set(multi_file, tmp_path,
                                                                                        eval_source):
    """`data.validation` takes training records (never test ones) that no head then trains on; the
    heads keep every other training record."""
    if eval_source:
        _write_parquet(tmp_path / "eval", "eval", 1, HOLDOUT, offset=5000)
    cfg = DataConfig(source=str(multi_file), holdout=HOLDOUT, validation=50,
                     eval_source=str(tmp_path / "eval") if eval_source else None)
    src = DataSource(cfg, ImageShape(8, 1))
    test, validation = _keys(src.eval_set()[0]), _keys(src.validation_set()[0])
    assert len(test) == HOLDOUT and len(validation) == 50 and not test & validation
    shards = [_shard_records(src, i, 3) for i in range(3)]
    trained = set().union(*shards)
    assert not trained & validation and not trained & test
    assert len(trained) == FILES * PER_FILE - 50 - (0 if eval_source else HOLDOUT)
    with pytest.raises(DataError, match="fewer than data.validation"):
        DataSource(cfg.model_copy(update={"validation": 10_000}), ImageShape(8, 1)).validation_set()
    with pytest.raises(DataError, match="no validation split"):
        DataSource(cfg.model_copy(update={"validation": 0}), ImageShape(8, 1)).validation_set()


def test_eval_source_split_needs_an_hf_source():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="names a split, which needs an hf: data.source"):
        DataConfig(source="digits", eval_source="@validation")
    assert DataConfig(source="digits", eval_source="/data/val.parquet").eval_spec == "/data/val.parquet"


class _Spy(DataSource):
    """Records every DataSource a role opens and every shard it asks for."""

    opened: list["_Spy"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shards: set[tuple[int, int]] = set()
        self.evaluated: set[bytes] = set()
        _Spy.opened.append(self)

    def eval_set(self):
        x, y = super().eval_set()
        self.evaluated |= _keys(x)
        return x, y

    def batches(self, shard, n_shards, batch_size):
        self.shards.add((shard, n_shards))
        return super().batches(shard, n_shards, batch_size)


def _leaks(sources: list[_Spy]) -> dict[tuple[int, int], int]:
    """Held-out records in each shard any role trained on, over whole epochs of those shards."""
    evaluated = set().union(*(s.evaluated for s in sources))
    assert len(evaluated) == HOLDOUT
    trained = [(shard, s) for s in sources for shard in s.shards]
    assert trained
    return {shard: len(_shard_records(s, *shard) & evaluated) for shard, s in trained}


def test_simulation_data_path_keeps_the_evaluation_set_out(multi_file, monkeypatch):
    import peers.simulate

    from peers.simulate import simulate

    _Spy.opened = []
    monkeypatch.setattr(peers.simulate, "DataSource", _Spy)
    cfg = tiny_config(heads=4, merge_every=2, rounds=1).with_overrides(
        {"data.source": str(multi_file), "data.holdout": HOLDOUT})
    simulate(cfg)
    assert {shard for s in _Spy.opened for shard in s.shards} == {(i, 4) for i in range(4)}
    assert not any(_leaks(_Spy.opened).values())


def test_swarm_data_path_keeps_the_evaluation_set_out(multi_file, monkeypatch, tmp_path):
    """Trainers open their own DataSource and train their heads' shards; the coordinator evaluates."""
    import peers.coordinator
    import peers.trainer

    _Spy.opened = []
    monkeypatch.setattr(peers.trainer, "DataSource", _Spy)
    monkeypatch.setattr(peers.coordinator, "DataSource", _Spy)
    cfg = tiny_config(heads=4, merge_every=2, rounds=2, min_heads=4).with_overrides(
        {"data.source": str(multi_file), "data.holdout": HOLDOUT})
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    for i in range(2):  # volunteers with their own copy of the run's local data
        swarm.trainer(f"p{i}", heads=2, data=str(multi_file))
    swarm.run()
    assert all(n.state == "finished" for n in swarm.nodes.values())
    assert {shard for s in _Spy.opened for shard in s.shards} == {(i, 4) for i in range(4)}
    assert not any(_leaks(_Spy.opened).values())
