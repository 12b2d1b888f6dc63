"""Every numeric flag of every script refuses an out-of-range value in argparse: one line, exit 2, nothing written."""
from __future__ import annotations

import argparse
import functools
import re
import runpy
import sys
import typing
from collections.abc import Callable

import pytest
from conftest import ROOT, run_script

from utils.cli import (
    fraction,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    random_seed,
    training_batch_size,
    unit_fraction,
)

# Out-of-range values of the argument groups in engine/flags.py.
MODEL = {"--alpha": ("0", "-1")}
DATA = {"--synthetic-per-class": ("0",), "--synthetic-zoom": ("0.5",), "--img-size": ("0",), "--augment": ("4",),
        "--workers": ("-1", "100000")}
TRAINING = {"--epochs": ("0",), "--batch-size": ("0", "1"), "--patience": ("0",), "--lr": ("-1", "0", "nan"), "--lr-backbone": ("0",),
            "--weight-decay": ("-0.1", "inf"), "--label-smoothing": ("1",), "--warmup-epochs": ("-1",),
            "--clip-grad-norm": ("0", "-1")}
RUN = {"--seed": ("-1", str(2**32)), "--false-alarm-budget": ("0", "1", "nan")}

# script: (the other arguments it needs, {numeric flag: out-of-range values}); the guard below keeps this complete.
SCRIPTS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "main.py": ((), {**MODEL, **DATA, **TRAINING, **RUN}),
    "quantization-train.py": ((), {**MODEL, "--calib-batches": ("0",), "--qat-epochs": ("0",), "--qat-lr": ("-5e-5",),
                                   "--observer-epochs": ("0", "-1"), "--bn-freeze-epochs": ("-5",),
                                   "--max-drop": ("-1", "nan"), "--qat-temperature": ("0", "-1"), **DATA, **TRAINING, **RUN}),
    "prune.py": (("--checkpoint", "missing.pt", "--ratio", "0.5"),
                 {"--ratio": ("0", "1"), "--iterative-steps": ("0",), "--round-to": ("0",), "--finetune-epochs": ("0",),
                  **DATA, **TRAINING, **RUN}),
    "distill.py": (("--teacher", "missing.pt"), {"--temperature": ("0",), "--kd-weight": ("1.5", "-0.1"), **MODEL, **DATA,
                                                  **TRAINING, **RUN}),
    "export.py": (("--checkpoint", "missing.pt"), {"--calibration-images": ("0",), "--runs": ("0",), "--max-drop": ("-1", "nan"),
                                                    "--device-images": ("-1",),
                                                    **{flag: bad for flag, bad in DATA.items() if flag != "--augment"}, **RUN}),
    "predict.py": (("--onnx", "missing.onnx", "missing.jpg"), {"--top-k": ("0",), "--batch-size": ("0",), "--threads": ("0",),
                                                                "--threshold": ("-0.1", "1.5", "nan")}),
    "compare.py": ((), {"--img-size": ("0",)}),
    "stream.py": (("--onnx", "missing.onnx", "--source", "missing.mp4"),
                  {"--tile": ("0",), "--stride": ("0",), "--threshold": ("-0.1", "1.5", "nan"), "--consecutive": ("0",),
                   "--threads": ("0",), "--collect-band": ("0", "1", "nan"), "--collect-max": ("0",)}),
    "benchmarks/checkpoint_latency.py": (("missing-runs",), {"--img-size": ("0",), "--threads": ("0",), "--repeats": ("0",)}),
    "benchmarks/device.py": (("missing-folder",), {"--runs": ("0",), "--warmup": ("-1",)}),
    "benchmarks/feedback_loop.py": (("--out", "missing"), {"--seeds": ("-1",), "--collect-max": ("0",), "--epochs": ("0",),
                                                          "--lr": ("0", "nan")}),
    "benchmarks/serve_view.py": (("--onnx", "missing.onnx", "--out", "missing"),
                                 {"--frames": ("0",), "--rounds": ("-1",), "--viewers": ("0",), "--rss-minutes": ("-1",)}),
    "benchmarks/onnx_int8.py": (("--checkpoint", "missing.pt"), {"--runs": ("0",), "--calibration-images": ("0",)}),
    "benchmarks/train_throughput.py": ((), {"--img-size": ("0",), "--batch-size": ("0",), "--augment": ("4",), "--batches": ("0",),
                                            "--workers": ("-1",), "--threads": ("0",)}),
}
CASES = [(script, flag, value) for script, (_, flags) in SCRIPTS.items() for flag, values in flags.items() for value in values]
OUTPUT_FLAGS = ("--output-dir", "--out-dir")
ON_DISK = sorted(str(path.relative_to(ROOT)) for pattern in ("*.py", "benchmarks/*.py") for path in ROOT.glob(pattern))


