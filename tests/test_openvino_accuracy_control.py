"""export.py --openvino --int8 --max-drop: NNCF INT8 with accuracy control, validated on the validation split (on the
32 px trained_run checkpoint)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from conftest import run_in_fresh_process, run_script, signal_stack_is_mapped
from test_openvino import RELOAD

from data.loading import SplitRequest, load_data
from data.transforms import Preprocess
from deploy.openvino_export import quantize_openvino, quantize_openvino_with_accuracy_control
from deploy.openvino_runtime import compile_ir, read_ir
from models.int8 import CalibrationWarning
from utils.checkpoint import load_checkpoint
from utils.results import read_rows


def accuracy(xml: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an IR file, computed here (not read from export.py's log or summary)."""
    logits = compile_ir(read_ir(xml)[0], 1)(np.ascontiguousarray(images, dtype=np.float32))[0]
    return float((logits.argmax(1) == labels).mean())


def test_accuracy_control_meets_the_bound_and_the_ir_reloads(tmp_path: Path) -> None:
    """A 3-layer CNN (so NNCF ranks 4 quantisers, not 80) whose INT8 misses FP32's class on 3 of 32 images; with
    max_drop 0 NNCF must put layers back into float until every validation image gets FP32's class."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO's converter traces with torch.jit
        fp32 = ov.convert_model(net, example_input=torch.zeros(1, 3, 32, 32))
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((32, 3, 32, 32)) + 2 * rng.standard_normal((32, 3, 1, 1))).astype(np.float32)
    labels = compile_ir(fp32, 1)(images)[0].argmax(1)  # FP32 is right on every image by construction
    calibration = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    info = {"class_names": list("abcde")}
    int8, report = quantize_openvino_with_accuracy_control(fp32, info, tmp_path / "model.int8.xml", calibration, images, labels, 0.0)
    assert signal_stack_is_mapped()  # NNCF's own OpenVINO Cores, loaded and dropped inside the call, left none unmapped
    plain = quantize_openvino(fp32, info, tmp_path / "plain.int8.xml", calibration)
    assert float((compile_ir(plain, 1)(images)[0].argmax(1) == labels).mean()) < 1  # without control INT8 loses images
    assert report["val_acc_fp32"] == 1.0 and report["val_acc"] == accuracy(tmp_path / "model.int8.xml", images, labels) == 1.0
    assert 0 < len(report["float_layers"]) <= report["quantizable_layers"] == 3 and report["max_drop"] == 0.0
    np.save(tmp_path / "inputs.npy", images)
    run_in_fresh_process(RELOAD, tmp_path, "model.int8")
    assert np.array_equal(np.load(tmp_path / "model.int8.npy"), compile_ir(int8, 1)(images)[0])  # the file is NNCF's model


@pytest.mark.parametrize("max_drop", [0.0])
def test_export_max_drop_holds_on_the_validation_split_and_is_recorded(trained_run: Path, tmp_path: Path, max_drop: float) -> None:
    out = tmp_path / "runs"
    with pytest.warns(CalibrationWarning, match="calibrated on only 16 images"):
        assert run_script("export.py", "--checkpoint", trained_run / "best.pt", "--out", tmp_path / "model.onnx", "--openvino",
                          "--int8", "--max-drop", max_drop, "--calibration-images", "16", "--workers", "0", "--output-dir", out) == 0
    description = load_checkpoint(trained_run / "best.pt")["description"]
    bundle = load_data(description.data_root, description.img_size, SplitRequest(description.seed, description.split),
                       class_names=description.class_names, progress=False)
    preprocess = Preprocess(description.mean, description.std)
    val = bundle.parts["val"]
    images = np.stack([preprocess(image).numpy() for image in val.images])
    fp32, int8 = (accuracy(tmp_path / name, images, val.labels) for name in ("model.xml", "model.int8.xml"))
    assert int8 >= fp32 - max_drop / 100
    (summary_file,) = (out / "export").glob("*/summary.json")
    control = json.loads(summary_file.read_text())["openvino-int8"]["accuracy_control"]
    assert control["max_drop"] == max_drop and control["val_images"] == len(val.labels)
    assert (control["val_acc_fp32"], control["val_acc"]) == pytest.approx((fp32, int8))
    assert len(control["float_layers"]) <= control["quantizable_layers"]
    methods = [row["method"] for row in read_rows(out / "results.csv")]
    assert methods == ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"]


@pytest.mark.parametrize("flags, message", [
    (("--max-drop", "1"), "error: --max-drop bounds the accuracy loss of the OpenVINO INT8 model: add --openvino --int8"),
    (("--max-drop", "1", "--int8"), "add --openvino --int8"),
    (("--max-drop", "1", "--openvino"), "add --openvino --int8"),
    (("--openvino", "--int8", "--max-drop=-1"), "error: argument --max-drop: must be 0 or a positive number, got -1"),
])
def test_bad_max_drop_is_one_error_line_before_any_work(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        flags: tuple[str, ...], message: str) -> None:
    assert run_script("export.py", "--checkpoint", trained_run / "best.pt", *flags, "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert message in line and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
