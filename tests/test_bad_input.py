"""Bad input the CLI reads, through its entry point (cli.main, in this process): data folders, CIFAR-10 batches,
checkpoints, weights files, resumes and run dirs. Every case exits non-zero with one 'error:' line that says what
is wrong (the file, the key, or what to do), no traceback, and leaves the files it was given untouched. Config
values, the override grammar and flags: test_bad_config.py; the same contract in a real process: test_cli.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import ONE_EPOCH_PER_STAGE, Case, argv, check_case, fake_run_dir, folder_args, hostile_file, write_images
from conftest import call_cli, write_cifar
from PIL import Image


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny trained run (3 stages x 1 epoch, synthetic 8x8): its model.pt and .hydra are the cases' input."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = call_cli(argv(ONE_EPOCH_PER_STAGE, f"hydra.run.dir={tmp / 'run'}"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "run" / "model.pt").is_file()
    return tmp / "run"


# ---------------------------------------------------------------- the cases: (tmp_path, trained) -> Case
# `trained()` trains the shared run on first use, so `-k` on one case stays quick.

def unused_weights_file_missing(tmp, trained):  # init_from supplies every tensor, model.weights is not read
    return Case(argv(None, f"model.weights={tmp / 'gone.pt'}", f"init_from={trained() / 'model.pt'}"),
                ("model.weights: file not found", str(tmp / "gone.pt")), watch=(trained() / "model.pt",))


def missing_data_root(tmp, trained):
    return Case(folder_args(tmp / "absent"), (str(tmp / "absent"), "not found"))


def empty_dataset(tmp, trained):
    (tmp / "imgs" / "train").mkdir(parents=True)
    (tmp / "imgs" / "train" / "README").write_text("no class folders here\n")
    return Case(folder_args(tmp / "imgs"), (str(tmp / "imgs" / "train"), "no class folders"), watch=(tmp / "imgs",))


def class_folder_without_images(tmp, trained):
    write_images(tmp / "imgs" / "train")
    (tmp / "imgs" / "train" / "dog").mkdir()
    (tmp / "imgs" / "train" / "dog" / "notes.md").write_text("no images yet\n")
    return Case(folder_args(tmp / "imgs", {"model.num_classes": 4}),
                (str(tmp / "imgs" / "train" / "dog"), "no images"), watch=(tmp / "imgs",))


def corrupt_image(tmp, trained):
    write_images(tmp / "imgs" / "train")
    bad = tmp / "imgs" / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return Case(folder_args(tmp / "imgs"), (str(bad), "data.bad_images=skip"), watch=(tmp / "imgs",))


def corrupt_image_skipped(tmp, trained):
    write_images(tmp / "imgs" / "train")
    bad = tmp / "imgs" / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return Case(folder_args(tmp / "imgs", {"data.bad_images": "skip", **ONE_EPOCH_PER_STAGE}),
                ("left out 1 unreadable image", str(bad)), code=0, watch=(tmp / "imgs",))


def truncated_image(tmp, trained):
    write_images(tmp / "imgs" / "train")
    cut = tmp / "imgs" / "train" / "cat" / "big.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return Case(folder_args(tmp / "imgs"), (str(cut), "truncated"), watch=(tmp / "imgs",))


def non_image_files(tmp, trained):
    write_images(tmp / "imgs" / "train")
    (tmp / "imgs" / "train" / "ant" / "labels.txt").write_text("not an image\n")
    return Case(folder_args(tmp / "imgs", ONE_EPOCH_PER_STAGE), ("ignored 1 non-image file",), code=0,
                watch=(tmp / "imgs",))


def single_class_folder(tmp, trained):
    (tmp / "imgs" / "train" / "ant").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 30 * k, dtype=np.uint8)).save(tmp / "imgs" / "train" / "ant" / f"{k}.png")
    return Case(folder_args(tmp / "imgs", {"model.num_classes": 2}),
                (str(tmp / "imgs" / "train"), "one class folder (ant)", "at least 2 classes"), watch=(tmp / "imgs",))


def class_count_mismatch(tmp, trained):
    write_images(tmp / "imgs" / "train")
    return Case(folder_args(tmp / "imgs", {"model.num_classes": 10}), ("3 classes", "model.num_classes=3"),
                watch=(tmp / "imgs",))


def cifar_batch_missing(tmp, trained):
    write_cifar(tmp / "cifar")
    base = tmp / "cifar" / "cifar-10-batches-py"
    (base / "data_batch_3").unlink()
    return Case(argv({"data": "cifar10", "data.root": tmp / "cifar", "data.download": "false",
                      "data.image_size": 32}), (str(base / "data_batch_3"), "missing"), watch=(tmp / "cifar",))


def cifar_batch_corrupt(tmp, trained):
    write_cifar(tmp / "cifar")
    base = tmp / "cifar" / "cifar-10-batches-py"
    (base / "data_batch_1").write_bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return Case(argv({"data": "cifar10", "data.root": tmp / "cifar", "data.download": "false",
                      "data.image_size": 32}), (str(base / "data_batch_1"), "not a valid CIFAR-10 batch"),
                watch=(tmp / "cifar",))


def checkpoint_missing(tmp, trained):
    return Case(argv(None, "task=eval", f"checkpoint={tmp / 'nope' / 'model.pt'}"),
                ("checkpoint=", str(tmp / "nope" / "model.pt")))


def checkpoint_truncated(tmp, trained):
    # inside a run dir (its .hydra copied), so eval gets as far as reading the weights itself
    run = tmp / "damaged"
    shutil.copytree(trained() / ".hydra", run / ".hydra")
    data = (trained() / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])
    return Case(argv(None, "task=eval", f"checkpoint={run / 'model.pt'}"),
                ("checkpoint=", str(run / "model.pt"), "not a readable"), watch=(run,))


def checkpoint_garbage(tmp, trained):
    path = tmp / "garbage.pt"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return Case(argv(None, "task=eval", f"checkpoint={path}"), ("checkpoint=", str(path), "not a readable"),
                watch=(path,))


def checkpoint_torchvision_resnet(tmp, trained):
    import torchvision

    path = tmp / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # 7x7 conv1, 1000-way fc, no CBAM
    return Case(argv({"model.width": 64}, "task=eval", f"checkpoint={path}"),  # the architecture, not the width
                ("checkpoint=", "fc.weight", "conv1.weight"), watch=(path,))


def checkpoint_other_num_classes(tmp, trained):
    run = trained()
    return Case(argv(None, "task=eval", f"checkpoint={run / 'model.pt'}", "model.num_classes=5"),
                ("fc.weight (10, 64) vs (5, 64)",), watch=(run,))


def checkpoint_hostile_pickle(tmp, trained):
    marker = tmp / "pwned.txt"
    path = hostile_file(tmp / "evil.pt", marker, tmp / "proof.txt")
    return Case(argv(None, "task=eval", f"checkpoint={path}"), ("checkpoint=", str(path)), watch=(path,),
                marker=marker)


def checkpoint_hostile_pickle_in_run_dir(tmp, trained):
    marker = tmp / "pwned.txt"
    run = fake_run_dir(tmp / "evil_run", argv())
    path = hostile_file(run / "model.pt", marker, tmp / "proof.txt")
    return Case(argv(None, "task=eval", f"checkpoint={path}"), ("checkpoint=", str(path)), watch=(run,), marker=marker)


def weights_wrong_shape(tmp, trained):
    path = tmp / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)  # an ImageNet stem: nothing fits the CIFAR one
    return Case(argv(None, f"model.weights={path}"), ("model.weights", str(path), "conv1.weight"), watch=(path,))


def weights_of_another_width(tmp, trained):
    import torchvision

    path = tmp / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # 64 wide, the shape of ImageNet's and the post's
    return Case(argv(None, f"model.weights={path}"), ("model.weights", str(path), "model.width=64", "model.width=8"),
                watch=(path,))


def init_from_other_width(tmp, trained):
    path = trained() / "model.pt"  # model.width=8
    return Case(argv({"model.width": 16}, f"init_from={path}"),
                ("init_from", "model.width=8 network", "model.width=16", "set model.width=8"), watch=(path,))


def init_from_wrong_fc(tmp, trained):
    state = torch.load(trained() / "model.pt", weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(5, 64), torch.zeros(5)  # model.width=8: 64 features
    path = tmp / "five_classes.pt"
    torch.save(state, path)
    return Case(argv(None, f"init_from={path}"), ("init_from", "fc.weight (5, 64) vs (10, 64)"), watch=(path,))


def resume_missing(tmp, trained):
    return Case(argv(None, f"resume={tmp / 'gone'}"), ("resume=", str(tmp / "gone"), "no such run dir"))


def resume_not_a_run_dir(tmp, trained):
    (tmp / "stuff").mkdir()
    (tmp / "stuff" / "notes.txt").write_text("not a run\n")
    return Case(argv(None, f"resume={tmp / 'stuff'}", f"hydra.run.dir={tmp / 'stuff'}"),
                ("not a cbam-train run dir", str(tmp / "stuff")), watch=(tmp / "stuff",))


def output_dir_not_writable(tmp, trained):
    ro = tmp / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):
        os.chmod(ro, 0o700)
        pytest.skip("running as root: a 0o500 folder is still writable")
    return Case(argv(None, f"hydra.run.dir={ro / 'run'}"), ("hydra.run.dir", str(ro / "run")), watch=(ro,))


def output_dir_under_a_file(tmp, trained):
    (tmp / "afile").write_text("a file, not a folder\n")  # the run dir cannot be created, even by root
    return Case(argv(None, f"hydra.run.dir={tmp / 'afile' / 'run'}"), ("hydra.run.dir", str(tmp / "afile" / "run")),
                watch=(tmp / "afile",))


CASES = [
    pytest.param(weights_of_another_width, id="model_weights_other_width"),
    pytest.param(missing_data_root, id="data_root_missing"),
    pytest.param(unused_weights_file_missing, id="model_weights_missing_under_init_from"),
    pytest.param(empty_dataset, id="imagefolder_no_class_folders"),
    pytest.param(class_folder_without_images, id="imagefolder_class_without_images"),
    pytest.param(corrupt_image, id="imagefolder_corrupt_image"),
    pytest.param(corrupt_image_skipped, id="imagefolder_corrupt_image_skipped"),
    pytest.param(truncated_image, id="imagefolder_truncated_image"),
    pytest.param(non_image_files, id="imagefolder_non_image_file_warns"),
    pytest.param(class_count_mismatch, id="imagefolder_num_classes_mismatch"),
    pytest.param(single_class_folder, id="imagefolder_single_class"),
    pytest.param(cifar_batch_missing, id="cifar10_batch_missing"),
    pytest.param(cifar_batch_corrupt, id="cifar10_batch_corrupt"),
    pytest.param(checkpoint_missing, id="checkpoint_missing"),
    pytest.param(checkpoint_truncated, id="checkpoint_truncated"),
    pytest.param(checkpoint_garbage, id="checkpoint_garbage"),
    pytest.param(checkpoint_torchvision_resnet, id="checkpoint_wrong_architecture"),
    pytest.param(checkpoint_other_num_classes, id="checkpoint_wrong_num_classes"),
    pytest.param(checkpoint_hostile_pickle, id="checkpoint_hostile_pickle"),
    pytest.param(checkpoint_hostile_pickle_in_run_dir, id="checkpoint_hostile_pickle_in_run_dir"),
    pytest.param(weights_wrong_shape, id="model_weights_wrong_shape"),
    pytest.param(init_from_wrong_fc, id="init_from_wrong_fc_shape"),
    pytest.param(init_from_other_width, id="init_from_other_width"),
    pytest.param(resume_missing, id="resume_missing"),
    pytest.param(resume_not_a_run_dir, id="resume_not_a_run_dir"),
    pytest.param(output_dir_not_writable, id="output_dir_not_writable"),
    pytest.param(output_dir_under_a_file, id="output_dir_under_a_file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make", CASES)
def test_bad_input_is_one_line_and_touches_nothing(make, tmp_path, request):
    work = tmp_path / "work"
    work.mkdir()
    check_case(make(work, lambda: request.getfixturevalue("trained_run")), tmp_path)
