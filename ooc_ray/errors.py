"""Every expected failure of ooc-ray, under one base class that the CLI turns into one line and a non-zero exit.

An expected failure is one the user can fix (a typo in a config, a corrupt image, a pool too small, a results
folder another run is writing); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class OocRayError(Exception):
    """Base class: the message names the file, key, fold, class or node, and says what to do."""


class ConfigError(OocRayError, ValueError):
    """A config file or override is invalid; the message names the dotted key."""


class DataError(OocRayError, ValueError):
    """Bad input data; the message names the file or label."""


class TrainsetError(DataError):
    """A trial's training set cannot be built (pool too small, weight missing); the message names the trial."""


class MissingInputError(OocRayError, FileNotFoundError):
    """An input a stage reads is not there (a stage not run yet, a deleted file); the message names it."""


class ModelError(OocRayError, RuntimeError):
    """A model cannot be built or loaded; the message says which and why."""


class ResourceError(OocRayError, RuntimeError):
    """The resources a stage asks for (GPUs, CPUs per trial) cannot be given by this Ray cluster."""


class LockError(OocRayError, RuntimeError):
    """Another live ooc-ray process is writing the same results folder; the message names it."""


class StageError(OocRayError, RuntimeError):
    """A stage ran but could not finish its work (trials failed, images missing after sampling)."""


def one_line(exc: BaseException) -> str:
    """What a user is shown of `exc`: the cause of an error raised inside a Ray task or trial (which arrives
    wrapped, with the remote traceback), its first line; an OSError as its file and reason."""
    exc = getattr(exc, "cause", None) or exc
    if isinstance(exc, OSError) and exc.filename:  # a read-only or full results folder, a path that is a file
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc).strip().splitlines()[0]
