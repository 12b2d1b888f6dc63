"""NCNN: pnnx conversion, parity, export.py --ncnn rows, predict.py/stream.py --ncnn and benchmarks/device.py where torch
cannot be imported, damaged files (on the 32 px trained_run checkpoint)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from test_edge import NO_TORCH

from deploy.edge import CHECKSUM_KEY, file_sha256
from deploy.formats import ir_bytes
from deploy.ncnn_export import NcnnModule, layer_types
from deploy.ncnn_runtime import FLOAT16_OPTIONS
from deploy.onnx_export import PARITY_TOLERANCE, deploy_info
from models.factory import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.results import read_rows


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One export.py --ncnn --benchmark call; returns its output folder and stdout."""
    out = tmp_path_factory.mktemp("export")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_script("export.py", "--checkpoint", trained_run / "best.pt", "--out", out / "model.onnx", "--ncnn", "--benchmark",
                          "--runs", "3", "--workers", "0", "--output-dir", out / "runs")
    assert code == 0
    return {"out": out, "param": out / "model.ncnn.param", "stdout": stdout.getvalue()}


@pytest.fixture(scope="module")
def images(tiny_dataset: Path) -> Path:
    """A folder of images: the first class folder of the tiny dataset (4 JPEGs, 40 px)."""
    return next(folder for folder in sorted(tiny_dataset.glob("*/*")) if folder.is_dir())


