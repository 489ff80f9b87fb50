"""Bad input through the CLI's entry point (cli.main, in this process): every case exits non-zero with one
'error:' line that says what is wrong (the key, the file, or what to do), no traceback, and leaves the files it
was given untouched. test_cli.py checks the same contract in a real process."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PICTURES_OFF, call_cli, write_cifar

# tiny settings: a failing call spends its ~2-4 s on start-up, not on data
BASE = {"experiment": "smoke", "model.width": 8, "data.image_size": 8, "data.train_size": 64, "data.val_size": 16,
        "data.test_size": 16, "data.batch_size": 16, "log.mode": "plain",
        **dict(o.split("=") for o in PICTURES_OFF)}
ONE_EPOCH_PER_STAGE = {"schedule.stages.head.epochs": 1, "schedule.stages.high.epochs": 1,
                       "schedule.stages.full.epochs": 1, "train.checkpoint_every_n_epochs": 0}
CLASSES = ("ant", "bee", "cat")


def argv(changes: Optional[dict] = None, *extra: str) -> list:
    """BASE with `changes` applied (a value of None drops the key), as key=value overrides, then `extra`."""
    merged = {**BASE, **(changes or {})}
    return [f"{k}={v}" for k, v in merged.items() if v is not None] + list(extra)


def folder_args(root: Path, changes: Optional[dict] = None, *extra: str) -> list:
    """Overrides for a tiny 3-class image folder at root (12 images of 8x8)."""
    return argv({"data": "imagefolder", "data.root": root, "model.num_classes": 3, "data.val_size": 3,
                 "data.batch_size": 4, **(changes or {})}, *extra)


def write_images(split_dir: Path, per_class: int = 4, size: int = 8) -> list:
    """split_dir/<class>/img<k>.png: noise whose red channel lies in a band per class; returns the paths."""
    rng = np.random.default_rng(0)
    paths = []
    for c, name in enumerate(CLASSES):
        (split_dir / name).mkdir(parents=True)
        for k in range(per_class):
            a = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            a[..., 0] = rng.integers(c * 90, c * 90 + 60, size=(size, size), dtype=np.uint8)
            Image.fromarray(a).save(split_dir / name / f"img{k}.png")
            paths.append(split_dir / name / f"img{k}.png")
    return paths


def fake_run_dir(folder: Path, overrides: list) -> Path:
    """A folder that looks like a run dir to the CLI (.hydra/overrides.yaml), so eval takes its config."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


