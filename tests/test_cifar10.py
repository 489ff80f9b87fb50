"""CIFAR-10 on python pickle batches the tests write in CIFAR-10's own format; downloads refused."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import torch
from conftest import CIFAR_NAMES, PER_BATCH, _write_pickle, write_cifar

from cbam_train.data import cifar10 as cifar10_mod
from cbam_train.data.cifar10 import load_cifar10
from cbam_train.data.datasets import DataError, build_splits

HINTS = ("data.root", "data=imagefolder", "experiment=smoke")


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any download attempt that a test did not ask for fails loudly (and never reaches the network)."""
    import torchvision.datasets.utils as tvu

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download attempt: {args}")

    monkeypatch.setattr(tvu, "download_and_extract_archive", refuse)


# ---------------------------------------------------------------- CIFAR-10 (python pickle batches)



def test_cifar10_loads_batches_with_cifar_layout(tmp_path):
    written = write_cifar(tmp_path)
    # one distinctive pixel in the 3rd batch, image 7, at (row 5, col 17): R=11, G=22, B=33
    d3, l3 = written["data_batch_3"]
    d3[7, 0 * 1024 + 5 * 32 + 17], d3[7, 1 * 1024 + 5 * 32 + 17], d3[7, 2 * 1024 + 5 * 32 + 17] = 11, 22, 33
    _write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3",
                  {b"batch_label": b"x", b"labels": l3, b"data": d3, b"filenames": [b"f.png"] * PER_BATCH})

    tx, ty, sx, sy, classes = load_cifar10(str(tmp_path), download=False)
    assert tx.shape == (5 * PER_BATCH, 3, 32, 32) and tx.dtype == np.uint8
    assert sx.shape == (PER_BATCH, 3, 32, 32) and sx.dtype == np.uint8
    i = 2 * PER_BATCH + 7
    assert tx[i, :, 5, 17].tolist() == [11, 22, 33]
    assert tx[i, :, 17, 5].tolist() != [11, 22, 33]  # rows and columns are not swapped
    # every pixel: channel c, row r, column k is flat index c*1024 + r*32 + k of the row
    for b in range(5):
        flat, _ = written[f"data_batch_{b + 1}"]
        r, k = 9, 30
        for c in range(3):
            rows = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
            np.testing.assert_array_equal(tx[rows, c, r, k], flat[:, c * 1024 + r * 32 + k])
    train_flat = np.concatenate([written[f"data_batch_{b}"][0] for b in range(1, 6)])
    np.testing.assert_array_equal(tx.reshape(len(tx), -1), train_flat)
    assert ty.tolist() == sum((written[f"data_batch_{b}"][1] for b in range(1, 6)), [])
    np.testing.assert_array_equal(sx.reshape(len(sx), -1), written["test_batch"][0])
    assert sy.tolist() == written["test_batch"][1]
    assert not np.array_equal(sx, tx[:PER_BATCH])  # the test split is its own batch
    assert classes == CIFAR_NAMES


def test_cifar10_batch_with_empty_bytes_loads(tmp_path):
    written = write_cifar(tmp_path)
    data, labels = written["data_batch_1"]
    _write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1",
                  {b"batch_label": b"", b"labels": labels, b"data": data, b"filenames": [b""] * PER_BATCH})
    tx, ty, *_ = load_cifar10(str(tmp_path), download=False)
    np.testing.assert_array_equal(tx[:PER_BATCH].reshape(PER_BATCH, -1), data)


def test_cifar10_meta_with_str_key_names_classes(tmp_path):
    custom = [f"thing{i}".encode() for i in range(10)]
    write_cifar(tmp_path, meta_key="label_names", meta_names=custom)
    *_, classes = load_cifar10(str(tmp_path), download=False)
    assert classes == [f"thing{i}" for i in range(10)]