@functools.cache
def parser_of(script: str) -> argparse.ArgumentParser | None:
    """The script's ``get_args_parser()`` (None for a script without one)."""
    build = runpy.run_path(str(ROOT / script), run_name="not_main").get("get_args_parser")
    return build() if build else None


def value_type(kind: Callable | None) -> object:
    """What a flag's ``type=`` yields: int/float themselves, or a validator's annotated return type."""
    if kind in (int, float) or kind is None or isinstance(kind, type):
        return kind
    return typing.get_type_hints(kind).get("return")


def numeric_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[-1]: action for action in parser._actions
            if action.option_strings and value_type(action.type) in (int, float)}


@pytest.mark.parametrize("script, flag, value", CASES, ids=[f"{s} {f}={v}" for s, f, v in CASES])
def test_out_of_range_value_is_refused_before_any_work(script, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default output folders are relative: they would land here too
    monkeypatch.setattr(sys, "path", [*sys.path])  # the benchmarks prepend the repository root
    required, _ = SCRIPTS[script]
    options = parser_of(script)._option_string_actions
    output = [arg for name in OUTPUT_FLAGS if name in options for arg in (name, str(tmp_path))]
    assert run_script(script, *required, f"{flag}={value}", *output) == 2  # "=": -5e-5 is no option
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert f"error: argument {flag}: " in line and value in line and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ON_DISK)
def test_every_numeric_flag_has_a_range_and_a_case(script):
    """A new int/float flag fails here until it gets a validator from utils/cli.py (or choices) and a row above."""
    parser = parser_of(script)
    flags = numeric_flags(parser) if parser else {}
    bare = [flag for flag, action in flags.items() if action.type in (int, float) and not action.choices]
    assert not bare, f"{script}: {bare} take any number: give them a type from utils/cli.py"
    assert set(flags) == set(SCRIPTS.get(script, ((), {}))[1])


@pytest.mark.parametrize("validator, text, value", [
    (positive_int, "1", 1), (non_negative_int, "0", 0), (random_seed, "0", 0), (random_seed, str(2**32 - 1), 2**32 - 1),
    (positive_float, "1e-9", 1e-9), (non_negative_float, "0", 0.0), (fraction, "0", 0.0), (fraction, "1", 1.0),
    (open_fraction, "1e-9", 1e-9),
    (unit_fraction, "0", 0.0), (training_batch_size, "2", 2),
])
def test_validators_accept_the_ends_of_their_ranges(validator, text, value):
    assert validator(text) == value


@pytest.mark.parametrize("validator, text, message", [
    (positive_int, "-1", "must be a positive integer, got -1"), (non_negative_int, "-1", "must be 0 or a positive integer, got -1"),
    (random_seed, str(2**32), f"must be in [0, {2**32 - 1}], got {2**32}"), (positive_float, "inf", "must be a positive number, got inf"),
    (non_negative_float, "-0.5", "must be 0 or a positive number, got -0.5"), (fraction, "nan", "must be in [0, 1], got nan"),
    (unit_fraction, "1", "must be in [0, 1), got 1"),
    (open_fraction, "0", "must be in (0, 1), got 0"), (open_fraction, "1", "must be in (0, 1), got 1"),
    (training_batch_size, "1", "must be at least 2 (BatchNorm trains on batch statistics), got 1"),
])
def test_validators_name_the_range(validator, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        validator(text)
