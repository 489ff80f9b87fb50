"""conf/ ships inside the wheel and is found from a regular (non-editable) install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, child_env


@pytest.mark.slow
def test_wheel_ships_and_finds_the_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cbam_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (ROOT / "conf").rglob("*.yaml"):
        assert f"cbam_train/conf/{yaml.relative_to(ROOT / 'conf').as_posix()}" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = child_env({"PYTHONPATH": str(site)})
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = "import cbam_train.cli.command as c; print(c.__file__, c.find_conf_dir())"
    where = subprocess.run([sys.executable, "-c", code],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "cbam_train" / "conf"
    proc = subprocess.run([sys.executable, "-m", "cbam_train", "experiment=smoke", "--cfg", "job"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "experiment: smoke" in proc.stdout and "name: synthetic" in proc.stdout
