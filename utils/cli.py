"""The command-line edge of every script: value types of flags, logging flags, one-line user errors."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from utils.errors import UserError
from utils.logs import setup_logging

log = logging.getLogger(__name__)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def unit_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="normal",
                       help="only warnings, errors and the final results (no progress bars)")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                       help="also debug details (e.g. data loading and cost measurements)")


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse flags, set up logging, run ``main``; a UserError ends the program with one clear line (exit 2)."""
    add_logging_args(parser)
    args = parser.parse_args()
    setup_logging(args.verbosity)
    try:
        main(args)
    except UserError as error:
        log.error("%s", error)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted: resume with --resume <run folder>/last.pt")
        sys.exit(130)
