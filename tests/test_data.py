"""cbam_train.data: stratified splits, CIFAR-10 pickle batches, image folders, synthetic data, loaders.

No test touches the network: torchvision's download function is replaced for every test in this file.
"""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_train import data as data_mod
from cbam_train.data import (
    DataError,
    ImageDataset,
    build_splits,
    load_cifar10,
    make_loader,
    make_synthetic,
    stratified_split,
    stratified_subset,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HINTS = ("data.root", "data=imagefolder", "experiment=smoke")


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any download attempt that a test did not ask for fails loudly (and never reaches the network)."""
    import torchvision.datasets.utils as tvu

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download attempt: {args}")

    monkeypatch.setattr(tvu, "download_and_extract_archive", refuse)


# ---------------------------------------------------------------- stratified_split / stratified_subset

# Unequal classes: 0 -> 50, 1 -> 30, 2 -> 15, 3 -> 5 (n = 100), shuffled so classes are interleaved.
UNEQUAL = np.random.default_rng(123).permutation(np.repeat([0, 1, 2, 3], [50, 30, 15, 5]))


@pytest.mark.parametrize("val_size", [1, 7, 10, 33, 99])
def test_stratified_split_exact_size_proportional_and_partition(val_size):
    labels = UNEQUAL
    n = len(labels)
    train, val = stratified_split(labels, val_size, seed=0)
    assert len(val) == val_size
    assert len(train) == n - val_size
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert list(val) == sorted(val) and list(train) == sorted(train)
    for c, count in zip(*np.unique(labels, return_counts=True)):
        quota = count * val_size / n
        got = int((labels[val] == c).sum())
        assert abs(got - quota) < 1, (c, got, quota)


def test_stratified_split_deterministic_per_seed():
    a_train, a_val = stratified_split(UNEQUAL, 20, seed=5)
    b_train, b_val = stratified_split(UNEQUAL, 20, seed=5)
    np.testing.assert_array_equal(a_val, b_val)
    np.testing.assert_array_equal(a_train, b_train)
    _, c_val = stratified_split(UNEQUAL, 20, seed=6)
    assert set(c_val.tolist()) != set(a_val.tolist())
    # the per-class counts do not depend on the seed, only which images
    np.testing.assert_array_equal(np.bincount(UNEQUAL[a_val], minlength=4), np.bincount(UNEQUAL[c_val], minlength=4))


def test_stratified_split_seed_zero_is_a_seed():
    _, v0 = stratified_split(UNEQUAL, 20, seed=0)
    _, v1 = stratified_split(UNEQUAL, 20, seed=1)
    assert set(v0.tolist()) != set(v1.tolist())


def test_stratified_split_val_size_zero():
    train, val = stratified_split(UNEQUAL, 0, seed=0)
    assert len(val) == 0
    assert train.tolist() == list(range(len(UNEQUAL)))


@pytest.mark.parametrize("val_size", [100, 101, 5000])
def test_stratified_split_val_size_too_large(val_size):
    with pytest.raises(DataError, match=rf"data\.val_size={val_size}.*100"):
        stratified_split(UNEQUAL, val_size, seed=0)


def test_stratified_subset_keeps_proportions():
    labels = UNEQUAL
    indices = np.arange(10, 100, dtype=np.int64)  # a subset of the pool, not starting at 0
    keep = stratified_subset(indices, labels, limit=30, seed=0)
    assert len(keep) == 30
    assert len(set(keep.tolist())) == 30
    assert set(keep.tolist()) <= set(indices.tolist())
    classes, counts = np.unique(labels[indices], return_counts=True)
    for c, count in zip(classes, counts):
        quota = count * 30 / len(indices)
        assert abs(int((labels[keep] == c).sum()) - quota) < 1
    np.testing.assert_array_equal(keep, stratified_subset(indices, labels, limit=30, seed=0))


def test_stratified_subset_no_limit_or_large_limit_returns_input():
    indices = np.arange(5, 60)
    assert stratified_subset(indices, UNEQUAL, None, seed=0) is indices
    np.testing.assert_array_equal(stratified_subset(indices, UNEQUAL, 1000, seed=0), indices)


# ---------------------------------------------------------------- CIFAR-10 (python pickle batches)

PER_BATCH = 20


def _write_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the original files are protocol-2 pickles


def write_cifar(root: Path, meta_key="label_names", meta_names=None, per_batch: int = PER_BATCH) -> dict:
    """Write root/cifar-10-batches-py in CIFAR-10's python format; return what was written."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int((b * per_batch + i) % 10) for i in range(per_batch)]
        _write_pickle(base / name, {b"batch_label": f"batch {b}".encode(), b"labels": labels, b"data": data,
                                    b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]})
        written[name] = (data, labels)
    names = meta_names if meta_names is not None else [n.encode() for n in CIFAR_NAMES]
    _write_pickle(base / "batches.meta", {meta_key: names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return written


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
            np.testing.assert_array_equal(tx[b * PER_BATCH:(b + 1) * PER_BATCH, c, r, k], flat[:, c * 1024 + r * 32 + k])
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
    assert calls == [data_mod.CIFAR10_URL]
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


# ---------------------------------------------------------------- image folders

CLASSES = ["ant", "bee", "cat"]  # written in another order below; the loader sorts them


def _png_image(rng, cls: int, size=(32, 32)) -> np.ndarray:
    """Random noise (H, W, 3) whose red channel lies in a band that identifies the class."""
    h, w = size
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img[..., 0] = rng.integers(cls * 90, cls * 90 + 60, size=(h, w), dtype=np.uint8)
    return img


def _jpg_image(cls: int, k: int) -> np.ndarray:
    """A constant colour (JPEG keeps these almost exactly): red in the class band."""
    return np.broadcast_to(np.array([cls * 90 + 30, 40 + 50 * k, 200 - 60 * k], np.uint8), (32, 32, 3)).copy()


def write_folder(split_dir: Path, rng, per_class_png=2, per_class_jpg=2) -> dict:
    """split_dir/<class>/{p*.png, j*.jpg}; returns {class: [(array HWC, is_png), ...]}."""
    written = {}
    for c in reversed(CLASSES):
        cls = CLASSES.index(c)
        d = split_dir / c
        d.mkdir(parents=True)
        written[c] = []
        for k in range(per_class_png):
            a = _png_image(rng, cls)
            Image.fromarray(a).save(d / f"p{k}.png")
            written[c].append((a, True))
        for k in range(per_class_jpg):
            a = _jpg_image(cls, k)
            Image.fromarray(a).save(d / f"j{k}.jpg", quality=95)
            written[c].append((a, False))
    return written


def _all_items(splits) -> list:
    return [splits.train[i] for i in range(len(splits.train))] + [splits.val[i] for i in range(len(splits.val))]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    written = write_folder(root / "train", np.random.default_rng(0))
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    return root, written


def _folder_cfg(make_cfg, root, *extra):
    return make_cfg(["data=imagefolder", f"data.root={root}", "data.val_size=3", "model.num_classes=3", *extra]).data


def test_imagefolder_classes_labels_pixels_and_warning(folder, make_cfg):
    root, written = folder
    warnings = []
    splits = build_splits(_folder_cfg(make_cfg, root), 0, num_classes=3, warn=warnings.append)
    assert splits.classes == CLASSES
    assert (len(splits.train), len(splits.val)) == (9, 3)
    assert splits.test is None
    np.testing.assert_array_equal(np.bincount(splits.val.targets(), minlength=3), [1, 1, 1])
    assert len(warnings) == 1 and "ignored 1 non-image file" in warnings[0]

    items = _all_items(splits)
    for img, label in items:
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32)
        red = img[0].float().mean().item()
        assert label * 90 <= red < label * 90 + 60, (label, red)  # the red band of its own class
    # every PNG comes back pixel-exact (as (3, H, W)) with its class's label
    for c, arrays in written.items():
        for a, is_png in arrays:
            if is_png:
                expected = torch.from_numpy(a).permute(2, 0, 1)
                assert any(torch.equal(img, expected) and lab == CLASSES.index(c) for img, lab in items)
    # JPEGs of a constant colour come back within a few levels
    for c, arrays in written.items():
        for a, is_png in arrays:
            if not is_png:
                expected = torch.from_numpy(a).permute(2, 0, 1).float()
                assert any((img.float() - expected).abs().max() <= 4 and lab == CLASSES.index(c) for img, lab in items)


def test_imagefolder_measures_mean_and_std(folder, make_cfg):
    root, written = folder
    splits = build_splits(_folder_cfg(make_cfg, root), 0, num_classes=3)
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))]).float() / 255
    assert splits.mean == pytest.approx(train.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert splits.std == pytest.approx(train.transpose(0, 1).reshape(3, -1).std(1).tolist(), abs=1e-5)
    # and that is (up to JPEG's few levels, and the 3 held-out images) the mean of what was written
    everything = np.stack([a for arrays in written.values() for a, _ in arrays]).astype(np.float64) / 255
    assert splits.mean == pytest.approx(everything.mean((0, 1, 2)).tolist(), abs=0.08)
    assert len(set(round(m, 3) for m in splits.mean)) == 3  # per channel, not one number


def test_imagefolder_yaml_mean_std_win(folder, make_cfg):
    root, _ = folder
    cfg = _folder_cfg(make_cfg, root, "data.mean=[0.1,0.2,0.3]", "data.std=[0.4,0.5,0.6]")
    splits = build_splits(cfg, 0, num_classes=3)
    assert splits.mean == pytest.approx((0.1, 0.2, 0.3)) and splits.std == pytest.approx((0.4, 0.5, 0.6))


def test_imagefolder_resizes_other_sizes(tmp_path, make_cfg):
    root = tmp_path / "imgs"
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True)
        # 40 wide x 48 high: blue with 4-pixel red bands left and right
        a = np.zeros((48, 40, 3), np.uint8)
        a[..., 2] = 255
        a[:, :4] = (255, 0, 0)
        a[:, -4:] = (255, 0, 0)
        Image.fromarray(a).save(root / "train" / c / "big.png")
        Image.fromarray(a).save(root / "train" / c / "big2.png")
    splits = build_splits(_folder_cfg(make_cfg, root), 0, num_classes=3)
    for img, _ in _all_items(splits):
        assert tuple(img.shape) == (3, 32, 32) and img.dtype == torch.uint8
        # resized (40 -> 32 wide, bands ~3 px) rather than only cropped (which would cut the bands off)
        assert img[:, 16, 0].tolist() == [255, 0, 0] and img[:, 16, 31].tolist() == [255, 0, 0]
        assert img[:, 16, 16].tolist() == [0, 0, 255]

    small = build_splits(_folder_cfg(make_cfg, root, "data.image_size=16"), 0, num_classes=3)
    assert tuple(small.train[0][0].shape) == (3, 16, 16)


