"""Logging of every script: module loggers, one tqdm-safe handler set up at the CLI edge, rank 0 only.

Modules log with ``logging.getLogger(__name__)``; nothing is configured at import. ``setup_logging``
(called by ``utils.cli.run_cli``) routes the project's records to stdout (info) and stderr
(``warning: ...``), through ``tqdm.write`` so a line never tears a progress bar. Progress bars
follow the same switch: ``--quiet`` hides them with the info lines.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable

from tqdm import tqdm

PROJECT_LOGGERS = ("__main__", "benchmarks", "data", "deploy", "engine", "models", "utils")
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
_progress_logger = logging.getLogger("utils.progress")

# Third-party warnings that say nothing a user can act on, as (action, message regex, category, module regex).
# One list for the scripts (setup_logging) and the test run (tests/conftest.py adds them to pytest's filters).
# torch 2.14 announces the move of FX quantisation to torchao on every call; the toolkit pins torch and
# documents the choice (docs/quantization.md).
THIRD_PARTY_WARNINGS = (
    ("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning, r""),
    ("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning, r""),  # loading the TorchScript artifacts
    ("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning, r""),
    ("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning, r""),
    ("ignore", r"Please use quant_min and quant_max", UserWarning, r""),
    ("ignore", r"TypedStorage is deprecated", UserWarning, r""),  # torch.load of quantised tensors
)

# Third-party loggers that say nothing a user can act on, muted below the level given: torch warns "No CUDA runtime
# is found" on a CPU-only machine with a CUDA toolkit whenever something (NNCF, inductor) imports cpp_extension.
# torch gives its loggers their own stderr handler, so only their level keeps such a record out, at every verbosity.
THIRD_PARTY_LOG_LEVELS = {"torch.utils.cpp_extension": logging.ERROR}


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(self.format(record), file=stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(verbosity: str = "normal") -> None:
    """Show the project's records at ``verbosity`` (quiet / normal / verbose); other ranks only show errors."""
    level = LEVELS[verbosity] if rank() == 0 else logging.ERROR
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # third-party libraries: warnings and errors only
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, muted_below in THIRD_PARTY_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(muted_below)
    logging.captureWarnings(True)  # warnings.warn reach the same handler, as one line
    warnings.formatwarning = _one_line
    filter_third_party_warnings()


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    return f"{message} ({category.__name__})"


def filter_third_party_warnings() -> None:
    for action, message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings(action, message=message, category=category, module=module)


def progress(iterable: Iterable, **kwargs) -> tqdm:
    """A tqdm bar shown only where info lines are (rank 0, not --quiet); ``disable`` adds a condition."""
    disable = kwargs.pop("disable", False) or not _progress_logger.isEnabledFor(logging.INFO)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
