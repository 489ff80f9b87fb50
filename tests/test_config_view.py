"""log.show_config: the compact view (groups, overrides, values that differ from the defaults), full, none."""

from __future__ import annotations

import pytest
from conftest import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from cbam_train.cli import command
from cbam_train.config.errors import ConfigError
from cbam_train.config.view import UNSET, ConfigView, config_changes, plain_lines
from cbam_train.reporting.reporter import Reporter


def test_changes_are_the_leaves_that_differ_with_their_defaults():
    default = {"data": {"batch_size": 64, "root": None, "mean": None}, "schedule": {"stages": {"head": {"lr": 1e-3}}},
               "experiment": None}
    run = {"data": {"batch_size": 512, "root": None, "mean": [0.5, 0.5]},
           "schedule": {"stages": {"head": {"lr": 1e-3}, "extra": {"lr": 1e-4}}}, "experiment": "smoke"}
    assert config_changes(run, default) == [("data.batch_size", 512, 64), ("data.mean", [0.5, 0.5], None),
                                            ("schedule.stages.extra.lr", 1e-4, UNSET)]
    assert config_changes(default, default) == []


def test_plain_lines_show_overrides_changes_and_the_full_config_path():
    view = ConfigView(groups={"data": "synthetic", "experiment": "smoke"},
                      overrides=["experiment=smoke", "data.batch_size=512", "resume=/r"], from_run=["experiment=smoke"],
                      changed=[("data.batch_size", 512, 64), ("model.pretrained", False, True),
                               ("schedule.stages.extra.lr", 1e-4, UNSET)],
                      full_path="/r/.hydra/config.yaml")
    text = "\n".join(plain_lines(view))
    assert "groups       data=synthetic experiment=smoke" in text
    assert "experiment=smoke (from the run)" in text and "data.batch_size=512\n" in text
    assert "resume=/r\n" in text  # typed now: not marked
    assert "data.batch_size: 512 (default 64)" in text and "model.pretrained: false (default true)" in text
    assert "schedule.stages.extra.lr: 0.0001 (not in the default config)" in text
    assert "/r/.hydra/config.yaml (log.show_config=full" in text
    assert "changed" not in "\n".join(plain_lines(ConfigView(overrides=["seed=1"])))  # comparison failed: no row


@pytest.fixture(autouse=True)
def _restore_hydra_config():
    """_hydra_job sets Hydra's HydraConfig singleton as @hydra.main does; other tests get it back as it was."""
    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def _hydra_job(overrides: list):
    """What @hydra.main hands run_task: the job config (without hydra) with HydraConfig set."""
    command.register_configs()
    dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(dcfg)
    with open_dict(dcfg):
        del dcfg["hydra"]
    return dcfg


def test_view_lists_preset_and_override_changes_against_the_chosen_groups(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["experiment=smoke"]))
    overrides = ["experiment=smoke", "data.batch_size=512", f"resume={run}"]
    with initialize_config_dir(config_dir=str(command.find_conf_dir()), version_base="1.3"):
        dcfg = _hydra_job(overrides)
        view = command.config_view(dcfg, run, overrides, str(run))
        assert HydraConfig.get().runtime.choices["experiment"] == "smoke"  # composing the defaults left it alone
    assert view.warning is None
    assert list(view.groups)[:2] == ["model", "data"] and view.groups["data"] == "synthetic"
    assert view.groups["experiment"] == "smoke" and view.groups["device"] == "cpu"
    assert view.overrides == overrides and view.from_run == ["experiment=smoke"]
    changed = {key: (value, default) for key, value, default in view.changed}
    assert changed["data.batch_size"] == (512, 64)  # the override, against conf/data/synthetic.yaml
    assert changed["data.train_size"] == (640, 2000)  # the preset's value
    assert changed["schedule.stages.head.trainable"] == (["all"], ["fc", "cbam"])
    assert "data.num_classes" not in changed and "data.name" not in changed  # synthetic is the chosen group
    assert "experiment" not in changed
    assert view.full_path == f"{run / '.hydra' / 'config.yaml'}"  # no record there yet


def test_a_failed_comparison_keeps_the_overrides_and_warns(tmp_path, monkeypatch):
    def broken(choices):
        raise KeyError("boom")

    monkeypatch.setattr(command, "default_config", broken)
    with initialize_config_dir(config_dir=str(command.find_conf_dir()), version_base="1.3"):
        view = command.config_view(_hydra_job(["seed=3"]), tmp_path, ["seed=3"], None)
    assert view.changed is None and view.overrides == ["seed=3"]
    assert view.warning.startswith("log.show_config=compact: could not compare") and "KeyError" in view.warning


def test_default_config_composes_outside_a_hydra_app():
    default = command.default_config({"data": "synthetic", "experiment": "smoke"})
    assert default["data"]["train_size"] == 2000 and default["experiment"] is None


@pytest.mark.parametrize("show", ["compact", "full", "none"])
def test_reporter_prints_what_show_config_asks(tmp_path, capsys, show):
    rep = Reporter(tmp_path, "plain", None)
    view = ConfigView(groups={"data": "synthetic"}, overrides=["data.batch_size=512"],
                      changed=[("data.batch_size", 512, 64)], warning="could not compare" if show == "full" else None)
    rep.config("data:\n  name: synthetic\n  batch_size: 512\n", view, show)
    rep.close()
    out, err = capsys.readouterr()
    log = (tmp_path / "train.log").read_text()
    if show == "none":
        assert out == "" and err == "" and log == ""
    elif show == "full":
        assert "  name: synthetic\n  batch_size: 512" in out and "groups" not in out and "warning" not in err
        assert "  batch_size: 512" in log
    else:
        assert "data.batch_size: 512 (default 64)" in out and "name: synthetic" not in out
        assert "data.batch_size: 512 (default 64)" in log


def test_show_config_is_validated():
    assert compose_config(["log.show_config=none"]).log.show_config == "none"
    want = r"^log.show_config: unknown value 'loud'; choose one of: compact, full, none"
    with pytest.raises(ConfigError, match=want):
        compose_config(["log.show_config=loud"])
