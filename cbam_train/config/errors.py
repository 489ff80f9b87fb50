"""The error classes: bad input (UserError and its kin, exit 2 unless a class says otherwise) and a run that
cannot go on (TrainingError, exit 1). The CLI prints the message as one red line and exits with `exit_code`."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, paths, data): the CLI prints one red line and exits."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is invalid."""


class DataError(UserError):
    """The data is missing, empty or unreadable."""


class WeightsError(UserError):
    """A weights file is missing, unreadable or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact. Exit 1."""

    exit_code = 1


class PredictError(UserError):
    """The inputs of task=predict are missing, empty or unreadable."""


class ExportError(UserError):
    """The model cannot be exported, or the exported file does not compute what the PyTorch model does."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); exit 1."""

    exit_code = 1


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf; `step` is the first batch (1-based) where it did."""

    def __init__(self, where: str, step: int) -> None:
        super().__init__(f"non-finite loss at {where} step {step}")
        self.where, self.step = where, step
