"""The random state of a run: every generator a training step can draw from, captured into a checkpoint
and put back on resume."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

from cbam_train.config.errors import UserError


def capture_rng(loader_generators: tuple = ()) -> dict:
    """Every random state a training step can draw from: python, numpy, torch CPU and CUDA, the data's generators."""
    # numpy's stubs pick the dict overload for the default call; at runtime legacy=True returns the tuple
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    return {"python": random.getstate(),
            # numpy's state as tensors and numbers: a weights_only load cannot read numpy arrays
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": [g.get_state() for g in loader_generators]}


def restore_rng(state: dict, loader_generators: tuple = ()) -> None:
    """Put back what capture_rng saved (CUDA states only when this machine has as many devices)."""
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["loader"]) != len(loader_generators):
        raise UserError(f"resume: the checkpoint holds {len(state['loader'])} data generator state(s), this run has "
                        f"{len(loader_generators)}; resume with the same data.loader and number of processes")
    for generator, saved in zip(loader_generators, state["loader"], strict=False):
        try:
            generator.set_state(saved)
        except RuntimeError:  # a CUDA generator's state does not fit a CPU one, and the other way round
            raise UserError(f"resume: the checkpoint's data generator comes from another kind of device than "
                            f"this run's {generator.device.type}; resume on the device type it was trained on "
                            "(device=...), or start a new run with init_from=...") from None


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples; a saved state may come back with lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
