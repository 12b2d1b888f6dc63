"""Recipe files: a YAML mapping of flag names to values that sets a script's defaults (timm's ``--config``).

Keys are the flags' destination names (``img_size`` for ``--img-size``; dashes are accepted too); values are what
the command line would take (``fabrics: A,B,J`` or a list, ``synthetic: true``, ``pretrained: false``). Every value
goes through the flag's own type and choices, so a recipe is checked exactly as a typed flag is; flags typed on the
command line override it. Every run writes its resolved settings in the same format (``config.yaml``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.io import atomic_open

RECIPE_NAME = "config.yaml"
MAX_RECIPE_BYTES = 64 * 1024  # a recipe is a few dozen flags; a larger file is not one
_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class RecipeError(UserError):
    """A recipe file that cannot be read, or a key or value no flag of the script accepts."""


def read_recipe(path: str | Path, parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The recipe's values by destination name, each checked by its flag's type and choices.

    Size is capped and YAML anchors/aliases are refused before parsing: nested aliases expand exponentially (a
    394-byte file grew past 2.5 GB), and a flag's value never needs one.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"--config '{path}' is larger than {MAX_RECIPE_BYTES // 1024} KiB: a recipe is a short "
                              "mapping of flag names to values")
        text = raw.decode("utf-8")
        if any(isinstance(token, (yaml.AnchorToken, yaml.AliasToken)) for token in yaml.scan(text, Loader=yaml.SafeLoader)):
            raise RecipeError(f"--config '{path}' uses YAML anchors or aliases (& or *): write each value out")
        data = yaml.safe_load(text)
    except OSError as error:
        raise RecipeError(f"--config '{path}': {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError(f"--config '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"--config '{path}' must be a mapping of flag names to values, e.g. 'img_size: 112'")
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest not in skip}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise RecipeError(f"--config '{path}': unknown key '{key}': {parser.prog} has no --{dest.replace('_', '-')} "
                              "flag (see --help)")
        if value is not None:
            values[dest] = _flag_value(actions[dest], value, f"--config '{path}': {key}")
    return values


def _flag_value(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, _SWITCHES):
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: must be true or false, got {value!r}")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if isinstance(action, argparse._AppendAction):
        return [_typed(action, item, where) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    return _typed(action, value, where)


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)):
        raise RecipeError(f"{where}: must be a single value, got {value!r}")
    try:
        typed = action.type(str(value)) if action.type else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from None
    if action.choices is not None and typed not in action.choices:
        raise RecipeError(f"{where}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
    return typed


def write_recipe(settings: dict[str, Any], path: Path, comment: str) -> None:
    """Write resolved settings as a recipe (None values are left out: the flag's default stands)."""
    plain = {key: _plain(value) for key, value in settings.items() if value is not None}
    with atomic_open(path) as handle:
        handle.write("".join(f"# {line}\n" for line in comment.splitlines()))
        yaml.safe_dump(plain, handle, sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
