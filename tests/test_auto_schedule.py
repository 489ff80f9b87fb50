"""schedule=auto: the stages planned from the network (plan_stages, new_modules_of), each stage's lr found by the range
test task=lr_find runs, plateau ends, schedule.yaml replaying the run, SIGKILL resumes anywhere, bad keys refused."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, call_cli, cli_lines, compose_config
from omegaconf import OmegaConf

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import AutoScheduleConfig, ScheduleConfig
from cbam_train.models import build_model
from cbam_train.state.weights import new_modules_of
from cbam_train.training.auto_plan import plan_stages
from cbam_train.training.schedule import trainable_parameters

TIME_FIELDS = ("epoch_time_s", "train_images_per_s")

# A tiny synthetic run: 8x8 images, 6 batches of 16 per epoch, the narrow network; ~5 s in this process.
BASE = ["data=synthetic", "device=cpu", "model.pretrained=false", NARROW, "data.image_size=8", "data.train_size=128",
        "data.val_size=32", "data.test_size=32", "data.batch_size=16", "data.num_workers=0", "log.mode=plain",
        "log.every_n_steps=1", *PICTURES_OFF]
# 3 stages (head | layer4 | the rest), each at most 3 epochs; min_delta 1.0 (no val_acc can beat the best by 1.0)
# ends every stage on a plateau after 1 + 1 epochs, whatever the training does: epochs 1-2 | 3-4 | 5-6.
LAST = "layer3_layer2_layer1_conv1_bn1"
AUTO_KEYS = ["schedule.auto.max_epochs=3", "schedule.auto.patience=1", "schedule.auto.min_delta=1.0",
             "lr_find.steps=20", "schedule.auto.groups=[[layer4],[layer3,layer2,layer1,conv1,bn1]]"]


def rows(run_dir: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def names_of(overrides: list) -> list:
    return [n for n, _ in build_model(compose_config(overrides).model).named_parameters()]


# --- the plan --------------------------------------------------------------------------------------------------

MODEL = ["data.root=/x", "model.pretrained=false", NARROW]
DEFAULT_GROUPS = AutoScheduleConfig()


def test_default_groups_plan_head_then_one_stage_per_group_down():
    stages = plan_stages(DEFAULT_GROUPS, names_of(MODEL), ["fc", "cbam"])
    assert list(stages) == ["head", "layer4", "layer3", "layer2", "layer1_conv1_bn1"]
    assert [s.trainable for s in stages.values()] == [
        ["fc", "cbam"], ["fc", "cbam", "layer4"], ["fc", "cbam", "layer4", "layer3"],
        ["fc", "cbam", "layer4", "layer3", "layer2"], ["fc", "cbam", "layer4", "layer3", "layer2", "layer1", "conv1",
                                                      "bn1"]]
    for s in stages.values():
        assert s.lr is None and s.epochs == DEFAULT_GROUPS.max_epochs and s.layer_decay is None
        p = s.until_plateau
        assert (p.patience, p.min_delta, p.metric, p.restore_best) == (2, 0.0, "val_acc", True)


def test_a_stem_the_weights_did_not_fill_trains_from_the_head_on():
    stages = plan_stages(DEFAULT_GROUPS, names_of(MODEL), ["conv1", "bn1", "fc", "cbam"])
    assert list(stages) == ["head", "layer4", "layer3", "layer2", "layer1"]
    assert stages["head"].trainable == ["fc", "cbam", "conv1", "bn1"]
    assert stages["layer1"].trainable[-1] == "layer1"
    # a group whose modules all train already adds no stage
    auto = AutoScheduleConfig(groups=[["layer4"], ["conv1", "bn1"], ["layer3", "layer2", "layer1"]])
    assert list(plan_stages(auto, names_of(MODEL), ["conv1", "bn1", "fc", "cbam"])) == [
        "head", "layer4", "layer3_layer2_layer1"]


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_the_stages_select_the_intended_parameters_for_both_cbam_placements(placement):
    model = build_model(compose_config(MODEL + [f"model.cbam.placement={placement}"]).model)
    names = [n for n, _ in model.named_parameters()]
    stages = plan_stages(DEFAULT_GROUPS, names, ["fc", "cbam"])
    cbam = [n for n in names if "cbam" in n.split(".")]
    assert cbam and (placement == "stage") == all(n.startswith("cbam.") for n in cbam)  # block: layer<k>.<i>.cbam.*
    head = trainable_parameters(model, stages["head"].trainable)
    assert head == [n for n in names if n.startswith("fc.") or n in cbam]
    assert trainable_parameters(model, list(stages.values())[-1].trainable) == names  # the last stage: everything
    sizes = [len(trainable_parameters(model, s.trainable)) for s in stages.values()]
    assert sizes == sorted(set(sizes))  # each stage adds parameters


def test_new_modules_of_a_weights_file_without_cbam(tmp_path):
    for classes in (10, 5):
        torch.manual_seed(0)
        saved = build_model(compose_config(MODEL + ["model.cbam.enabled=false",
                                                    f"model.num_classes={classes}"]).model).state_dict()
        torch.save(saved, tmp_path / f"w{classes}.pt")
    model = build_model(compose_config(MODEL).model)
    assert new_modules_of(model, str(tmp_path / "w10.pt"), False, None) == ["cbam"]  # fc filled: 10 classes
    assert sorted(new_modules_of(model, str(tmp_path / "w5.pt"), False, None)) == ["cbam", "fc"]
    assert new_modules_of(model, None, False, str(tmp_path / "w10.pt")) == []  # init_from fills every tensor
    everything = new_modules_of(model, None, False, None)
    assert set(everything) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "cbam", "fc"}
    # the ImageNet stem's 7x7 conv1 does not fit the CIFAR stem's 3x3: conv1 trains from the first stage on
    torch.manual_seed(0)
    imagenet = build_model(compose_config(MODEL + ["model.cbam.enabled=false", "model.stem=imagenet"]).model)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pt")
    new = new_modules_of(model, str(tmp_path / "imagenet.pt"), False, None)
    assert sorted(new) == ["cbam", "conv1"]
    stages = plan_stages(DEFAULT_GROUPS, [n for n, _ in model.named_parameters()], new)
    # bn1's shape fits, but its statistics and affine belong to the 7x7 conv: it trains with the new conv1
    assert stages["head"].trainable == ["fc", "cbam", "conv1", "bn1"] and list(stages)[-1] == "layer1"


def test_an_unknown_group_module_is_refused_naming_the_group():
    auto = AutoScheduleConfig(groups=[["layer4"], ["layer3", "layer9"]])
    with pytest.raises(ConfigError, match=r"^schedule\.auto\.groups\[1\]: unknown module 'layer9'") as e:
        plan_stages(auto, names_of(MODEL), ["fc", "cbam"])
    assert "\n" not in str(e.value)
    assert list(plan_stages(AutoScheduleConfig(groups=[["layer4.1"]]), names_of(MODEL), ["fc", "cbam"])) == [
        "head", "layer4_1"]  # deeper paths are modules too


# --- a run -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> dict:
    """The weights file (a CBAM-less model of the same width: fc and the body filled, CBAM new), the overrides and
    the run dir of one uninterrupted schedule=auto run, in this process (~5 s)."""
    tmp = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    torch.save(build_model(compose_config(BASE + ["model.cbam.enabled=false"]).model).state_dict(), tmp / "w.pt")
    args = BASE + ["schedule=auto", f"model.weights={tmp / 'w.pt'}", *AUTO_KEYS]
    proc = call_cli(args + [f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"tmp": tmp, "weights": tmp / "w.pt", "args": args, "run": tmp / "run",
            "summary": json.loads((tmp / "run" / "summary.json").read_text()), "out": proc.stdout}


def test_the_found_lr_is_task_lr_finds_suggestion_on_the_same_weights(auto_run):
    """Stage 'head' of schedule=seed trains [fc, cbam] as the auto run's first stage: task=lr_find from the same
    weights, data, seed and lr_find.* keys sweeps the same losses and suggests the same lr, exactly."""
    tmp = auto_run["tmp"]
    proc = call_cli(BASE + ["task=lr_find", "schedule=seed", "lr_find.steps=20", f"model.weights={auto_run['weights']}",
                            f"hydra.run.dir={tmp / 'lr_find'}"], tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alone = json.loads((tmp / "lr_find" / "lr_find.json").read_text())
    staged = json.loads((auto_run["run"] / "lr_find" / "stage1-head.json").read_text())
    assert staged["losses"] == alone["losses"] and staged["lrs"] == alone["lrs"]
    assert staged["found_lr"]["lr"] == staged["found_lr"]["suggested"] == alone["suggestion"]["lr"]
    assert staged["found_lr"]["lr_scale"] == 1.0
    assert auto_run["summary"]["stages"][0]["lr_found"]["lr"] == alone["suggestion"]["lr"]
    table = [line for line in auto_run["out"].splitlines() if line.startswith("│ 1 │ head ")]
    # the stage table, printed again once each lr is found: the lr beside the picture of its range test
    assert f"{alone['suggestion']['lr']:.2e} │ lr_find/stage1-head.png " in table[-1], table
    for k, stage in enumerate(auto_run["summary"]["stages"], 1):  # every stage's json, png and summary agree
        found = json.loads((auto_run["run"] / "lr_find" / f"stage{k}-{stage['name']}.json").read_text())["found_lr"]
        assert (auto_run["run"] / found["picture"]).is_file() and stage["lr"] == found["lr"]
        assert stage["lr_found"] == {key: v for key, v in found.items() if key != "seconds"}


def test_each_stage_ends_on_its_plateau_and_the_next_follows_on(auto_run):
    metrics, stages = rows(auto_run["run"]), auto_run["summary"]["stages"]
    assert [s["name"] for s in stages] == ["head", "layer4", LAST]
    assert [(r["epoch"], r["stage_name"], r["stage_end"]) for r in metrics] == [
        (1, "head", None), (2, "head", "plateau"), (3, "layer4", None), (4, "layer4", "plateau"),
        (5, LAST, None), (6, LAST, "plateau")]
    first = 1
    for s in stages:
        ran = [r for r in metrics if r["stage_name"] == s["name"]]
        assert [r["epoch"] for r in ran] == list(range(first, first + s["epochs_run"]))  # follows the stage before
        assert s["ended"] == "plateau" == ran[-1]["stage_end"] and s["epochs_run"] == 2 < s["epochs"] == 3
        assert all(r["lr"] == s["lr_found"]["lr"] for r in ran)
        first += s["epochs_run"]


def test_schedule_yaml_replays_the_run_row_for_row(auto_run, tmp_path):
    plan = auto_run["run"] / "schedule.yaml"
    loaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), OmegaConf.load(plan)))
    assert not loaded.auto.enabled and list(loaded.stages) == ["head", "layer4", LAST]
    for s in auto_run["summary"]["stages"]:
        assert loaded.stages[s["name"]].lr == s["lr_found"]["lr"]  # the float exactly, not its printed 3 digits
        assert loaded.stages[s["name"]].trainable == s["trainable"]
    others = [a for a in auto_run["args"] if not a.startswith(("schedule", "lr_find"))]
    proc = call_cli(others + [f"schedule={plan}", f"hydra.run.dir={tmp_path / 'replay'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lr range test" not in proc.stdout and not (tmp_path / "replay" / "lr_find").exists()
    assert rows(tmp_path / "replay") == rows(auto_run["run"])


def test_the_mlflow_run_holds_each_found_lr_as_a_param(tmp_path):
    """From random weights every module is new: one stage ('head') that trains everything, its lr found by a
    10-step range test; the MLflow run gets it as schedule.stages.head.lr_found (its planned lr param is null)."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (the [mlflow] extra, in dev)")
    from mlflow.tracking import MlflowClient

    from cbam_train.reporting.tracking import DB_NAME

    proc = call_cli(BASE + ["schedule=auto", "schedule.auto.max_epochs=1", "lr_find.steps=10", "logger=mlflow",
                            f"logger.tracking_uri={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(s["name"], s["trainable"]) for s in summary["stages"]] == [
        ("head", ["fc", "cbam", "conv1", "bn1", "layer1", "layer2", "layer3", "layer4"])]
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    params = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / DB_NAME}").get_run(run_id).data.params
    assert float(params["schedule.stages.head.lr_found"]) == summary["stages"][0]["lr_found"]["lr"]