def test_imagefolder_uses_test_split(folder, make_cfg):
    root, _ = folder
    test_written = write_folder(root / "test", np.random.default_rng(9), per_class_png=1, per_class_jpg=0)
    (root / "test" / "cat" / "labels.csv").write_text("x")
    warnings = []
    splits = build_splits(_folder_cfg(make_cfg, root), 0, num_classes=3, warn=warnings.append)
    assert len(warnings) == 1 and "ignored 2 non-image file" in warnings[0]  # train's notes.txt + test's csv
    assert splits.test is not None and len(splits.test) == 3
    assert (len(splits.train), len(splits.val)) == (9, 3)
    for i in range(3):
        img, label = splits.test[i]
        expected = torch.from_numpy(test_written[CLASSES[label]][0][0]).permute(2, 0, 1)
        assert torch.equal(img, expected)


def test_imagefolder_test_split_class_mismatch(folder, make_cfg):
    root, _ = folder
    (root / "test" / "ant").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "ant" / "x.png")
    with pytest.raises(DataError, match="differ"):
        build_splits(_folder_cfg(make_cfg, root), 0, num_classes=3)


def test_imagefolder_empty_class_folder(folder, make_cfg):
    root, _ = folder
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="no images") as e:
        build_splits(_folder_cfg(make_cfg, root), 0, num_classes=4)
    assert str(root / "train" / "dog") in str(e.value)


