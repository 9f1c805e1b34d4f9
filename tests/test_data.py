"""Data sources: the embedded digits and local datasets, read through the same streaming code path
as the hub (`hf:` with a local folder), split into disjoint per-head shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peers.data import DataSource, ImageShape, open_stream
from swarm.config import DataConfig
from swarm.errors import DataError


def _keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _epoch(source: DataSource, shard: int, n: int, batch: int, count: int) -> torch.Tensor:
    it = source.batches(shard, n, batch)
    return torch.cat([next(it)[0] for _ in range(count)])


def test_digits_holdout_and_disjoint_head_shards():
    src = DataSource(DataConfig(source="digits", holdout=300), ImageShape(8, 1))
    x, y = src.eval_set()
    assert x.shape == (300, 1, 8, 8) and y.shape == (300,)
    assert set(y.tolist()) == set(range(10))
    assert x.min() >= -1 and x.max() <= 1
    shards = [_keys(_epoch(src, i, 4, 24, 15)) for i in range(4)]  # 15 * 24 = 360 = one epoch of a shard
    for i in range(4):
        assert len(shards[i]) > 300  # a few digits images are duplicates of each other
        for j in range(i + 1, 4):
            assert not shards[i] & shards[j]
    held = _keys(x)
    assert sum(len(s & held) for s in shards) <= 3  # only exact duplicate images may coincide


def test_rotated_shards_stay_disjoint_and_cover_everything_over_epochs():
    src = DataSource(DataConfig(source="digits", holdout=1597, rotate_shards=True), ImageShape(8, 1))
    # 200 training records, 4 shards of 50: one batch of 50 is one epoch of one stream
    streams = [src.batches(i, 4, 50) for i in range(4)]
    seen = [set() for _ in range(4)]
    for epoch in range(4):
        batch = [_keys(next(s)[0]) for s in streams]
        for i in range(4):
            for j in range(i + 1, 4):
                assert not batch[i] & batch[j]  # disjoint at every epoch
            seen[i] |= batch[i]
    assert all(len(s) == 200 for s in seen)  # and every stream saw all 200 records


def test_streams_repeat_with_a_new_order_each_epoch():
    src = DataSource(DataConfig(source="digits", holdout=1700, shuffle_buffer=64), ImageShape(8, 1))
    it = src.batches(0, 1, 97)  # exactly one epoch of the 97 training records per batch
    first, second = next(it)[1], next(it)[1]
    assert sorted(first.tolist()) == sorted(second.tolist())
    assert first.tolist() != second.tolist()


def _write_images(tmp_path, n=24, size=12):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n) % 3
    return images, labels


def test_local_parquet_through_the_hub_code_path(tmp_path):
    """`hf:<folder>` goes through `datasets.load_dataset(..., streaming=True)` exactly as a hub name
    would; here the folder holds parquet shards of PNG-encoded images."""
    import datasets

    images, labels = _write_images(tmp_path)
    from PIL import Image

    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in images], "labels": labels.tolist()},
                                    features=datasets.Features({"img": datasets.Image(), "labels": datasets.Value("int64")}))
    (tmp_path / "data").mkdir()
    ds.shard(2, 0).to_parquet(str(tmp_path / "data" / "train-0.parquet"))
    ds.shard(2, 1).to_parquet(str(tmp_path / "data" / "train-1.parquet"))
    stream = open_stream(f"hf:{tmp_path / 'data'}@train")
    assert isinstance(stream, datasets.IterableDataset)
    src = DataSource(DataConfig(source=f"hf:{tmp_path / 'data'}", holdout=4), ImageShape(8, 3))
    x, y = src.eval_set()
    assert x.shape == (4, 3, 8, 8)
    assert sorted(y.tolist() + [int(v) for v in next(src.batches(0, 1, 20))[1]]) == sorted(labels.tolist())
    local = DataSource(DataConfig(source=str(tmp_path / "data" / "train-0.parquet"), holdout=2), ImageShape(12, 1))
    x, _ = local.eval_set()
    # grayscale PNG at its own size: exact pixels, normalised
    torch.testing.assert_close(x[0, 0], torch.from_numpy(images[0]).float() / 127.5 - 1)


def test_csv_of_pixels_imagefolder_and_saved_dataset(tmp_path):
    import datasets
    from PIL import Image

    images, labels = _write_images(tmp_path, n=12, size=4)
    header = ",".join(["label"] + [f"p{i}" for i in range(16)])
    rows = [",".join(str(v) for v in [l, *img.flatten()]) for img, l in zip(images, labels)]
    (tmp_path / "pix.csv").write_text("\n".join([header, *rows]) + "\n")
    x, y = DataSource(DataConfig(source=str(tmp_path / "pix.csv"), holdout=5), ImageShape(4, 1)).eval_set()
    assert y.tolist() == labels[:5].tolist()
    torch.testing.assert_close(x[1, 0], torch.from_numpy(images[1]).float() / 127.5 - 1)

    for i, (img, l) in enumerate(zip(images, labels)):
        folder = tmp_path / "folder" / f"class{l}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    x, y = DataSource(DataConfig(source=str(tmp_path / "folder"), holdout=12), ImageShape(8, 1)).eval_set()
    assert x.shape == (12, 1, 8, 8) and set(y.tolist()) == {0, 1, 2}

    datasets.Dataset.from_dict({"pixel_values": images.tolist(), "label": labels.tolist()}).save_to_disk(str(tmp_path / "saved"))
    x, y = DataSource(DataConfig(source=str(tmp_path / "saved"), holdout=3), ImageShape(4, 1)).eval_set()
    assert y.tolist() == labels[:3].tolist()


@pytest.mark.parametrize("content,expected", [
    ("label\n1\n", "no image column"),
    ("image,label\n1.5,cat\n", "label 'cat' is not an integer class id"),
    ("image,label\nfoo,1\n", "cannot read an image from a value of type str"),
])
def test_malformed_records_raise_data_error(tmp_path, content, expected):
    (tmp_path / "bad.csv").write_text(content)
    src = DataSource(DataConfig(source=str(tmp_path / "bad.csv"), holdout=1), ImageShape(4, 1))
    with pytest.raises(DataError, match=expected):
        src.eval_set()


def test_unreadable_sources_raise_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="expected a .parquet, .arrow or .csv file"):
        open_stream(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no parquet, arrow, csv or image files"):
        open_stream(str(tmp_path / "empty"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError):
        DataSource(DataConfig(source=str(tmp_path / "broken.parquet"), holdout=1), ImageShape(4, 1)).eval_set()
