"""main.py --init (a new run from a trained checkpoint) and --add-data (reviewed images joined to the training split)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, run_script, write_image

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.results import read_rows


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reviewed collect folder: <class name>/<file>.png as stream.py --collect writes it, and its CSV."""
    folder = tmp_path_factory.mktemp("collect")
    rng = np.random.default_rng(3)
    for name, label, count in (("Normal", 0, 2), ("Broken stitch", 2, 3)):
        for i in range(count):
            write_image(folder / name / f"seam_f{i:06d}_t00.png", label, rng)
    (folder / "Puckering").mkdir()  # an empty class folder, as the collector leaves them
    (folder / "collected.csv").write_text("file,score\n")
    return folder


def one_run(out: Path) -> Path:
    (run_dir,) = (out / "main").iterdir()
    return run_dir


def test_init_starts_a_new_run_from_the_checkpoint_weights(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--init", trained_run / "best.pt", "--epochs", "1",
                      "--lr", "1e-12", "--lr-backbone", "1e-12", "--output-dir", out) == 0
    run_dir = one_run(out)
    before, after = (load_checkpoint(path)["model"] for path in (trained_run / "best.pt", run_dir / "best.pt"))
    weights = [key for key in before if key.endswith(".weight") and before[key].dim() > 1]  # conv/linear, not BatchNorm stats
    assert weights and all(torch.allclose(before[key], after[key], atol=1e-6) for key in weights)
    description = load_checkpoint(run_dir / "best.pt")["description"]
    assert description.args["init"] == str(trained_run / "best.pt") and description.pretrained
    assert description.operating_point is not None


def test_init_with_other_classes_is_one_error_line(trained_run: Path, tiny_dataset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    payload = load_checkpoint(trained_run / "best.pt")
    description = payload["description"]
    renamed = description.replace(class_names=[f"class {i}" for i in range(description.num_classes)])
    save_checkpoint(tmp_path / "other.pt", payload["model"], renamed)
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--init", tmp_path / "other.pt", "--epochs", "1",
                      "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]  # after the decoding bar: the data names the classes
    assert line.startswith("error: --init") and "same classes" in line and "Traceback" not in err
    assert not (tmp_path / "runs" / "main").exists()


@pytest.mark.parametrize("extra, message", [(("--resume", "x.pt"), "drop --resume and --weights"),
                                            (("--model", "resnet18"), "the architecture comes from the checkpoint")])
def test_init_refuses_flags_it_would_override(trained_run: Path, tiny_dataset: Path, tmp_path: Path, extra: tuple[str, ...],
                                              message: str, capsys: pytest.CaptureFixture) -> None:
    flags = [flag for flag in TINY_TRAIN if flag not in ("--model", "mobilenetv3_small_050")]
    assert run_script("main.py", *flags, "--data-root", tiny_dataset, "--init", trained_run / "best.pt", *extra,
                      "--output-dir", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_added_images_join_the_training_split_only(trained_run: Path, tiny_dataset: Path, reviewed: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--add-data", reviewed, "--epochs", "1",
                      "--output-dir", out) == 0
    split = json.loads((one_run(out) / "split.json").read_text())
    plain = json.loads((trained_run / "split.json").read_text())
    assert all(split[name] == plain[name] for name in ("train", "val", "test"))  # the same split as without them
    assert split["added"] == {str(reviewed.resolve()): sorted(["Broken stitch/seam_f000000_t00.png", "Broken stitch/seam_f000001_t00.png",
                                                               "Broken stitch/seam_f000002_t00.png", "Normal/seam_f000000_t00.png",
                                                               "Normal/seam_f000001_t00.png"])}
    (row,) = read_rows(out / "results.csv")
    assert row["dataset"] == "real+added"


def test_an_added_folder_with_an_unknown_class_is_one_error_line(tiny_dataset: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    write_image(tmp_path / "added" / "Loose button" / "a.png", 1, np.random.default_rng(0))
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--add-data", tmp_path / "added", "--epochs", "1",
                      "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Loose button" in err[0] and "--add-data" in err[0]
