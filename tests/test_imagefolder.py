"""Image folders on images the tests write (PNG and JPEG, classes, sizes, corrupt files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_train.data.datasets import DataError, build_splits

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
