"""The command-line edge of every script: value types of flags, logging flags, one-line user errors."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from utils.errors import UserError
from utils.logs import setup_logging
from utils.recipes import read_recipe

log = logging.getLogger(__name__)

Number = TypeVar("Number", int, float)
SEED_LIMIT = 2**32  # NumPy's (and scikit-learn's) seeds are in [0, 2**32)


def _in_range(value: Number, ok: bool, requirement: str, text: str) -> Number:
    """``value`` if ``ok``, else argparse's one-line refusal: ``argument --x: must be <requirement>, got <text>``."""
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    return _in_range(value, value > 0, "a positive integer", text)


def non_negative_int(text: str) -> int:
    value = int(text)
    return _in_range(value, value >= 0, "0 or a positive integer", text)


MAX_WORKERS_PER_CPU = 4  # DataLoader workers beyond a few per core only add processes and memory


def loader_workers(text: str) -> int:
    """0 up to ``MAX_WORKERS_PER_CPU`` per CPU core: ``workers: 100000`` in an edited config.yaml started hundreds of
    processes before any error."""
    value = int(text)
    limit = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    return _in_range(value, 0 <= value <= limit, f"in [0, {limit}] ({MAX_WORKERS_PER_CPU} per CPU core)", text)


def training_batch_size(text: str) -> int:
    """BatchNorm needs at least two images per training batch."""
    value = int(text)
    return _in_range(value, value >= 2, "at least 2 (BatchNorm trains on batch statistics)", text)


def random_seed(text: str) -> int:
    value = int(text)
    return _in_range(value, 0 <= value < SEED_LIMIT, f"in [0, {SEED_LIMIT - 1}]", text)


def positive_float(text: str) -> float:
    value = float(text)
    return _in_range(value, math.isfinite(value) and value > 0, "a positive number", text)


def non_negative_float(text: str) -> float:
    value = float(text)
    return _in_range(value, math.isfinite(value) and value >= 0, "0 or a positive number", text)


def fraction(text: str) -> float:
    value = float(text)
    return _in_range(value, 0 <= value <= 1, "in [0, 1]", text)


def open_fraction(text: str) -> float:
    value = float(text)
    return _in_range(value, 0 < value < 1, "in (0, 1)", text)


def unit_fraction(text: str) -> float:
    value = float(text)
    return _in_range(value, 0 <= value < 1, "in [0, 1)", text)


def int_at_least(low: int) -> Callable[[str], int]:
    """A validator of integers >= ``low``."""
    def validate(text: str) -> int:
        value = int(text)
        return _in_range(value, value >= low, f"at least {low}", text)
    return validate


def float_between(low: float, high: float) -> Callable[[str], float]:
    """A validator of numbers in [``low``, ``high``]."""
    def validate(text: str) -> float:
        value = float(text)
        return _in_range(value, low <= value <= high, f"in [{low:g}, {high:g}]", text)
    return validate


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="normal",
                       help="only warnings, errors and the final results (no progress bars)")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                       help="also debug details (e.g. data loading and cost measurements)")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="a recipe: a YAML mapping of this script's flag names to values (e.g. recipes/quickstart.yaml, "
                             "or a run's own config.yaml to run it again); flags typed here override it")


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Flags typed over a ``--config`` recipe over the parser's defaults.

    ``args.explicit`` holds the destination names set by the user (typed or in the recipe), so scripts can refuse
    a flag that a mode or a checkpoint would otherwise silently ignore.
    """
    config, _ = _config_only().parse_known_args(argv)
    recipe = read_recipe(config.config, parser, skip=NOT_IN_RECIPES) if config.config else {}
    for action in parser._actions:  # a required flag (or group) the recipe gives need not be typed
        if action.dest in recipe:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if any(action.dest in recipe for action in group._group_actions):
            group.required = False
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.explicit = frozenset(recipe) | typed_flags(parser, argv)
    return args


NOT_IN_RECIPES = frozenset({"help", "config"})


def _config_only() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    return parser


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> frozenset[str]:
    """Destination names given on the command line: argparse fills a default only where the namespace lacks a value."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: None if isinstance(action, argparse._AppendAction) else unset
                                  for action in parser._actions if action.dest != "help"})
    parser.parse_args(argv, namespace=probe)
    return frozenset(dest for dest, value in vars(probe).items() if value is not unset and value is not None
                     and dest != "config")


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse flags (and a --config recipe), set up logging, run ``main``; a UserError ends the program with one clear
    line (exit 2)."""
    add_logging_args(parser)
    add_config_arg(parser)
    try:
        args = parse_command_line(parser)
    except UserError as error:
        setup_logging("normal")
        log.error("%s", error)
        sys.exit(2)
    setup_logging(args.verbosity)
    try:
        main(args)
    except UserError as error:
        log.error("%s", error)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted: resume with --resume <run folder>/last.pt")
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (``| head``): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        sys.exit(1)
