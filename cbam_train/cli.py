"""`cbam-train`: Hydra composes the config; this file converts it once to typed dataclasses and
hands it to the task. User errors become one red line and exit code 2; tracebacks are for bugs."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from hydra.core.config_store import ConfigStore

from cbam_train.config import Config, UserError, validate


def find_conf_dir() -> Path:
    """conf/ shipped inside the wheel (cbam_train/conf), else the repo's top-level conf/ (editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"cbam-train: config folder not found next to {here}; reinstall the package")


def register_configs() -> None:
    """Register the schema (as `config_schema`, first in conf/config.yaml's defaults) with Hydra."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print one red line to stderr and exit."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), msg))
    sys.exit(code)


def condense_hydra_error(text: str) -> str:
    """Hydra's multi-line composition errors as one line (the search path and hints dropped)."""
    text = text.split("Config search path:")[0]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "HYDRA_FULL_ERROR" not in ln and not ln.strip().startswith("object_type=")]
    return re.sub(r"\s+", " ", "; ".join(lines)).replace(":;", ":").replace(".;", ";")


_real_stderr = sys.stderr


@hydra.main(version_base="1.3", config_path=str(find_conf_dir()), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    sys.stderr = _real_stderr  # composition succeeded: from here on, stderr is the job's own
    try:
        try:
            cfg: Config = validate(OmegaConf.to_object(dcfg))
        except MissingMandatoryValue as e:
            fail(f"config: {e.full_key} is required; set {e.full_key}=...")
        except OmegaConfBaseException as e:
            fail(f"config: {condense_hydra_error(str(e))}")
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        record = {"config.yaml": OmegaConf.to_yaml(dcfg), "overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}
        if cfg.task == "train":
            from cbam_train.train import run

            run(cfg, run_dir, record)
        elif cfg.task == "bench":
            from cbam_train.bench import run_bench

            run_bench(cfg, run_dir, record)
    except UserError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # training failures we raise on purpose carry an exit code; anything else is a bug
        if hasattr(e, "exit_code"):
            fail(str(e), e.exit_code)
        raise


def main() -> None:
    """Console entry point. Hydra's own composition errors are captured and shown as one line."""
    global _real_stderr
    register_configs()
    _real_stderr = sys.stderr
    captured = io.StringIO()
    sys.stderr = captured
    try:
        _hydra_main()
    except SystemExit as e:
        sys.stderr = _real_stderr
        text = captured.getvalue()
        if e.code not in (0, None) and "HYDRA_FULL_ERROR" in text:
            fail(f"config: {condense_hydra_error(text)}", 2)
        sys.stderr.write(text)
        raise
    except BaseException:
        sys.stderr = _real_stderr
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr = _real_stderr
    sys.stderr.write(captured.getvalue())


if __name__ == "__main__":
    main()
