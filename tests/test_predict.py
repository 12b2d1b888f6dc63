"""predict.py: mixed folders (grayscale, RGBA, corrupt, non-image), JSON/CSV output, ONNX-only use, real samples."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, run_script
from PIL import Image

from utils.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def image_folder(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 JPEGs in a subfolder, a grayscale PNG, a large RGBA PNG, a corrupt .jpg and a text file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "line1").mkdir()
    for source in sorted(tiny_dataset.rglob("*.jpg"))[:2]:
        shutil.copy(source, folder / "line1" / source.name)
    Image.fromarray(np.full((50, 70), 128, np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(np.zeros((300, 200, 4), np.uint8), mode="RGBA").save(folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_json_lists_every_readable_image_and_warns_about_the_corrupt_one(trained_run: Path, image_folder: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--checkpoint", trained_run / "best.pt", image_folder, "--json") == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # stdout is nothing but the JSON array
    assert sorted(Path(r["path"]).name for r in rows) == sorted(["gray.png", "rgba.png",
                                                                 *(p.name for p in (image_folder / "line1").iterdir())])
    threshold = load_checkpoint(trained_run / "best.pt")["description"].operating_point["threshold"]
    for row in rows:
        assert set(row) == {"path", "class", "confidence", "defect", "defect_score"}
        assert isinstance(row["class"], str) and 0 <= row["confidence"] <= 1 and isinstance(row["defect"], bool)
        assert row["defect"] == (row["class"] != "Normal") == (row["defect_score"] >= threshold)
    assert "broken.jpg" in captured.err and "notes.txt" not in captured.err


def test_onnx_alone_gives_the_checkpoint_predictions_with_top_k_and_csv(trained_run: Path, image_folder: Path, onnx_file: Path,
                                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = {}
    for source in (("--checkpoint", trained_run / "best.pt"), ("--onnx", onnx_file)):
        assert run_script("predict.py", *source, image_folder, "--json", "--top-k", "3", "--csv", tmp_path / "p.csv") == 0
        results[source[0]] = json.loads(capsys.readouterr().out)
    for torch_row, onnx_row in zip(results["--checkpoint"], results["--onnx"]):
        assert torch_row["class"] == onnx_row["class"] and abs(torch_row["confidence"] - onnx_row["confidence"]) < 1e-4
        assert abs(torch_row["defect_score"] - onnx_row["defect_score"]) < 1e-4 and torch_row["defect"] == onnx_row["defect"]
        # the verdict names the class: the most likely one, or the most likely defect where the threshold flags a Normal top-1
        assert len(onnx_row["top_k"]) == 3 and onnx_row["top_k"][0]["confidence"] >= onnx_row["confidence"]
    with open(tmp_path / "p.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(results["--onnx"])


def test_plain_output_has_a_line_per_image_and_a_summary(onnx_file: Path, image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--onnx", onnx_file, image_folder / "gray.png") == 0
    out = capsys.readouterr().out
    assert "gray.png" in out and "1 images classified (0 skipped)" in out and "images/s" in out


def test_no_image_found_is_one_clear_error(onnx_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    assert run_script("predict.py", "--onnx", onnx_file, tmp_path) == 2
    assert capsys.readouterr().err.strip().endswith("files")
    assert run_script("predict.py", "--onnx", tmp_path / "readme.txt", tmp_path) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="the public StitchingNet samples are not beside the checkout")
def test_classifies_all_real_samples_in_one_call(onnx_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--onnx", onnx_file, SAMPLES, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len([p for p in SAMPLES.iterdir() if p.suffix.lower() == ".jpg"]) == 114
