"""Bad input the CLI is told, through its entry point (cli.main, in this process): config values (also of
features that are off), values Hydra's override grammar refuses unquoted, and Hydra's and argparse's usage
errors. Every case exits 2 with one 'error:' line that names the key or says what to do, and no traceback.
What the CLI reads (data, checkpoints, run dirs): test_bad_input.py."""

from __future__ import annotations

import pytest
from bad_input import Case, argv, check_case, config_case, folder_args, overrides_case, write_images

# -- a key of a feature that is off: checked all the same

def num_classes_for_other_data(tmp, trained):  # data.num_classes is read by data=synthetic only
    return Case(argv({"data": "imagefolder", "data.root": tmp / "imgs", "data.num_classes": 1}),
                ("data.num_classes must be >= 2",))


# -- values Hydra's override grammar refuses unquoted: the hint quotes the user's own value

def path_outside_ascii(tmp, trained):
    path = tmp / "Bilder-Übersicht"
    return Case(argv({"data": "imagefolder", "data.root": path}),
                ("LexerNoViableAltException", "must be quoted", f"""'data.root="{path}"'"""))


def path_with_a_bracket(tmp, trained):
    path = tmp / "runs(old)"
    return Case(argv({"data": "imagefolder", "data.root": path}), ("must be quoted", f"""'data.root="{path}"'"""))


def unquoted_path_with_a_space(tmp, trained):
    write_images(tmp / "my data" / "train")
    # the shell splits `data.root=/x/my data` into two arguments: Hydra sees the override 'data'
    return Case(folder_args(tmp / "unused", {"data.root": None}, f"data.root={tmp / 'my'}", "data"),
                ("Error parsing override 'data'", f"""'data.root="{tmp / 'my'} data"'"""),
                watch=(tmp / "my data",))


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
    pytest.param(path_outside_ascii, id="path_outside_ascii_unquoted"),
    pytest.param(path_with_a_bracket, id="path_with_a_bracket_unquoted"),
    pytest.param(config_case("lr=1e-3)", "must be quoted", """'lr="1e-3)"'"""), id="value_with_a_stray_bracket"),
    pytest.param(overrides_case(None, "Only one of --run, --multirun, --cfg", flags=("-m", "--cfg", "job")),
                 id="multirun_with_cfg"),
    pytest.param(overrides_case(None, "--resolve flag can only be used", flags=("--resolve",)), id="resolve_alone"),
    pytest.param(overrides_case(None, "Expecting one subcommand", flags=("--shell-completion",)),
                 id="shell_completion_alone"),
    pytest.param(overrides_case(None, "unrecognized arguments: --foo", "cbam-train --help", flags=("--foo",)),
                 id="unknown_flag"),
    pytest.param(overrides_case(None, "invalid choice: 'nonsense'", flags=("--info", "nonsense")),
                 id="info_bad_choice"),
    pytest.param(unquoted_path_with_a_space, id="unquoted_path_with_a_space"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make", CASES)
def test_bad_config_is_one_line_and_touches_nothing(make, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    check_case(make(work, lambda: pytest.fail("a config case reads no trained run")), tmp_path)