@pytest.mark.slow
def test_sigkill_in_a_range_test_in_training_and_in_a_plateau_wait_resumes_to_the_same_run(auto_run, tmp_path):
    """Killed while stage 2's range test runs (its lr not found yet: found again on resume), mid-epoch in
    stage 2's first epoch (its lr in the checkpoint: no second range test), and mid-epoch in stage 3's plateau
    wait: the resumed run's rows, found lrs and model.pt are the uninterrupted run's."""
    from test_resume import run_until

    run = tmp_path / "run"
    rc, out = run_until(auto_run["args"] + ["train.checkpoint_every_n_steps=2", f"hydra.run.dir={run}"], tmp_path,
                        "stage 2/3 'layer4': lr range test")
    assert rc == -signal.SIGKILL, out
    assert not (run / "lr_find" / "stage2-layer4.json").exists()
    rc, out = run_until([f"resume={run}"], tmp_path, "epoch 3 (layer4) step 4/",
                        wait_for=run / "lr_find" / "stage2-layer4.json")
    assert rc == -signal.SIGKILL, out
    assert "stage 2/3 'layer4': lr range test" in out  # its test had not ended: run again
    rc, out = run_until([f"resume={run}"], tmp_path, f"epoch 6 ({LAST}) step 3/")
    assert rc == -signal.SIGKILL, out
    assert "'layer4': lr range test" not in out  # found before the kill: read from the checkpoint
    rc, out = run_until([f"resume={run}"], tmp_path)
    assert rc == 0, out
    assert "lr range test" not in out
    assert rows(run) == rows(auto_run["run"])
    summary = json.loads((run / "summary.json").read_text())
    assert [s["lr_found"] for s in summary["stages"]] == [s["lr_found"] for s in auto_run["summary"]["stages"]]
    ref, got = (torch.load(d / "model.pt", weights_only=True) for d in (auto_run["run"], run))
    assert list(ref) == list(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    plan, ref_plan = ((d / "schedule.yaml").read_text() for d in (run, auto_run["run"]))
    assert plan.split("name: auto_plan", 1)[1] == ref_plan.split("name: auto_plan", 1)[1]  # the header's command
    # differs: it names this run's own overrides (train.checkpoint_every_n_steps)


def test_schedule_yaml_keeps_a_fixed_lr_and_says_how_each_stage_ran():
    """An edited plan replayed may mix fixed and found lrs: a fixed lr is written back as it was, not as null."""
    import yaml

    from cbam_train.config.schema import StageConfig
    from cbam_train.training.auto_plan import RanStage, plan_yaml

    fixed, found = StageConfig(epochs=2, lr=1e-3, trainable=["fc"]), StageConfig(epochs=2, lr=None, trainable=["all"])
    record = {"lr": 2e-4, "suggested": 4e-4, "lr_scale": 0.5, "picture": "lr_find/stage2-b.png"}
    text = plan_yaml([RanStage("a", fixed, None, [1, 2], "epochs"), RanStage("b", found, record, [3], "plateau", 3),
                      RanStage("c", found, None, [], None)], True, ["replay: cbam-train schedule=x.yaml"])
    stages = yaml.safe_load(text)["stages"]
    assert [stages[n]["lr"] for n in "abc"] == [1e-3, 2e-4, None]
    assert "# a fixed lr 0.001; ran epochs 1-2 (2), ended at its maximum" in text
    assert ("# lr found by a range test (lr_find/stage2-b.png): suggested 0.0004 x lr_scale 0.5; ran epochs 3-3 (1), "
            "ended on a plateau, weights of epoch 3 kept") in text
    assert "# not started: its lr (null) is found by a range test when it starts" in text


# --- bad keys --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["schedule=seed", "schedule.auto.enabled=true"],
     "schedule.auto.enabled=true generates the stages, but schedule.stages has head, high, full"),
    (["schedule.auto.groups=[[layer4],[]]"], r"schedule.auto.groups[1] is empty"),
    (["schedule.auto.groups=[[layer4],[layer3,layer4]]"], "schedule.auto.groups: layer4 is in groups[0] and groups[1]"),
    (["schedule.auto.max_epochs=0"], "schedule.auto.max_epochs must be >= 1, got 0"),
    (["schedule.auto.patience=0"], "schedule.auto.patience must be >= 1, got 0"),
    (["schedule.auto.min_delta=-0.1"], "schedule.auto.min_delta must be >= 0, got -0.1"),
    (["schedule.auto.metric=train_loss"], "schedule.auto.metric: unknown value 'train_loss'"),
    (["schedule.auto.lr_scale=0"], "schedule.auto.lr_scale must be > 0, got 0.0"),
    (["schedule.auto.lr_scale=nan"], "schedule.auto.lr_scale"),
    (["schedule.auto.layer_decay=0"], "schedule.auto.layer_decay must be null or in (0, 1], got 0.0"),
    (["schedule.auto.layer_decay=1.5"], "schedule.auto.layer_decay must be null or in (0, 1], got 1.5"),
    (["stage=2"], "stage=2: schedule=auto plans and runs every stage"),
    (["lr=0.001"], "lr=0.001: schedule=auto finds each stage's lr by a range test"),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_bad_auto_keys_are_refused_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_config(["schedule=auto", *MODEL, *overrides])
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text, text


def test_the_cli_refuses_a_bad_auto_key_with_exit_2_and_one_line(tmp_path):
    code, lines, run = cli_lines(BASE + ["schedule=auto", "schedule.auto.lr_scale=0"], tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0] == "error: schedule.auto.lr_scale must be > 0, got 0.0", lines
    assert not run.exists() or not any(run.iterdir())


def test_an_empty_validation_split_is_refused_naming_data_val_size(tmp_path):
    code, lines, _ = cli_lines(BASE + ["schedule=auto", "data.val_size=0"], tmp_path)
    assert code == 2 and lines == ["error: schedule=auto ends each stage on a plateau of a validation metric, but the "
                                   "validation split is empty; set data.val_size > 0"], lines


def test_a_good_auto_config_validates():
    cfg = compose_config(["schedule=auto", *MODEL, "schedule.auto.lr_scale=0.5", "schedule.auto.layer_decay=1"])
    assert cfg.schedule.auto.enabled and not cfg.schedule.stages and math.isclose(cfg.schedule.auto.lr_scale, 0.5)
