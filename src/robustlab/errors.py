"""The errors a user of robustlab can meet and act on, in one place.

Everything robustlab raises for invalid *input* (a bad option, a missing file, a run folder that already
holds a run) is a `RobustlabError`; the CLI prints those as one line and exits with code 2. Anything else
that escapes is a bug and keeps its traceback. `RobustlabError` subclasses `ValueError` so code written
against the plain built-in keeps working.
"""
from __future__ import annotations


class RobustlabError(ValueError):
    """Base class: invalid input from a user. The message names the value and what would be valid."""


class InputError(RobustlabError):
    """An argument has an invalid value: images outside [0, 1], labels out of range, a negative budget, ..."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError, as `open` would raise)."""


class InputTypeError(InputError, TypeError):
    """An argument has the wrong type (also a TypeError, as Python's own checks raise)."""


class ConfigError(RobustlabError):
    """A configuration key is unknown, of the wrong type, or out of range."""


class DataError(RobustlabError):
    """A dataset file or tensor is missing, malformed, or does not fit the model."""


class CheckpointError(RobustlabError):
    """A checkpoint is missing, unreadable, damaged, or not a robustlab checkpoint."""


class AttackSpecError(RobustlabError):
    """An attack specification or attack option is invalid (unknown option, duplicate key, wrong unit)."""


class OptionError(RobustlabError, TypeError):
    """A registry entry (attack, method, model, dataset) was given an option it does not take; also a TypeError
    so that callers catching the built-in for bad keyword arguments keep working."""


class DeviceError(RobustlabError):
    """The requested device does not exist on this machine."""


class RunExistsError(RobustlabError):
    """A run folder already holds a run; robustlab never overwrites one without being told to."""


class ResumeError(CheckpointError):
    """A run cannot be resumed: its state is missing, or the settings differ from the stored run's."""


class OutputError(RobustlabError):
    """An output path cannot be written (checked before any expensive work starts)."""


class MissingDependencyError(RobustlabError, ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


class MetricError(RobustlabError):
    """A label metric (cost matrix) is invalid."""


class UnknownNameError(RobustlabError, KeyError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UserCodeError(InputError):
    """The user's own code (a `--model FILE.py:NAME` file, their model's forward on their data) raised: their bug,
    not robustlab's. The CLI prints the message as one line, then `user_traceback`, the frames of their code."""

    def __init__(self, message: str, user_traceback: str = "") -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


class IntegrityWarning(RuntimeWarning):
    """An evaluation result shows a sign of gradient masking or a broken attack: the number may be too high."""


__all__ = ["RobustlabError", "InputError", "InputTypeError", "MissingFileError", "ConfigError", "DataError",
           "CheckpointError", "AttackSpecError", "OptionError", "DeviceError", "RunExistsError", "ResumeError", "OutputError",
           "MissingDependencyError", "MetricError", "UnknownNameError", "IntegrityWarning"]