def test_imagefolder_missing_root(tmp_path, make_cfg):
    missing = tmp_path / "absent"
    with pytest.raises(DataError, match="not found") as e:
        build_splits(_folder_cfg(make_cfg, missing), 0, num_classes=3)
    assert str(missing) in str(e.value)


def test_imagefolder_missing_train_folder(tmp_path, make_cfg):
    (tmp_path / "imgs" / "ant").mkdir(parents=True)  # classes directly under root, no train/
    with pytest.raises(DataError) as e:
        build_splits(_folder_cfg(make_cfg, tmp_path / "imgs"), 0, num_classes=3)
    assert str(tmp_path / "imgs" / "train") in str(e.value)


def test_imagefolder_num_classes_mismatch(folder, make_cfg):
    root, _ = folder
    with pytest.raises(DataError) as e:
        build_splits(_folder_cfg(make_cfg, root), 0, num_classes=10)
    msg = str(e.value)
    assert "model.num_classes=3" in msg and "ant, bee, cat" in msg


def test_imagefolder_corrupt_image_names_file(folder, make_cfg):
    root, _ = folder
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG definitely not a png" + bytes(range(256)))
    splits = build_splits(_folder_cfg(make_cfg, root, "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"),
                          0, num_classes=3)
    good = 0
    with pytest.raises(DataError, match="cannot read image") as e:
        for ds in (splits.train, splits.val):
            for i in range(len(ds)):
                ds[i]
                good += 1
    assert str(bad) in str(e.value)
    assert good < 13


# ---------------------------------------------------------------- synthetic

