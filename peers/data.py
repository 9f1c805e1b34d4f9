"""Where a peer's images come from: the embedded digits, a Hugging Face dataset streamed from the
hub, or a dataset on local disk, all read through the same `datasets` streaming code path.

Every source becomes a stream of records, split into disjoint shards (one per head) with
`split_dataset_by_node`, shuffled within a buffer and repeated for as many epochs as training needs.
The evaluation set is the first `holdout` records of `eval_source` (e.g. the validation split), or,
without one, of the stream itself. Those records are then recognised by their content in every
shard and skipped: `split_dataset_by_node` hands out whole files when the heads divide the file
count, so "skip the first records, then shard" would only skip them in the first shard's files and
the other heads would train on the evaluation set.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from swarm.config import DataConfig, parse_hf_spec
from swarm.errors import DataError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
_TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageShape:
    """What the model expects: square images of `size` pixels with `channels` channels."""

    size: int
    channels: int


@functools.lru_cache(maxsize=1)
def digits_dataset():
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped inside scikit-learn, as a
    `datasets.Dataset` of uint8 images, in a fixed shuffled order so the held-out head is balanced.
    Built once per process (an immutable in-memory table): every head's stream and the evaluation
    set read the same one, and building it takes longer than a small round."""
    import datasets
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    images = np.round(bunch.images[order] * (255.0 / 16.0)).astype(np.uint8)
    return datasets.Dataset.from_dict({"image": images.tolist(), "label": bunch.target[order].tolist()})


def is_shareable(spec: str) -> bool:
    """Whether a run may name `spec` as every volunteer's data: the embedded digits or a hub data
    set, which the spec alone pins. A local path names a file on each volunteer's own disk, which
    the run's coordinator must not choose."""
    return spec == "digits" or spec.startswith("hf:")


def open_stream(spec: str):
    """The records of `spec` as a `datasets.IterableDataset` (streamed, nothing downloaded up front)."""
    import datasets

    try:
        if spec == "digits":
            return digits_dataset().to_iterable_dataset()
        if spec.startswith("hf:"):
            name, config, split = parse_hf_spec(spec)
            return datasets.load_dataset(name, config, split=split, streaming=True)
        return _open_local(Path(spec).expanduser())
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DataError(f"cannot open data {spec!r}: {_first_line(exc)}") from None
    except Exception as exc:  # datasets raises many library-specific types for unreadable data
        raise DataError(f"cannot open data {spec!r}: {type(exc).__name__}: {_first_line(exc)}") from None


def _open_local(path: Path):
    import datasets

    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; expected digits, hf:NAME[:CONFIG][@SPLIT] or a local dataset")
    if path.is_file():
        builder = _TABLE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"cannot read {str(path)!r}: expected a .parquet, .arrow or .csv file, or a folder")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    if (path / "dataset_info.json").exists() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path)).to_iterable_dataset()
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    for suffix, builder in _TABLE_SUFFIXES.items():
        tables = [str(p) for p in files if p.suffix.lower() == suffix]
        if tables:
            return datasets.load_dataset(builder, data_files=tables, split="train", streaming=True)
    if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in files):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train", streaming=True)
    raise DataError(f"no parquet, arrow, csv or image files under {str(path)!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _column(record: dict[str, Any], names: tuple[str, ...], what: str) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise DataError(f"records have no {what} column (looked for {', '.join(names)}; found {', '.join(record)})")


def _pixels(record: dict[str, Any]) -> np.ndarray:
    """The record's image as a float array in [0, 1], shape (H, W) or (H, W, C)."""
    try:
        value = _column(record, IMAGE_COLUMNS, "image")
    except DataError:
        # Tabular images (e.g. MNIST as csv): every column but the label is one pixel.
        flat = [v for k, v in record.items() if k not in LABEL_COLUMNS and isinstance(v, (int, float))]
        if not flat:
            raise
        value = flat
    if isinstance(value, dict) and value.get("bytes") is not None:
        from PIL import Image

        value = Image.open(io.BytesIO(value["bytes"]))
    if hasattr(value, "convert"):  # a PIL image
        value = np.asarray(value.convert("RGB") if value.mode not in ("L", "RGB") else value)
    array = np.asarray(value)
    if array.size == 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"cannot read an image from a value of type {type(value).__name__}")
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if side * side != array.size:
            raise DataError(f"a flat image of {array.size} values is not square")
        array = array.reshape(side, side)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # channels-first (pixel_values) -> channels-last
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) or array.max() > 1.0 else 1.0
    return array.astype(np.float32) / scale