class _Hostile:
    """Unpickling this calls open(path, 'w'): it creates a file (a stand-in for running arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_file(path: Path, marker: Path, proof: Path) -> Path:
    """torch.save a hostile object to path; first prove that loading such a file the trusting way runs it."""
    torch.save(_Hostile(str(proof)), path.with_name("proof.pt"))
    torch.load(path.with_name("proof.pt"), weights_only=False).close()
    assert proof.exists()
    path.with_name("proof.pt").unlink()
    torch.save({"model": _Hostile(str(marker))}, path)
    return path


def snapshot(paths) -> dict:
    """{path: (sha1, mtime_ns)} of every file at or under paths (folders: None), to prove nothing changed."""
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else [p, *sorted(p.rglob("*"))] if p.is_dir() else []):
            out[str(f)] = (hashlib.sha1(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) if f.is_file() else None
    return out


@dataclass
class Case:
    args: list
    phrases: tuple  # each must appear in the one error line (the warning line when code == 0)
    code: int = 2
    watch: tuple = ()  # files / folders given to the CLI: must come out byte-identical (and nothing added)
    marker: Optional[Path] = None  # a file the CLI must not create


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny trained run (3 stages x 1 epoch, synthetic 8x8): its model.pt and .hydra are the cases' input."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = call_cli(argv(ONE_EPOCH_PER_STAGE, f"hydra.run.dir={tmp / 'run'}"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "run" / "model.pt").is_file()
    return tmp / "run"


# ---------------------------------------------------------------- the cases: (tmp_path, trained) -> Case
# `trained()` trains the shared run on first use, so `-k` on a config case stays quick.

Maker = Callable[[Path, Callable[[], Path]], Case]


def config_case(override: str, *phrases: str) -> Maker:
    return lambda tmp, trained: Case(argv(None, override), phrases)


def overrides_case(changes: Optional[dict], *phrases: str, flags: tuple = ()) -> Maker:
    """Overrides (BASE with `changes`) after command-line flags, where argparse takes them."""
    return lambda tmp, trained: Case([*flags, *argv(changes)], phrases)


# -- keys of a feature that is off: checked all the same (issue 27, class 1)

def num_classes_for_other_data(tmp, trained):  # data.num_classes is read by data=synthetic only
    return Case(argv({"data": "imagefolder", "data.root": tmp / "imgs", "data.num_classes": 1}),
                ("data.num_classes must be >= 2",))


def unused_weights_file_missing(tmp, trained):  # init_from supplies every tensor, model.weights is not read
    return Case(argv(None, f"model.weights={tmp / 'gone.pt'}", f"init_from={trained() / 'model.pt'}"),
                ("model.weights: file not found", str(tmp / "gone.pt")), watch=(trained() / "model.pt",))


# -- values Hydra's override grammar refuses unquoted: the hint quotes the user's own value (class 2)

def path_outside_ascii(tmp, trained):
    path = tmp / "Bilder-Übersicht"
    return Case(argv({"data": "imagefolder", "data.root": path}),
                ("LexerNoViableAltException", "must be quoted", f"""'data.root="{path}"'"""))


def path_with_a_bracket(tmp, trained):
    path = tmp / "runs(old)"
    return Case(argv({"data": "imagefolder", "data.root": path}), ("must be quoted", f"""'data.root="{path}"'"""))


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


def unquoted_path_with_a_space(tmp, trained):
    write_images(tmp / "my data" / "train")
    # the shell splits `data.root=/x/my data` into two arguments: Hydra sees the override 'data'
    return Case(folder_args(tmp / "unused", {"data.root": None}, f"data.root={tmp / 'my'}", "data"),
                ("Error parsing override 'data'", f"""'data.root="{tmp / 'my'} data"'"""),
                watch=(tmp / "my data",))


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
    pytest.param(config_case("data=nosuch", "data/nosuch", "synthetic"), id="unknown_group_option"),
    pytest.param(config_case("data.nosuch=1", "data.nosuch"), id="unknown_key"),
    pytest.param(config_case("data.batch_size=abc", "data.batch_size", "'abc'"), id="wrong_type"),
    pytest.param(config_case("lr=0", "lr must be > 0"), id="lr_zero"),
    pytest.param(config_case("schedule.stages.head.epochs=0", "schedule.stages.head.epochs must be >= 1"),
                 id="epochs_zero"),
    pytest.param(config_case("stage=7", "stage=7", "out of range"), id="stage_out_of_range"),
    pytest.param(config_case("stage=nosuch", "stage=nosuch", "unknown stage"), id="stage_unknown_name"),
    pytest.param(config_case("schedule.stages.head.trainable=[layer5]", "schedule.stages.head.trainable",
                             "'layer5'"), id="trainable_unknown_module"),
    pytest.param(config_case("model.width=0", "model.width must be in [1, 1024]"), id="width_zero"),
    pytest.param(config_case("model.pretrained=true", "model.pretrained=true needs model.width=64",
                             "model.pretrained=false"), id="pretrained_narrow"),
    pytest.param(weights_of_another_width, id="model_weights_other_width"),
    pytest.param(missing_data_root, id="data_root_missing"),
    # a key whose feature is off (class 1 of issue 27)
    pytest.param(config_case("augment.cutout.size=0", "augment.cutout.size must be > 0, got 0"),
                 id="cutout_size_while_cutout_off"),
    pytest.param(overrides_case({"augment.crop.enabled": "false", "augment.crop.padding": -1},
                                "augment.crop.padding must be >= 0, got -1"), id="crop_padding_while_crop_off"),
    pytest.param(config_case("schedule.stages.full.until_plateau.metric=train_loss",
                             "schedule.stages.full.until_plateau.metric: unknown value 'train_loss'"),
                 id="plateau_metric_while_plateau_off"),
    pytest.param(config_case("schedule.stages.high.until_plateau.min_delta=-1",
                             "schedule.stages.high.until_plateau.min_delta must be >= 0"),
                 id="plateau_min_delta_while_plateau_off"),
    pytest.param(overrides_case({"optim.nesterov": "true", "optim.momentum": 0}, "optim.nesterov=true needs "
                                "optim.momentum > 0"), id="sgd_nesterov_under_adam"),
    pytest.param(num_classes_for_other_data, id="synthetic_num_classes_for_an_image_folder"),
    pytest.param(unused_weights_file_missing, id="model_weights_missing_under_init_from"),
    # values the override grammar refuses unquoted (class 2)
    pytest.param(path_outside_ascii, id="path_outside_ascii_unquoted"),
    pytest.param(path_with_a_bracket, id="path_with_a_bracket_unquoted"),
    pytest.param(config_case("lr=1e-3)", "must be quoted", """'lr="1e-3)"'"""), id="value_with_a_stray_bracket"),
    # Hydra's and argparse's usage errors (class 3)
    pytest.param(overrides_case(None, "Only one of --run, --multirun, --cfg", flags=("-m", "--cfg", "job")),
                 id="multirun_with_cfg"),
    pytest.param(overrides_case(None, "--resolve flag can only be used", flags=("--resolve",)), id="resolve_alone"),
    pytest.param(overrides_case(None, "Expecting one subcommand", flags=("--shell-completion",)),
                 id="shell_completion_alone"),
    pytest.param(overrides_case(None, "unrecognized arguments: --foo", "cbam-train --help", flags=("--foo",)),
                 id="unknown_flag"),
    pytest.param(overrides_case(None, "invalid choice: 'nonsense'", flags=("--info", "nonsense")),
                 id="info_bad_choice"),
    pytest.param(empty_dataset, id="imagefolder_no_class_folders"),
    pytest.param(class_folder_without_images, id="imagefolder_class_without_images"),
    pytest.param(corrupt_image, id="imagefolder_corrupt_image"),
    pytest.param(corrupt_image_skipped, id="imagefolder_corrupt_image_skipped"),
    pytest.param(truncated_image, id="imagefolder_truncated_image"),
    pytest.param(non_image_files, id="imagefolder_non_image_file_warns"),
    pytest.param(class_count_mismatch, id="imagefolder_num_classes_mismatch"),
    pytest.param(single_class_folder, id="imagefolder_single_class"),
    pytest.param(unquoted_path_with_a_space, id="unquoted_path_with_a_space"),
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
    case = make(work, lambda: request.getfixturevalue("trained_run"))
    before = snapshot(case.watch)
    assert before or not case.watch  # the watched inputs exist
    args = case.args + ([] if any(a.startswith("hydra.run.dir=") for a in case.args)
                        else [f"hydra.run.dir={tmp_path / 'run'}"])
    proc = call_cli(args, cwd=tmp_path)  # in this process: test_cli.py runs the entry point's contract for real

    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == case.code, proc.stderr
    if case.code == 0:  # a run that succeeds despite the input, saying so once
        assert len(lines) == 1 and lines[0].startswith("warning:"), proc.stderr
        assert (tmp_path / "run" / "model.pt").is_file()
    else:
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for phrase in case.phrases:
        assert phrase in lines[0]

    after = snapshot(case.watch)
    if case.code == 0:  # a successful run may add files (the decode cache), never change one
        assert {k: after.get(k) for k in before} == before
    else:
        assert after == before
    if case.marker is not None:
        assert not case.marker.exists(), "unpickling the checkpoint ran code"
