"""Weights in and out: atomic saves, weights-only loads, matching and strict loading."""

import os
import pickle
import stat

import pytest
import torch
import torchvision
from conftest import assert_same_state

import cbam_train.state.weights as ck
from cbam_train.config.errors import UserError, WeightsError
from cbam_train.models.resnet import ResNetCBAM
from cbam_train.state.weights import atomic_save, load_matching, load_state_dict_file, load_strict

TV_FILE = "resnet18-f37072fd.pth"


def small_state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "bn.num_batches_tracked": torch.tensor(7)}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# --- atomic_save ------------------------------------------------------------------------------

def test_atomic_save_round_trips(tmp_path):
    state = small_state()
    path = tmp_path / "sub" / "model.pt"  # parent folder is created
    atomic_save(state, path)
    assert_same_state(load_state_dict_file(path), state)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_save_permissions_follow_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "model.pt"
    atomic_save(small_state(), path)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert os.umask(mask) == mask  # atomic_save restored the process umask


def test_atomic_save_overwrites_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"x": torch.zeros(2)}, path)
    atomic_save({"x": torch.ones(2)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert torch.equal(load_state_dict_file(path)["x"], torch.ones(2))


def test_failed_save_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"x": torch.ones(5)}, path)
    before = path.read_bytes()
    written = []

    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        written.append(f)
        raise OSError("No space left on device")

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"x": torch.zeros(5)}, path)
    assert written, "the failing torch.save was not used"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *a, **k):
        f.write(b"junk")
        raise OSError("No space left on device")

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(5)}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


# --- load_state_dict_file ---------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict"])
def test_load_accepts_plain_and_checkpoint_dicts(tmp_path, wrap):
    state = small_state()
    obj = state if wrap == "plain" else {wrap: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "w.pt")
    assert_same_state(load_state_dict_file(tmp_path / "w.pt"), state)


def test_read_weights_tells_a_cbam_train_checkpoint_apart(tmp_path):
    from cbam_train.state.weights import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, read_weights

    state = small_state()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": state, "epoch": 4},
               tmp_path / "ck.pt")
    got, meta = read_weights(tmp_path / "ck.pt")
    assert_same_state(got, state)
    assert meta["epoch"] == 4 and "model" not in meta
    torch.save(state, tmp_path / "plain.pt")
    assert read_weights(tmp_path / "plain.pt")[1] is None
    with pytest.raises(WeightsError, match="not a cbam-train checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1, "model": state}, tmp_path / "new.pt")
    with pytest.raises(WeightsError, match="upgrade cbam-train"):
        load_checkpoint(tmp_path / "new.pt")


def test_checkpoint_of_an_older_format_version_is_refused_in_one_line(tmp_path):
    from cbam_train.state.weights import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint

    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION - 1, "model": small_state()},
               tmp_path / "old.pt")
    with pytest.raises(WeightsError, match=f"version {CHECKPOINT_VERSION - 1}, older") as e:
        load_checkpoint(tmp_path / "old.pt", "resume=old.pt")
    assert "init_from=" in str(e.value) and "\n" not in str(e.value)


def test_background_saver_writes_a_snapshot_and_reports_failures(tmp_path, monkeypatch):
    from cbam_train.config.errors import CheckpointError
    from cbam_train.training import checkpointer
    from cbam_train.training.checkpointer import BackgroundSaver

    t = torch.zeros(3)
    saver = BackgroundSaver()
    saver.save({"w": t}, tmp_path, ["last.pt", "best.pt"], "hint")
    t += 1  # training goes on changing the tensor: the file must hold the value at save time
    saver.wait()
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["w"], torch.zeros(3))
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt") or \
        (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()

    def fail(*a, **k):
        raise CheckpointError("disk full")

    monkeypatch.setattr(checkpointer, "save_checkpoint", fail)
    saver.save({"w": t}, tmp_path, ["last.pt"], "hint")
    with pytest.raises(CheckpointError, match="disk full"):
        saver.wait()
    saver.wait()  # reported once


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_strips_wrapper_prefixes(tmp_path, prefix):
    state = small_state()
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "w.pt")
    assert_same_state(load_state_dict_file(tmp_path / "w.pt"), state)


def test_load_strips_compile_then_ddp_prefix(tmp_path):
    state = small_state()
    torch.save({"_orig_mod.module." + k: v for k, v in state.items()}, tmp_path / "w.pt")
    assert list(load_state_dict_file(tmp_path / "w.pt")) == list(state)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsError) as e:
        load_state_dict_file(path, "model.weights")
    assert str(path) in str(e.value) and "model.weights" in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("content", [bytes(100), b"\x89PNG\r\n\x1a\n" + bytes(50), b'{"a": 1}\n', b""],
                         ids=["zeros", "png", "json", "empty"])