def without_torch(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_pnnx_writes_an_fp32_ncnn_model_with_native_hard_activations_and_the_deploy_info(exported: dict, trained_run: Path) -> None:
    payload = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(payload).eval()
    types = layer_types(exported["param"])
    assert types["HardSwish"] > 0 and types["HardSigmoid"] > 0  # timm's hard activations as NCNN's own layers
    assert not {"Clip", "ReLU6", "BatchNorm"} & set(types)  # no chain of ops for them, BatchNorm folded
    assert types["Input"] == 1 and sum(types.values()) < 200
    weights = exported["out"] / "model.ncnn.bin"
    assert weights.stat().st_size > 3 * sum(p.numel() for p in model.parameters())  # float32 (4 bytes), not pnnx's fp16 default
    info = json.loads((exported["out"] / "model.ncnn.json").read_text())
    stored = info.pop(CHECKSUM_KEY)
    assert stored == {"param": file_sha256(exported["param"]), "bin": file_sha256(weights)}
    assert {**info, "operating_point": None} == {**deploy_info(payload["description"]), "operating_point": None}
    assert 0 <= info["operating_point"]["threshold"] <= 1
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ncnn_model = NcnnModule(exported["param"], 1)
    assert not any(getattr(ncnn_model.net.net.opt, option) for option in FLOAT16_OPTIONS)  # FP32 on every CPU, ARMv8.2 too
    with torch.inference_mode():
        assert (ncnn_model(x) - model(x)).abs().max() <= PARITY_TOLERANCE
    assert "ncnn-fp32 vs PyTorch: max |logit diff| random" in exported["stdout"]


def test_export_records_an_ncnn_row_and_a_benchmark_row(exported: dict) -> None:
    out = exported["out"]
    rows = {row["method"]: row for row in read_rows(out / "runs" / "results.csv")}
    assert set(rows) == {"onnx-fp32", "ncnn-fp32"}
    row = rows["ncnn-fp32"]
    assert row["checkpoint"] == str(exported["param"]) and float(row["latency_ms_1t"]) > 0
    assert float(row["file_mb"]) == round(ir_bytes(exported["param"]) / 2**20, 4)
    assert row["test_acc"] == rows["onnx-fp32"]["test_acc"]
    sidecar = json.loads((out / "model.ncnn.json").read_text())
    assert float(row["threshold"]) == pytest.approx(sidecar["operating_point"]["threshold"], abs=1e-6)
    artifacts = [line.split(",")[0] for line in (out / "benchmark.csv").read_text().splitlines()[1:]]
    assert artifacts == ["pytorch-eager-fp32", "onnxruntime-fp32", "ncnn-fp32"]


def test_predict_and_stream_ncnn_run_without_torch_and_give_the_onnx_classes(exported: dict, images: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--onnx", exported["out"] / "model.onnx", images, "--json", "--threads", "1") == 0
    onnx_predictions = json.loads(capsys.readouterr().out)
    done = without_torch("predict.py", "--ncnn", exported["param"], images, "--json", "--threads", "1")
    assert done.returncode == 0, done.stderr
    ncnn_predictions = json.loads(done.stdout)
    assert len(onnx_predictions) == len(ncnn_predictions) == 4
    for o, n in zip(onnx_predictions, ncnn_predictions):
        assert (o["path"], o["class"], o["defect"]) == (n["path"], n["class"], n["defect"])
        assert abs(o["confidence"] - n["confidence"]) <= 1e-5
    done = without_torch("stream.py", "--ncnn", exported["param"], "--source", images, "--benchmark")
    assert done.returncode == 0, done.stderr
    assert "4 frames (4 classified" in done.stdout and "torch imported: False" in done.stdout


def test_device_benchmark_runs_without_torch_and_scores_as_export_did(exported: dict) -> None:
    out = exported["out"]
    done = without_torch("benchmarks/device.py", out, "--runs", "3", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    output = done.stdout.splitlines()
    start = next(i for i, line in enumerate(output) if line.startswith("format "))  # info lines come before the table
    header, lines = output[start], output[start + 1:start + 3]
    assert header.split()[:8] == ["format", "file", "mb", "images", "accuracy", "defect_recall", "false_alarms", "threshold"]
    assert [line.split()[0] for line in lines] == ["ncnn-fp32", "onnxruntime-fp32"]
    with open(out / "device.csv", newline="") as handle:
        measured = {row["format"]: row for row in csv.DictReader(handle)}
    exported_rows = {row["method"]: row for row in read_rows(out / "runs" / "results.csv")}
    for device_format, method in (("onnxruntime-fp32", "onnx-fp32"), ("ncnn-fp32", "ncnn-fp32")):
        row, expected = measured[device_format], exported_rows[method]
        assert float(row["ms_1t"]) > 0 and float(row["fps_all"]) > 0
        # the held-out set is the whole (small) test split here: the device's figures are export.py's
        for device_key, results_key in (("accuracy", "test_acc"), ("defect_recall", "op_defect_recall"),
                                        ("false_alarms", "op_false_alarm_rate"), ("threshold", "threshold")):
            assert float(row[device_key]) == float(expected[results_key]), (device_format, device_key)
    assert "| ncnn-fp32 | model.ncnn.param |" in (out / "device.md").read_text()


def _damaged(folder: Path, model: dict) -> dict[str, tuple[Path, str]]:
    """name -> (.param to pass, what the error line says)."""
    files = {}
    for name in ("truncated", "zeroed", "no-bin", "garbage", "no-json", "bad-sum"):
        for suffix in (".param", ".bin", ".json"):
            shutil.copy(model["param"].with_suffix(suffix), folder / f"{name}{suffix}")
    weights = (folder / "truncated.bin").read_bytes()
    (folder / "truncated.bin").write_bytes(weights[:len(weights) // 2])
    (folder / "zeroed.bin").write_bytes(weights[:len(weights) // 2] + bytes(len(weights) - len(weights) // 2))  # ncnn loads it
    info = json.loads((folder / "bad-sum.json").read_text())
    (folder / "bad-sum.json").write_text(json.dumps({**info, CHECKSUM_KEY: "abc"}))
    (folder / "no-bin.bin").unlink()
    (folder / "garbage.param").write_text("not an ncnn graph\n")
    unverified = {key: value for key, value in json.loads((folder / "garbage.json").read_text()).items() if key != CHECKSUM_KEY}
    (folder / "garbage.json").write_text(json.dumps(unverified))  # without checksums ncnn's own check answers
    (folder / "no-json.json").unlink()
    files["truncated"] = (folder / "truncated.param", "no longer match the checksum")
    files["zeroed"] = (folder / "zeroed.param", "no longer match the checksum")
    files["bad-sum"] = (folder / "bad-sum.param", "not the SHA-256 of the .param and .bin")
    files["no-bin"] = (folder / "no-bin.param", "has no weights file 'no-bin.bin'")
    files["garbage"] = (folder / "garbage.param", "is not a readable NCNN param file")
    files["no-json"] = (folder / "no-json.param", "has no class names or preprocessing metadata")
    files["missing"] = (folder / "missing.param", "does not exist")
    return files


def test_damaged_ncnn_model_is_one_error_line(exported: dict, images: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    for name, (path, message) in _damaged(tmp_path, exported).items():
        assert run_script("predict.py", "--ncnn", path, images) == 2, name
        err = [line for line in capfd.readouterr().err.strip().splitlines()  # fd 2: ncnn's own C messages count too
               if "carries no checksum" not in line]
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (name, err)


def test_an_ncnn_model_without_checksums_runs_and_says_it_is_unverified(exported: dict, images: Path, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture) -> None:
    for suffix in (".param", ".bin", ".json"):
        shutil.copy(exported["param"].with_suffix(suffix), tmp_path / f"old{suffix}")
    info = json.loads((tmp_path / "old.json").read_text())
    del info[CHECKSUM_KEY]
    (tmp_path / "old.json").write_text(json.dumps(info))
    assert run_script("predict.py", "--ncnn", tmp_path / "old.param", images) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "checksum" in line]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0]


def test_device_benchmark_without_a_held_out_set_is_one_error_line(exported: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    shutil.copy(exported["out"] / "model.onnx", tmp_path / "model.onnx")
    assert run_script("benchmarks/device.py", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device_test.npz' does not exist" in err[0] and "--device-images" in err[0]
    (tmp_path / "device_test.npz").write_bytes(b"not an npz")
    assert run_script("benchmarks/device.py", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a held-out set written by export.py" in err[0]
    assert not (tmp_path / "device.csv").exists()
