"""The in-memory loader and the choice between it and torchvision's DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config

from cbam_train.augment.batched import normalize
from cbam_train.data.datasets import build_splits
from cbam_train.data.loaders import Batching, MemoryLoader, build_loaders, choose_loader

SYN = ["data=synthetic", "data.image_size=8", "data.train_size=100", "data.val_size=20", "data.test_size=10"]


def identity(x, _g):
    return x


def test_memory_loader_visits_every_image_once_per_epoch_in_a_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.arange(10)
    def epochs(seed):
        loader = MemoryLoader(images, labels, Batching(4, True), identity, torch.Generator().manual_seed(seed))
        assert len(loader) == 3
        out = []
        for _ in range(2):
            batches = list(loader)
            assert [y.shape[0] for _, y in batches] == [4, 4, 2]
            for x, y in batches:
                assert torch.equal(x[:, 0, 0, 0].long(), y)  # each image stays with its label
            out.append(torch.cat([y for _, y in batches]))
        return out
    e1, e2 = epochs(0)
    assert sorted(e1.tolist()) == list(range(10)) and sorted(e2.tolist()) == list(range(10))
    assert not torch.equal(e1, e2)  # a new order each epoch
    assert all(torch.equal(a, b) for a, b in zip(epochs(0), [e1, e2], strict=False))  # reproducible
    assert not torch.equal(epochs(1)[0], e1)


def test_training_memory_loader_drops_a_last_batch_of_one():
    images, labels = torch.zeros(9, 3, 2, 2, dtype=torch.uint8), torch.arange(9)
    train = MemoryLoader(images, labels, Batching(4, True), identity, torch.Generator())
    assert len(train) == 2 and [y.shape[0] for _, y in train] == [4, 4]
    evaluation = MemoryLoader(images, labels, Batching(4, False), identity, torch.Generator())
    assert len(evaluation) == 3 and [y.shape[0] for _, y in evaluation] == [4, 4, 1]


def test_unshuffled_memory_loader_keeps_dataset_order():
    labels = torch.arange(7)
    loader = MemoryLoader(torch.zeros(7, 3, 2, 2, dtype=torch.uint8), labels, Batching(3, False), identity,
                          torch.Generator())
    assert torch.cat([y for _, y in loader]).tolist() == list(range(7))


def test_auto_picks_memory_within_the_budget_and_torchvision_beyond():
    splits = build_splits(compose_config(SYN).data, 0, 10)
    assert sum(ds.nbytes() for ds in (splits.train, splits.val, splits.test)) == 110 * 3 * 8 * 8
    assert choose_loader(splits, "auto", 1) == "memory"  # 21,120 bytes fit 1 MiB
    assert choose_loader(splits, "auto", 0) == "torchvision"
    assert choose_loader(splits, "torchvision", 10**6) == "torchvision"
    assert choose_loader(splits, "memory", 0) == "memory"


@pytest.mark.parametrize("kind", ["memory", "torchvision"])
def test_both_loaders_give_the_same_evaluation_batches(kind):
    cfg = compose_config(SYN + [f"data.loader={kind}", "data.num_workers=0"])
    splits = build_splits(cfg.data, 0, 10)
    loaders = build_loaders(splits, cfg.data, cfg.augment, torch.device("cpu"), 0, 0)
    assert loaders.kind == kind
    assert (loaders.augment is not None) == (kind == "memory")
    x = torch.cat([b[0] for b in loaders.val])
    y = torch.cat([b[1] for b in loaders.val])
    images, labels = splits.val.materialize()
    assert torch.equal(y, labels)
    assert torch.allclose(x, normalize(images, splits.mean, splits.std), atol=1e-6)
    train_x, _ = next(iter(loaders.train))
    assert train_x.dtype == torch.float32 and train_x.shape[1:] == (3, 8, 8)
    # without augmentation both training loaders yield exactly the training split, normalised
    cfg = compose_config(SYN + [f"data.loader={kind}", "data.num_workers=0", "augment=none"])
    plain = build_loaders(build_splits(cfg.data, 0, 10), cfg.data, cfg.augment, torch.device("cpu"), 0, 0)
    got = sorted(tuple(v.flatten().tolist()) for b in plain.train for v in b[0])
    images, _ = splits.train.materialize()
    want = sorted(tuple(v.flatten().tolist()) for v in normalize(images, splits.mean, splits.std))
    assert len(got) == len(want) and all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
                                         for a, b in zip(got, want, strict=False))
    assert len(loaders.test) == 1


def test_materialize_matches_per_image_loading():
    splits = build_splits(compose_config(SYN).data, 0, 10)
    images, labels = splits.train.materialize()
    assert images.shape == (80, 3, 8, 8) and images.dtype == torch.uint8
    for k in (0, 17, 79):
        img, label = splits.train[k]
        assert torch.equal(images[k], img) and labels[k].item() == label
    assert np.array_equal(labels.numpy(), splits.train.targets())


def write_folder(root, n_per_class=4, size=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")


def test_imagefolder_decode_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
    import cbam_train.data.imagefolder as imf

    write_folder(tmp_path)
    cfg = compose_config(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=8", "data.val_size=0",
                          "model.num_classes=2"]).data
    first, _ = build_splits(cfg, 0, 2).train.materialize()
    (cache,) = (tmp_path / ".cbam-cache").glob("train-8px-*.pt")

    def no_decoding(self, i):
        pytest.fail("decoded an image although the cache is valid")

    monkeypatch.setattr(imf.ImageFiles, "__call__", no_decoding)
    cfg_cached = compose_config(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=8",
                                 "data.val_size=0", "model.num_classes=2", "data.mean=[0.5,0.5,0.5]",
                                 "data.std=[0.2,0.2,0.2]"]).data
    again, _ = build_splits(cfg_cached, 0, 2).train.materialize()
    assert torch.equal(first, again)
    monkeypatch.undo()
    # a changed file changes the key: the old cache is not used
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    changed, _ = build_splits(cfg, 0, 2).train.materialize()
    assert changed[0].sum() == 0 and not torch.equal(changed, first)
    assert len(list((tmp_path / ".cbam-cache").glob("train-8px-*.pt"))) == 2
    assert cache.exists()


def test_datasets_pickle_for_spawned_workers_without_the_decoded_split(tmp_path):
    import pickle

    write_folder(tmp_path)
    (tmp_path / "train" / "a" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "a" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"hidden, not an image")
    cfg = compose_config(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=8", "data.val_size=0",
                          "model.num_classes=2"]).data
    splits = build_splits(cfg, 0, 2)
    assert len(splits.train) == 8  # the hidden folder's file is not a sample
    splits.train.materialize()  # decodes and keeps the whole split in memory
    clone = pickle.loads(pickle.dumps(splits.train))
    assert clone.load._all is None and len(pickle.dumps(splits.train)) < 10_000
    assert torch.equal(clone[3][0], splits.train[3][0])
    syn = build_splits(compose_config(SYN).data, 0, 10)
    assert torch.equal(pickle.loads(pickle.dumps(syn.val))[0][0], syn.val[0][0])


def test_memory_loader_augments_in_chunks_of_whole_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    calls = []

    def recording(x, _g):
        calls.append(x.shape[0])
        return x

    loader = MemoryLoader(images, torch.arange(10), Batching(4, True, chunk=9), recording,
                          torch.Generator().manual_seed(0))
    batches = list(loader)
    assert calls == [8, 2]  # chunk 9 rounds down to two batches of 4; the rest is the last chunk
    assert [y.shape[0] for _, y in batches] == [4, 4, 2] and len(loader) == 3
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
