"""The torch-free edge path: numpy/Pillow preprocessing equal to evaluation's, predict.py --onnx and stream.py
without torch, and stream verdicts identical to predict.py's on the same frames."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

from data.images import read_image, read_rgb
from data.transforms import Preprocess
from deploy import edge
from deploy.edge import normalise
from deploy.tiling import Box, cut_tiles
from models.factory import model_from_checkpoint
from utils.checkpoint import load_checkpoint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_TORCH = "import runpy, sys; sys.modules['torch'] = sys.modules['timm'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 12-frame 96x64 MPEG-4 video of textured seams, and the same frames as decoded by OpenCV saved as PNGs."""
    folder = tmp_path_factory.mktemp("frames")
    video = folder / "seam.mp4"
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for i in range(12):
        base = np.array([i * 23 % 256, (i * 57 + 80) % 256, (255 - i * 19) % 256])
        writer.write(np.clip(base + rng.normal(0, 30, (64, 96, 3)), 0, 255).astype(np.uint8))
    writer.release()
    capture, pngs = cv2.VideoCapture(str(video)), folder / "png"
    pngs.mkdir()
    index = 0
    while (read := capture.read())[0]:
        cv2.imwrite(str(pngs / f"frame_{index:06d}.png"), read[1])
        index += 1
    assert index == 12
    return {"video": video, "pngs": pngs}


@pytest.mark.parametrize("shape, suffix", [((61, 97, 3), ".jpg"), ((200, 300, 3), ".png"), ((32, 32, 3), ".png"), ((40, 50), ".png")])
def test_edge_preprocessing_equals_evaluation(tmp_path: Path, shape: tuple[int, ...], suffix: str) -> None:
    """Pillow decode + bilinear resize + normalisation, cut from a BGR frame as stream.py does = data.images + Preprocess."""
    path = tmp_path / f"image{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)).save(path)
    reference = Preprocess(MEAN, STD)(np.array(read_image(path, 32))).numpy()
    frame = read_rgb(path)[..., ::-1]  # BGR, as every stream source yields
    tile = cut_tiles(frame, [Box(0, 0, frame.shape[1], frame.shape[0])], 32)
    assert np.array_equal(tile[0], read_image(path, 32))
    assert np.abs(normalise(tile, MEAN, STD)[0] - reference).max() <= 1e-5


def test_edge_classifier_matches_pytorch(onnx_file: Path, trained_run: Path) -> None:
    payload = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(payload).eval()
    classifier = edge.EdgeClassifier(onnx_file, threads=1)
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = model(torch.stack([Preprocess(classifier.info["mean"], classifier.info["std"])(i) for i in images])).softmax(1)
    assert np.abs(classifier(images) - expected.numpy()).max() < 1e-5


def test_stream_verdicts_equal_predict_on_the_same_frames(onnx_file: Path, frames: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--onnx", onnx_file, frames["pngs"], "--json") == 0
    predicted = json.loads(capsys.readouterr().out)
    for source in (frames["video"], frames["pngs"]):
        assert run_script("stream.py", "--onnx", onnx_file, "--source", source, "--jsonl", tmp_path / "out.jsonl") == 0
        streamed = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        (tmp_path / "out.jsonl").unlink()
        assert len(streamed) == len(predicted) == 12
        for p, s in zip(predicted, streamed):
            assert Path(p["path"]).name == f"frame_{s['frame']:06d}.png"
            assert (p["class"], p["defect"]) == (s["class"], s["verdict"] == "defect")
            assert abs(p["confidence"] - s["confidence"]) <= 1e-5


def test_predict_onnx_and_stream_run_where_torch_cannot_be_imported(onnx_file: Path, frames: dict[str, Path]) -> None:
    for script, args in (("predict.py", [frames["pngs"], "--json"]),
                         ("stream.py", ["--source", frames["video"], "--benchmark"])):
        done = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), "--onnx", str(onnx_file), *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        if script == "predict.py":
            assert len(json.loads(done.stdout)) == 12
        else:
            assert "12 frames (12 classified" in done.stdout and "torch imported: False" in done.stdout