def test_garbage_file_is_refused(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file") as e:
        load_state_dict_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"hello world not a pickle", b"a,b\n1,2\n"], ids=["text", "csv"])
def test_text_file_is_refused(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError):
        load_state_dict_file(path)


def test_truncated_file_is_refused(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(small_state(), full)
    data = full.read_bytes()
    path = tmp_path / "w.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        load_state_dict_file(path)


def test_non_state_dict_is_refused(tmp_path):
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "w.pt")


class Hostile:
    """Unpickling this creates a file: what a malicious weights file would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("saver", ["pickle", "torch.save"])
def test_hostile_pickle_is_refused_and_does_not_run(tmp_path, saver):
    target = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    obj = {"fc.weight": torch.zeros(1), "payload": Hostile(target)}
    if saver == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path)
    assert not target.exists()
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        load_state_dict_file(path)
    assert not target.exists()


# --- load_matching / load_strict --------------------------------------------------------------

def test_load_matching_torchvision_into_cifar_model(tv_state):
    model = ResNetCBAM(num_classes=10, stem="cifar")
    report = load_matching(model, tv_state)
    assert sorted(m.split(" ")[0] for m in report.mismatched) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert report.new_modules == ["conv1", "fc", "cbam"]
    assert report.unexpected == []
    assert set(report.loaded) == set(tv_state) - {"conv1.weight", "fc.weight", "fc.bias"}
    own = model.state_dict()
    for k, v in tv_state.items():
        if k.split(".")[0] in ("bn1", "layer1", "layer2", "layer3", "layer4"):
            assert torch.equal(own[k], v), k
    assert own["conv1.weight"].shape == (64, 3, 3, 3)


def test_load_matching_leaves_new_modules_at_init(tv_state):
    torch.manual_seed(0)
    model = ResNetCBAM(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1.", "fc.", "cbam."))}
    load_matching(model, tv_state)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_load_matching_imagenet_stem_only_cbam_is_new(tv_state):
    model = ResNetCBAM(num_classes=1000, stem="imagenet")
    report = load_matching(model, tv_state)
    assert report.new_modules == ["cbam"]
    assert report.mismatched == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(tv_state)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in tv_state.items())


def test_load_matching_block_placement_groups_cbam(tv_state):
    report = load_matching(ResNetCBAM(num_classes=1000, stem="imagenet", placement="block"), tv_state)
    assert report.new_modules == ["cbam"]


def test_load_matching_reports_unexpected_keys(tv_state):
    report = load_matching(ResNetCBAM(), {**tv_state, "extra.weight": torch.zeros(1)})
    assert report.unexpected == ["extra.weight"]


def test_load_strict_own_state_dict():
    torch.manual_seed(0)
    src, dst = ResNetCBAM(), ResNetCBAM()
    with torch.no_grad():
        for p in src.cbam.parameters():
            p.normal_()
    load_strict(dst, src.state_dict(), "init_from=x")
    assert_same_state(dst.state_dict(), src.state_dict())


def test_load_strict_wrong_num_classes_names_fc():
    torch.manual_seed(0)
    dst = ResNetCBAM(num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_strict(dst, ResNetCBAM(num_classes=5).state_dict(), "init_from=stage1.pt")
    msg = str(e.value)
    assert "fc.weight" in msg and "init_from=stage1.pt" in msg and "(5, 512) vs (10, 512)" in msg
    assert_same_state(dst.state_dict(), before)  # nothing loaded on failure


def test_load_strict_missing_keys_named():
    model = ResNetCBAM()
    state = model.state_dict()
    state.pop("layer2.1.bn2.running_var")
    state.pop("cbam.layer3.spatial.conv.bias")
    with pytest.raises(WeightsError) as e:
        load_strict(model, state, "init_from=x.pt")
    msg = str(e.value)
    assert "missing" in msg and "layer2.1.bn2.running_var" in msg and "cbam.layer3.spatial.conv.bias" in msg


def test_load_strict_unexpected_keys_named():
    model = ResNetCBAM(cbam_enabled=False)
    with pytest.raises(WeightsError, match=r"unexpected: cbam\.layer1"):
        load_strict(model, ResNetCBAM().state_dict(), "init_from=x.pt")


def test_files_without_num_batches_tracked_do_not_count_layers_as_new():
    """Older ResNet files (e.g. resnet18-5c106cde.pth) have no num_batches_tracked buffers."""
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    report = load_matching(ResNetCBAM(num_classes=10, stem="cifar"), state)
    assert sorted(report.new_modules) == ["cbam", "conv1", "fc"]