def _class_means(x: torch.Tensor, y: np.ndarray, k: int) -> np.ndarray:
    f = x.float().mean((2, 3)).numpy()  # per-image mean colour, (N, 3), 0..255
    return np.stack([f[y == c].mean(0) for c in range(k)])


def test_synthetic_deterministic_and_seeded():
    x1, y1 = make_synthetic(200, 10, 16, seed=3, sample_seed=4)
    x2, y2 = make_synthetic(200, 10, 16, seed=3, sample_seed=4)
    assert x1.dtype == torch.uint8 and tuple(x1.shape) == (200, 3, 16, 16) and y1.dtype == np.int64
    assert torch.equal(x1, x2) and np.array_equal(y1, y2)
    x3, _ = make_synthetic(200, 10, 16, seed=5, sample_seed=4)
    assert not torch.equal(x1, x3)
    x4, y4 = make_synthetic(200, 10, 16, seed=3, sample_seed=6)
    assert not torch.equal(x1, x4) and not np.array_equal(y1, y4)


def test_synthetic_splits_share_class_prototypes():
    x, y = make_synthetic(400, 10, 16, seed=0, sample_seed=1)
    sx, sy = make_synthetic(200, 10, 16, seed=0, sample_seed=2)
    assert np.bincount(y, minlength=10).min() >= 35 and np.bincount(sy, minlength=10).min() >= 15
    diff = np.abs(_class_means(x, y, 10) - _class_means(sx, sy, 10))
    assert diff.max() < 0.05 * 255
    # another `seed` draws other prototypes
    ox, oy = make_synthetic(200, 10, 16, seed=1, sample_seed=2)
    assert np.abs(_class_means(x, y, 10) - _class_means(ox, oy, 10)).max() > 0.05 * 255


def test_synthetic_is_learnable_by_mean_colour():
    x, y = make_synthetic(500, 10, 16, seed=0, sample_seed=1)
    sx, sy = make_synthetic(300, 10, 16, seed=0, sample_seed=2)
    mu = _class_means(x, y, 10)
    f = sx.float().mean((2, 3)).numpy()
    pred = ((f[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    assert (pred == sy).mean() > 0.5


def test_synthetic_build_splits(make_cfg):
    cfg = make_cfg(["data=synthetic", "data.train_size=100", "data.test_size=40", "data.val_size=20",
                    "data.image_size=8"])
    splits = build_splits(cfg.data, 0, num_classes=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 40)
    assert splits.classes == [f"class{i}" for i in range(10)]
    assert tuple(splits.train[0][0].shape) == (3, 8, 8)
    assert all(0.0 < m < 1.0 for m in splits.mean) and all(0.0 < s < 0.5 for s in splits.std)
    with pytest.raises(DataError, match="model.num_classes=10"):
        build_splits(cfg.data, 0, num_classes=5)


# ---------------------------------------------------------------- loaders

def _order(loader) -> list:
    return [int(v) for _, yb in loader for v in yb]


def test_make_loader_train_order_reproducible_per_seed():
    labels = np.arange(64)  # label == index, so the batches show the order
    ds = ImageDataset(lambda i: torch.zeros(3, 2, 2, dtype=torch.uint8), labels, np.arange(64))
    a = _order(make_loader(ds, 8, train=True, num_workers=0, seed=0))
    b = _order(make_loader(ds, 8, train=True, num_workers=0, seed=0))
    c = _order(make_loader(ds, 8, train=True, num_workers=0, seed=1))
    assert sorted(a) == list(range(64))
    assert a == b
    assert a != c and a != list(range(64))
    # an evaluation loader keeps the dataset order
    assert _order(make_loader(ds, 8, train=False, num_workers=0, seed=0)) == list(range(64))
    # epochs differ from each other but the sequence of epochs is reproducible
    la, lb = make_loader(ds, 8, True, 0, seed=2), make_loader(ds, 8, True, 0, seed=2)
    ea, eb = [_order(la) for _ in range(2)], [_order(lb) for _ in range(2)]
    assert ea == eb and ea[0] != ea[1]


def test_training_loader_drops_a_last_batch_of_one():
    """BatchNorm cannot train on one sample (1x1 maps in layer4): such a remainder is dropped, others kept."""
    labels = np.zeros(9, dtype=np.int64)
    ds = ImageDataset(lambda i: torch.zeros(3, 2, 2, dtype=torch.uint8), labels, np.arange(9))
    assert [len(y) for _, y in make_loader(ds, 4, True, 0, 0)] == [4, 4]
    assert [len(y) for _, y in make_loader(ds, 4, False, 0, 0)] == [4, 4, 1]  # evaluation sees every image
    assert [len(y) for _, y in make_loader(ds, 5, True, 0, 0)] == [5, 4]
