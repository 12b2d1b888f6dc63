"""export.py: ONNX parity, INT8 ONNX, results rows, benchmark table (on the 32 px trained_run checkpoint)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_script

from deploy.inference import OnnxModule
from deploy.onnx_export import PARITY_TOLERANCE, read_deploy_info
from models.factory import model_from_checkpoint
from models.int8 import CalibrationWarning
from utils.checkpoint import load_checkpoint
from utils.results import read_rows

ARTIFACTS = ("pytorch-eager-fp32", "onnxruntime-fp32", "torchscript-fp32", "onnxruntime-int8")  # export.py's format table order


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One export.py call with every option; returns its output folder, ONNX paths and stdout."""
    out = tmp_path_factory.mktemp("export")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.warns(CalibrationWarning, match="calibrated on only 16 images"):
        code = run_script("export.py", "--checkpoint", trained_run / "best.pt", "--out", out / "model.onnx", "--int8",
                          "--torchscript", "--benchmark", "--runs", "5", "--calibration-images", "16", "--workers", "0",
                          "--output-dir", out / "runs")
    assert code == 0
    return {"out": out, "fp32": out / "model.onnx", "int8": out / "model.int8.onnx", "stdout": stdout.getvalue()}


@pytest.mark.slow
def test_onnx_matches_pytorch_at_any_batch_size(exported: dict, trained_run: Path) -> None:
    model = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    session, info = OnnxModule(exported["fp32"]), read_deploy_info(onnx.load(exported["fp32"]))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            assert (session(x) - model(x)).abs().max() <= PARITY_TOLERANCE
    assert info["img_size"] == 32 and len(info["class_names"]) == 11
    assert "onnx-fp32 vs PyTorch: max |logit diff| random" in exported["stdout"]
    assert onnx.load(exported["fp32"]).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_int8_onnx_is_quantised_runs_and_keeps_the_class_count(exported: dict) -> None:
    graph = onnx.load(exported["int8"])
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)
    model, info = OnnxModule(exported["int8"]), read_deploy_info(graph)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 11) and np.isfinite(logits.numpy()).all()
    assert info["class_names"][0] == "Normal"
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2


def test_results_rows_for_every_artifact(exported: dict) -> None:
    rows = {row["method"]: row for row in read_rows(exported["out"] / "runs" / "results.csv")}
    assert set(rows) == {"onnx-fp32", "onnx-int8", "torchscript-fp32"}
    torchscript = exported["fp32"].with_suffix(".torchscript.pt")
    for method, path in (("onnx-fp32", exported["fp32"]), ("onnx-int8", exported["int8"]), ("torchscript-fp32", torchscript)):
        assert rows[method]["checkpoint"] == str(path)
        assert float(rows[method]["latency_ms_1t"]) > 0 and 0 <= float(rows[method]["test_acc"]) <= 1
        assert float(rows[method]["file_mb"]) == round(path.stat().st_size / 2**20, 4)


def test_benchmark_prints_and_writes_a_row_per_artifact(exported: dict) -> None:
    table = exported["stdout"].split("artifact ", 1)[1]
    for artifact in ARTIFACTS:
        assert f"\n{artifact} " in table
    csv_rows = (exported["out"] / "benchmark.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_rows[1:]] == list(ARTIFACTS)
    assert "| onnxruntime-int8 |" in (exported["out"] / "benchmark.md").read_text()


def test_torchscript_file_matches_pytorch_and_carries_its_threshold(exported: dict, trained_run: Path) -> None:
    extra = {"deploy_info.json": ""}
    with pytest.warns(FutureWarning):  # torch 2.14 deprecates TorchScript; still the portable PyTorch deploy format
        scripted = torch.jit.load(str(exported["out"] / "model.torchscript.pt"), _extra_files=extra)
    point = json.loads(extra["deploy_info.json"])["operating_point"]
    assert 0 <= point["threshold"] <= 1 and point["budget"] == 0.05
    model = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert (scripted(x) - model(x)).abs().max() <= PARITY_TOLERANCE


def test_bad_checkpoint_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_script("export.py", "--checkpoint", tmp_path / "missing.pt") == 2
    assert "does not exist" in capsys.readouterr().err

