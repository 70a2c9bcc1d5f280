"""What a run prints: ooc-ray's own lines through the `ooc_ray` logger, everyone else's kept quiet unless asked.

Three levels, from the CLI's -q / -v:
  -q        warnings and errors only, no progress bars
  (default) ooc-ray's lines ("[ooc-ray] ...") and its progress bars; third-party loggers (transformers, diffusers,
            peft, accelerate, TensorFlow, Ray, Tune) at ERROR, Python warnings from libraries hidden, Tune's
            summary boxes off. A run printed ~40 such lines before (a torchvision notice per process, Tune's
            configuration box and TensorBoard hint, Ray's INFO lines) mixed with its own.
  -v        all of it, and ooc-ray's debug lines.
Errors stay one line on stderr (ooc_ray.cli), at every level.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

LOGGER = logging.getLogger("ooc_ray")
QUIET, DEFAULT, VERBOSE = -1, 0, 1
THIRD_PARTY = ("transformers", "diffusers", "peft", "accelerate", "tensorflow", "absl", "ray", "ray.tune",
               "ray.train", "ray.data", "py.warnings", "matplotlib", "PIL", "urllib3", "filelock", "mlflow")


class _Stdout(logging.Handler):
    """Writes to the sys.stdout of the moment (a test's capture, a redirected stream), one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr,
                  flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def _own_handler() -> None:
    if not any(isinstance(h, _Stdout) for h in LOGGER.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[ooc-ray] %(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)  # used as a library (tests, notebooks): the same lines as the CLI's default


_own_handler()


def configure(verbosity: int = DEFAULT) -> None:
    """Set the levels for a CLI run (QUIET, DEFAULT or VERBOSE); environment variables for the libraries that read
    them at import (TensorFlow's C++ log, Tune's output engine) are set only where the user has not set them."""
    LOGGER.setLevel({QUIET: logging.WARNING, DEFAULT: logging.INFO}.get(verbosity, logging.DEBUG))
    loud = verbosity >= VERBOSE
    logging.captureWarnings(not loud)  # library warnings go to the py.warnings logger, quiet below
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.ERROR)
    if loud:  # the libraries' records reach the root logger: print them (a no-op where it has a handler)
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _state.update(ray_level=logging.INFO if loud else logging.ERROR, verbose=loud)
    if not loud:  # read at import, by this process and by the Ray workers it starts (they inherit it)
        for var, value in (("TF_CPP_MIN_LOG_LEVEL", "2"), ("TRANSFORMERS_VERBOSITY", "error"),
                           ("DIFFUSERS_VERBOSITY", "error"),
                           ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),  # "Writing model shards" and loading bars
                           ("RAY_AIR_NEW_OUTPUT", "0")):  # Tune's legacy reporter at verbose=0 prints nothing
            os.environ.setdefault(var, value)
        for module in ("transformers", "diffusers"):  # already imported: their own level, set directly
            if module in sys.modules:
                sys.modules[module].utils.logging.set_verbosity_error()


_state = {"ray_level": logging.INFO, "verbose": True}  # a library user sees everything, as before


def ray_logging_level() -> int:
    """The level ray.init gives Ray's own logger (ray.init resets it)."""
    return _state["ray_level"]


def relevel(name: str) -> None:
    """Give logger `name` the run's library level again: Optuna sets its own (INFO) when it is first imported,
    which the search does after configure ran ("A new study created in memory" at the default verbosity)."""
    logging.getLogger(name).setLevel(_state["ray_level"])


@contextmanager
def native_lines_hidden() -> Iterator[None]:
    """Below -v, file descriptor 2 goes to /dev/null for the block: TensorFlow prints its oneDNN and CUDA notices
    from C++ while it is imported, before TF_CPP_MIN_LOG_LEVEL or absl's settings apply (4 lines per import,
    measured with TensorFlow 2.21). Python exceptions still propagate; with -v nothing is hidden."""
    if _state["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def progress_shown() -> bool:
    """Whether progress bars are drawn (not under -q)."""
    return LOGGER.isEnabledFor(logging.INFO)


def note(message: str) -> None:
    """A line for the person at the terminal (what was re-used, re-made or skipped, and why)."""
    LOGGER.info(message)


def warn(message: str) -> None:
    """A line the person must see even under -q: a result shown with less than was planned."""
    LOGGER.warning(message)