def to_tensor(record: dict[str, Any], shape: ImageShape) -> tuple[torch.Tensor, int]:
    """One record -> (image tensor (C, size, size) normalised to [-1, 1], label)."""
    label = _column(record, LABEL_COLUMNS, "label")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise DataError(f"label {label!r} is not an integer class id") from None
    pixels = torch.from_numpy(_pixels(record))
    image = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    if image.shape[0] != shape.channels:
        image = image.mean(0, keepdim=True) if shape.channels == 1 else image[:1].expand(shape.channels, -1, -1)
    if image.shape[1:] != (shape.size, shape.size):
        image = F.interpolate(image[None], size=(shape.size, shape.size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
    return (image - 0.5) / 0.5, label


def _collate(records: list[dict[str, Any]], shape: ImageShape) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [to_tensor(r, shape) for r in records]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.long)


def _shuffled(records: Iterable[dict[str, Any]], buffer_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A streaming shuffle: keep `buffer_size` records, emit a random one as each new one arrives."""
    buffer: list[dict[str, Any]] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        i = int(rng.integers(buffer_size))
        buffer[i], record = record, buffer[i]
        yield record
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[i]


def record_key(record: dict[str, Any]) -> bytes:
    """A digest of a record's content (every column, images by their pixels): the identity by which
    held-out records are recognised in any shard, whatever file or position they come from."""
    hasher = hashlib.blake2b(digest_size=16)
    for name in sorted(record):
        hasher.update(name.encode() + b"\0")
        _feed(hasher, record[name])
    return hasher.digest()


def _feed(hasher, value: Any) -> None:
    if hasattr(value, "mode") and hasattr(value, "tobytes"):  # a PIL image
        hasher.update(f"image {value.mode} {value.size}".encode())
        hasher.update(value.tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            hasher.update(f"{key}=".encode())
            _feed(hasher, value[key])
    elif isinstance(value, (bytes, bytearray)):
        hasher.update(value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        array = np.asarray(value)
        if array.dtype == object:
            hasher.update(repr(value).encode())
        else:
            hasher.update(f"array {array.dtype} {array.shape}".encode())
            hasher.update(np.ascontiguousarray(array).tobytes())
    else:
        hasher.update(repr(value).encode())
    hasher.update(b"\1")


class DataSource:
    """A data spec opened once: the evaluation set and per-head training streams, disjoint."""

    def __init__(self, cfg: DataConfig, shape: ImageShape, seed: int = 0):
        self.cfg = cfg
        self.shape = shape
        self.seed = seed
        self.stream = open_stream(cfg.source)
        self._held: frozenset[bytes] | None = None
        self._eval: list[dict[str, Any]] | None = None
        self._validation: list[dict[str, Any]] | None = None

    def _eval_records(self) -> list[dict[str, Any]]:
        """The evaluation set's records, read once (from the hub, a second read downloads again)."""
        if self._eval is not None:
            return self._eval
        if self.cfg.eval_source is None:
            stream = self.stream
        else:
            try:
                spec = self.cfg.eval_spec
            except ValueError as exc:
                raise DataError(str(exc)) from None
            stream = open_stream(spec)
        records = list(self._guard(stream.take(self.cfg.holdout)))
        if not records:
            raise DataError(f"data {self.cfg.eval_source or self.cfg.source!r} is empty")
        self._eval = records
        return records

    def _test_keys(self) -> frozenset[bytes]:
        """Content keys of the evaluation set's records where they come from the training stream."""
        if self.cfg.eval_source is not None:
            return frozenset()
        return frozenset(record_key(r) for r in self._eval_records())

    def _validation_records(self) -> list[dict[str, Any]]:
        """The validation split's records, read once (like the evaluation set's)."""
        if self._validation is not None:
            return self._validation
        if not self.cfg.validation:
            raise DataError("no validation split: set data.validation to the number of training records to carve out")
        test = self._test_keys()
        records = list(islice((r for r in self._guard(self.stream) if record_key(r) not in test), self.cfg.validation))
        if len(records) < self.cfg.validation:
            raise DataError(f"data {self.cfg.source!r} has {len(records)} training records, fewer than "
                            f"data.validation ({self.cfg.validation})")
        self._validation = records
        return records

    def held_out(self) -> frozenset[bytes]:
        """Content keys of the records training must skip: the evaluation set when it is taken from
        the training stream (nothing when it comes from `eval_source`), and the validation split."""
        if self._held is None:
            validation = self._validation_records() if self.cfg.validation else []
            self._held = self._test_keys() | {record_key(r) for r in validation}
        return self._held

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `holdout` records of `eval_source` (or of the stream), as tensors."""
        return _collate(self._eval_records(), self.shape)

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The `validation` records carved out of the training data, as tensors: what rates are
        tuned on, so that the evaluation set judges only the tuned runs."""
        return _collate(self._validation_records(), self.shape)

    def batches(self, shard: int, n_shards: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches from shard `shard` of `n_shards` of the training records (disjoint
        across shards: whole files per shard when they divide evenly, else every n-th record;
        never a held-out record), reshuffled within a buffer every epoch, deterministically from
        (seed, shard, epoch)."""
        from datasets.distributed import split_dataset_by_node

        held = self.held_out()
        epoch = 0
        while True:
            # With rotation, stream i reads shard (i + epoch) mod n: still disjoint from the other
            # streams at any time, but over epochs every head sees all the data.
            rank = (shard + epoch) % n_shards if self.cfg.rotate_shards else shard
            part = split_dataset_by_node(self.stream, rank=rank, world_size=n_shards)
            if held:
                part = (r for r in self._guard(part) if record_key(r) not in held)
            rng = np.random.default_rng([self.seed, shard, epoch])
            pending: list[dict[str, Any]] = []
            seen = 0
            for record in _shuffled(self._guard(part), self.cfg.shuffle_buffer, rng):
                pending.append(record)
                seen += 1
                if len(pending) == batch_size:
                    yield _collate(pending, self.shape)
                    pending = []
            if seen == 0:
                raise DataError(f"shard {shard} of {n_shards} of {self.cfg.source!r} has no training records "
                                f"(after holding out {len(held)})")
            epoch += 1

    def _guard(self, iterable):
        """Re-raise the library's errors while reading records as one-line `DataError`s."""
        try:
            yield from iterable
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read records of {self.cfg.source!r}: {type(exc).__name__}: {_first_line(exc)}") from None