def test_cifar10_meta_with_bytes_key_names_classes(tmp_path):
    write_cifar(tmp_path, meta_key=b"label_names", meta_names=[f"thing{i}".encode() for i in range(10)])
    *_, classes = load_cifar10(str(tmp_path), download=False)
    assert classes == [f"thing{i}" for i in range(10)]


def test_cifar10_corrupt_meta_falls_back_to_cifar_names(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"\x00garbage")
    *_, classes = load_cifar10(str(tmp_path), download=False)
    assert classes == CIFAR_NAMES


def test_cifar10_build_splits(tmp_path, make_cfg):
    write_cifar(tmp_path)
    cfg = make_cfg(["data=cifar10", f"data.root={tmp_path}", "data.val_size=20"])
    splits = build_splits(cfg.data, cfg.seed, num_classes=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)
    assert set(splits.train.indices.tolist()).isdisjoint(splits.val.indices.tolist())
    np.testing.assert_array_equal(np.bincount(splits.val.targets(), minlength=10), [2] * 10)
    assert splits.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert splits.std == pytest.approx((0.2470, 0.2435, 0.2616))
    assert splits.classes == CIFAR_NAMES
    img, label = splits.train[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32)
    assert label == int(splits.train.targets()[0])


def test_cifar10_limit_is_stratified_subset_of_train(tmp_path, make_cfg):
    write_cifar(tmp_path)
    cfg = make_cfg(["data=cifar10", f"data.root={tmp_path}", "data.val_size=20", "data.limit=40"])
    splits = build_splits(cfg.data, cfg.seed, num_classes=10)
    assert (len(splits.train), len(splits.val)) == (40, 20)
    assert set(splits.train.indices.tolist()).isdisjoint(splits.val.indices.tolist())
    np.testing.assert_array_equal(np.bincount(splits.train.targets(), minlength=10), [4] * 10)


def test_cifar10_missing_folder_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "nowhere"), download=False)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "download=false" in msg
    for hint in HINTS:
        assert hint in msg


@pytest.mark.parametrize("exc", [urllib.error.URLError("offline"), OSError("offline")])
def test_cifar10_download_failure_is_one_line_data_error(tmp_path, monkeypatch, exc):
    import torchvision.datasets.utils as tvu

    calls = []

    def fail(url, *args, **kwargs):
        calls.append(url)
        raise exc

    monkeypatch.setattr(tvu, "download_and_extract_archive", fail)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "fresh"), download=True)
    msg = str(e.value)
    assert calls == [cifar10_mod.CIFAR10_URL]
    assert "\n" not in msg
    assert "offline" in msg and "could not download" in msg
    for hint in HINTS:
        assert hint in msg


def test_cifar10_missing_batch_names_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as e:
        load_cifar10(str(tmp_path), download=False)
    assert "missing" in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_shape", "label_count"])
def test_cifar10_corrupt_batch_names_file(tmp_path, damage):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_shape":
        _write_pickle(path, {b"labels": [0] * 4, b"data": np.zeros((4, 1000), np.uint8)})
    else:
        _write_pickle(path, {b"labels": [0] * 3, b"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), download=False)
    assert str(path) in str(e.value)


class _Hostile:
    """Unpickling this calls open(path, 'w'): creates a file (a stand-in for running arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar10_refuses_hostile_pickle(tmp_path):
    write_cifar(tmp_path / "root")
    # the payload really is hostile when unpickled the ordinary way
    proof = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps({b"data": _Hostile(str(proof))}, protocol=2))[b"data"].close()
    assert proof.exists()

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1"
    _write_pickle(path, {b"labels": [0], b"data": _Hostile(str(marker))})
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "root"), download=False)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_cifar10_refuses_hostile_meta(tmp_path):
    write_cifar(tmp_path / "root")
    marker = tmp_path / "pwned.txt"
    _write_pickle(tmp_path / "root" / "cifar-10-batches-py" / "batches.meta", {"label_names": _Hostile(str(marker))})
    *_, classes = load_cifar10(str(tmp_path / "root"), download=False)
    assert not marker.exists()
    assert classes == CIFAR_NAMES
