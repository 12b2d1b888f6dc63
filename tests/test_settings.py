"""One resolver decides a run's settings: recipes (--config), config.yaml per run, and every flag a run would ignore
or that contradicts a given checkpoint refused in one line (exit 2) before anything is written."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_TRAIN, run_script

from engine.config import CHECKPOINT_PINS, resolve
from utils.checkpoint import load_checkpoint
from utils.cli import add_config_arg, parse_command_line
from utils.results import read_rows


def parser_of(script: str):
    parser = runpy.run_path(str(ROOT / script), run_name="not_main")["get_args_parser"]()
    add_config_arg(parser)
    return parser


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return [line for line in text.splitlines() if line.startswith("error:") or ": error:" in line]


def write_recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_recipe_sets_defaults_and_typed_flags_override_it(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"img-size": 48, "fabrics": ["a", "B"], "synthetic": True, "lr": 0.01,
                                                "pretrained": False, "add_data": "reviewed"})
    args = parse_command_line(parser_of("main.py"), ["--config", str(recipe), "--img-size", "64", "--add-data", "more"])
    assert (args.img_size, args.fabrics, args.synthetic, args.lr, args.pretrained) == (64, ["A", "B"], True, 0.01, False)
    assert args.add_data == ["reviewed", "more"]  # a repeatable flag adds to the recipe's
    assert {"img_size", "fabrics", "synthetic", "lr", "pretrained", "add_data"} <= args.explicit
    assert "epochs" not in args.explicit and args.epochs == 100


def test_a_required_flag_may_come_from_the_recipe(tmp_path, trained_run):
    recipe = write_recipe(tmp_path / "r.yaml", {"checkpoint": str(trained_run / "best.pt"), "ratio": 0.5})
    args = parse_command_line(parser_of("prune.py"), ["--config", str(recipe)])
    assert args.checkpoint == str(trained_run / "best.pt") and args.ratio == 0.5


@pytest.mark.parametrize("values, expected", [
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"img_size": -3}, "img_size: must be a positive integer"),
    ({"synthetic": "yes"}, "synthetic: must be true or false"),
    ({"augment": 7}, "augment: 7 is not one of"),
])
def test_a_bad_recipe_is_one_line_naming_the_key(values, expected, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", values)
    assert run_script("main.py", "--config", recipe, "--output-dir", tmp_path / "runs") == 2
    (line,) = error_lines(capsys)
    assert expected in line and "r.yaml" in line
    assert not (tmp_path / "runs").exists()


def test_a_missing_or_unreadable_recipe_is_one_line(tmp_path, capsys):
    assert run_script("main.py", "--config", tmp_path / "none.yaml") == 2
    (line,) = error_lines(capsys)
    assert "none.yaml" in line
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert run_script("main.py", "--config", tmp_path / "list.yaml") == 2
    assert "mapping of flag names" in error_lines(capsys)[0]


BILLION_LAUGHS = "fabrics:\n- &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # a real flag's value: it would be joined
    f"- &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, expected", [
    (BILLION_LAUGHS, "anchors or aliases"),  # 9 * 5**8 = 3.5 million items if expanded
    ("epochs: 3\n" + "# padding\n" * 10_000, "larger than 64 KiB"),
])
def test_a_recipe_that_would_blow_up_is_refused_before_parsing(text, expected, tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(text)
    assert run_script("main.py", "--config", tmp_path / "bomb.yaml", "--output-dir", tmp_path / "runs") == 2
    (line,) = error_lines(capsys)
    assert expected in line and "bomb.yaml" in line
    assert not (tmp_path / "runs").exists()


def test_a_run_writes_its_settings_and_its_config_yaml_runs_it_again(tiny_dataset, tmp_path):
    first = tmp_path / "first"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "1", "--seed", "3",
                      "--output-dir", first) == 0
    (run_dir,) = (first / "main").iterdir()
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert settings["img_size"] == 32 and settings["seed"] == 3 and settings["data_root"] == str(tiny_dataset)
    assert not {"config", "explicit", "verbosity"} & set(settings)
    second = tmp_path / "second"
    assert run_script("main.py", "--config", run_dir / "config.yaml", "--output-dir", second) == 0
    (again,) = (second / "main").iterdir()
    (row,), (row_again,) = read_rows(first / "results.csv"), read_rows(second / "results.csv")
    assert row_again["test_acc"] == row["test_acc"] and row_again["test_loss"] == row["test_loss"]
    assert load_checkpoint(again / "best.pt")["description"].split == load_checkpoint(run_dir / "best.pt")["description"].split


# For each flag a checkpoint pins and no flag may change: a value the tiny real-data run's checkpoint contradicts.
CONTRADICTIONS = {"synthetic": ["--synthetic"], "synthetic_per_class": ["--synthetic-per-class", "3"],
                  "synthetic_zoom": ["--synthetic-zoom", "2"], "fabrics": ["--fabrics", "A"], "test_fabrics": ["--test-fabrics", "C"]}


CHECKPOINT_SCRIPTS = {
    "prune.py": ["--checkpoint", "{best}", "--ratio", "0.5"],
    "export.py": ["--checkpoint", "{best}"],
    "quantization-train.py": ["--checkpoint", "{best}", "--mode", "ptq"],
    "distill.py": ["--teacher", "{best}", "--epochs", "1"],
}


@pytest.mark.parametrize("script", CHECKPOINT_SCRIPTS)
def test_every_flag_a_checkpoint_pins_is_refused_when_it_contradicts_it(script, trained_run, tmp_path, capsys):
    """Walks the pins table: each pinned flag a script has, set against the checkpoint, is one error line."""
    pinned = [name for name, pin in CHECKPOINT_PINS.items() if not pin.may_change]
    flags = {action.dest for action in parser_of(script)._actions}
    assert set(pinned) == set(CONTRADICTIONS)
    base = [flag.format(best=trained_run / "best.pt") for flag in CHECKPOINT_SCRIPTS[script]]
    for name in sorted(set(pinned) & flags):
        assert run_script(script, *base, *CONTRADICTIONS[name], "--output-dir", tmp_path / "runs") == 2, name
        (line,) = error_lines(capsys)
        assert f"--{name.replace('_', '-')}" in line and "the given checkpoint decides" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, flags, expected", [
    ("export.py", ["--checkpoint", "{best}", "--amp"], "unrecognized arguments: --amp"),
    ("export.py", ["--checkpoint", "{best}", "--augment", "2"], "unrecognized arguments: --augment"),
    ("export.py", ["--checkpoint", "{best}", "--runs", "5"], "--runs: sets the --benchmark timing runs"),
    ("export.py", ["--checkpoint", "{best}", "--calibration-images", "5"], "--calibration-images: calibrates the INT8"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--epochs", "3"], "--epochs: the FP32 model comes from --checkpoint"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--model", "resnet18"], "--model: the FP32 model comes from"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--mode", "ptq", "--qat-epochs", "2"], "--qat-epochs: sets up QAT"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--mode", "qat", "--calib-batches", "2"], "--calib-batches: PTQ"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--qat-teacher", "none", "--qat-temperature", "2"],
     "--qat-temperature: softens a teacher"),
    ("quantization-train.py", ["--checkpoint", "{best}", "--no-compile"], "--compile: times the --api pt2e model"),
    ("main.py", ["--resume", "{last}", "--lr", "0.1"], "--lr: --resume continues the run with the settings it started"),
    ("main.py", ["--stats-only", "--epochs", "3"], "--epochs: --stats-only measures"),
    ("distill.py", ["--teacher", "{best}", "--student-checkpoint", "{best}", "--no-pretrained"], "--pretrained: --student-checkpoint"),
    ("distill.py", ["--teacher", "{best}", "--img-size", "48"], "--img-size 48"),
    ("main.py", ["--init", "{best}", "--pretrained"], "--pretrained: --init starts from the checkpoint's trained weights"),
    ("compare.py", ["--zoo", "mobilenetv3_small_050", "--sort", "acc"], "--sort: selects and orders results rows"),
    ("compare.py", ["{best}", "--img-size", "64"], "--img-size: the input size of --zoo's FLOPs"),
])
def test_a_flag_the_run_would_ignore_is_one_error_line(script, flags, expected, trained_run, tmp_path, capsys):
    args = [flag.format(best=trained_run / "best.pt", last=trained_run / "last.pt") for flag in flags]
    assert run_script(script, *args, *(["--output-dir", tmp_path / "runs"] if script != "compare.py" else [])) == 2
    (line,) = error_lines(capsys)
    assert expected in line, line
    assert not (tmp_path / "runs").exists()


def test_image_size_is_the_flag_else_the_checkpoint_else_224(trained_run):
    stored = load_checkpoint(trained_run / "best.pt")["description"]
    assert resolve({}).data.img_size == 224
    assert resolve({}, pinned=stored).data.img_size == 32 == resolve({}, start=stored).data.img_size
    assert resolve({"img_size": 48, "explicit": {"img_size"}}, pinned=stored).data.img_size == 48
    with pytest.raises(Exception, match="--img-size 48: the given checkpoint decides the image size"):
        resolve({"img_size": 48, "explicit": {"img_size"}}, pinned=stored, fixed=("img_size",))
