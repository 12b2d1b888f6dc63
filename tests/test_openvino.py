"""OpenVINO IR export (FP32 and NNCF INT8), reload in a fresh process, predict.py/stream.py --openvino, bad input
(on the 32 px trained_run checkpoint)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import openvino.opset13 as opset
import pytest
import torch
from conftest import ROOT, run_in_fresh_process, run_script
from test_edge import NO_TORCH

from deploy.edge import METADATA_KEY
from deploy.formats import ir_bytes
from deploy.onnx_export import PARITY_TOLERANCE, deploy_info, read_deploy_info
from deploy.openvino_export import export_openvino, hard_sigmoid_as_hsigmoid, quantize_openvino
from deploy.openvino_runtime import compile_ir
from models.factory import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.results import read_rows

# Reads inputs.npy, writes <name>.npy with the logits of each IR given, at 1 thread; imports neither torch nor timm.
RELOAD = "import sys; sys.modules['torch'] = sys.modules['timm'] = None; import numpy as np; " \
         "from deploy.openvino_runtime import compile_ir, read_ir; folder = sys.argv[1]; x = np.load(folder + '/inputs.npy')\n" \
         "for name in sys.argv[2:]: np.save(f'{folder}/{name}.npy', compile_ir(read_ir(f'{folder}/{name}.xml')[0], 1)(x)[0])"


# Compiles one tiny IR twice, frees the older first, then takes a Ctrl-C; imports neither torch nor timm.
FREED_IN_ORDER = "import signal, sys; sys.modules['torch'] = sys.modules['timm'] = None; import numpy as np; " \
                 "import openvino as ov, openvino.opset13 as ops; from deploy.openvino_runtime import compile_ir\n" \
                 "x = ops.parameter([1, 4], np.float32, name='input'); model = ov.Model([ops.relu(x)], [x])\n" \
                 "first, second = compile_ir(model, 1), compile_ir(model, 1); del first, second\n" \
                 "try: signal.raise_signal(signal.SIGINT)\nexcept KeyboardInterrupt: pass\nelse: sys.exit('no KeyboardInterrupt')"


def test_compiled_irs_freed_in_any_order_leave_the_process_able_to_take_a_signal() -> None:
    """Each ov.Core loads its own CPU plugin, which swaps the thread's alternate signal stack for its own and puts back
    the one it found when unloaded: two Cores' plugins unloaded oldest first left a freed stack, and the next signal
    (Ctrl-C, SIGCHLD, faulthandler's SIGSEGV) killed the process with SIGSEGV and no Python frame. One Core, one plugin."""
    run_in_fresh_process(FREED_IN_ORDER)


@pytest.fixture(scope="module")
def irs(onnx_file: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FP32 and INT8 IRs of the tiny model written by the export functions, with the logits of the models in memory."""
    folder = tmp_path_factory.mktemp("openvino")
    payload = load_checkpoint(trained_run / "best.pt")
    info = deploy_info(payload["description"])
    calibration = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    fp32 = export_openvino(onnx_file, folder / "model.xml")
    int8 = quantize_openvino(fp32, info, folder / "model.int8.xml", calibration)
    inputs = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.save(folder / "inputs.npy", inputs)
    return {"folder": folder, "info": info, "inputs": inputs, "model": model_from_checkpoint(payload).eval(),
            "in_memory": {name: compile_ir(model, 1)(inputs)[0] for name, model in (("model", fp32), ("model.int8", int8))}}


def test_irs_reload_in_a_fresh_process_with_the_exported_outputs(irs: dict) -> None:
    folder = irs["folder"]
    run_in_fresh_process(RELOAD, folder, "model", "model.int8")
    with torch.inference_mode():
        pytorch = irs["model"](torch.from_numpy(irs["inputs"])).numpy()
    fp32, int8 = np.load(folder / "model.npy"), np.load(folder / "model.int8.npy")
    assert np.abs(fp32 - pytorch).max() <= PARITY_TOLERANCE
    assert np.array_equal(fp32, irs["in_memory"]["model"])
    assert np.array_equal(int8, irs["in_memory"]["model.int8"])  # the INT8 file is the model NNCF made, bit for bit
    assert not np.array_equal(int8, fp32)


def test_irs_carry_the_deploy_info_and_int8_is_quantised(irs: dict) -> None:
    core = ov.Core()
    fp32, int8 = (core.read_model(irs["folder"] / name) for name in ("model.xml", "model.int8.xml"))
    for model in (fp32, int8):
        assert json.loads(model.get_rt_info([METADATA_KEY]).astype(str)) == irs["info"]
        assert [p.get_any_name() for p in model.inputs] == ["input"] and model.inputs[0].get_partial_shape()[0].is_dynamic
    assert not any(op.get_type_name() == "FakeQuantize" for op in fp32.get_ops())
    assert any(op.get_type_name() == "FakeQuantize" for op in int8.get_ops())
    params = sum(p.numel() for p in irs["model"].parameters())
    # float32 weights (4 bytes each, less the folded BatchNorms), not ov.save_model's default FP16 (2 bytes each)
    assert (irs["folder"] / "model.bin").stat().st_size > 3 * params
    # int8 weights everywhere but in the squeeze-excite blocks, which NNCF leaves float (about a tenth of the weights)
    assert ir_bytes(irs["folder"] / "model.int8.xml") < 0.6 * ir_bytes(irs["folder"] / "model.xml")


def test_the_squeeze_excite_gate_is_hsigmoid_so_nncf_leaves_it_float(irs: dict) -> None:
    """ONNX's HardSigmoid(1/6, 1/2) becomes OpenVINO's HSigmoid, which NNCF's squeeze-excite pattern recognises."""
    core = ov.Core()
    gates = sum(type(m).__name__ == "SqueezeExcite" for m in irs["model"].modules())
    for name in ("model.xml", "model.int8.xml"):
        ops = [op.get_type_name() for op in core.read_model(irs["folder"] / name).get_ops()]
        assert ops.count("HSigmoid") == gates > 0 and "HardSigmoid" not in ops, name


def test_a_hard_sigmoid_of_other_slope_stays() -> None:
    x = opset.parameter([1, 4], np.float32)
    gates = [opset.hard_sigmoid(x, np.float32(alpha), np.float32(0.5)) for alpha in (1 / 6, 0.2)]
    model = ov.Model([gate.output(0) for gate in gates], [x])
    assert hard_sigmoid_as_hsigmoid(model) == 1
    assert sorted(op.get_type_name() for op in model.get_ops() if "igmoid" in op.get_type_name()) == ["HSigmoid", "HardSigmoid"]
    values = np.linspace(-4, 4, 4, dtype=np.float32)[None]
    hsigmoid, other = compile_ir(model, 1)(values).values()
    np.testing.assert_allclose(hsigmoid, np.clip(values / 6 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(other, np.clip(values * 0.2 + 0.5, 0, 1), atol=1e-6)


@pytest.fixture(scope="module")
def images(tiny_dataset: Path) -> Path:
    """A folder of images: the first class folder of the tiny dataset (4 JPEGs, 40 px)."""
    return next(folder for folder in sorted(tiny_dataset.glob("*/*")) if folder.is_dir())


def test_predict_openvino_gives_the_onnx_classes(irs: dict, onnx_file: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_script("predict.py", "--onnx", onnx_file, images, "--json", "--threads", "1") == 0
    onnx_predictions = json.loads(capsys.readouterr().out)
    assert run_script("predict.py", "--openvino", irs["folder"] / "model.xml", images, "--json", "--threads", "1") == 0
    openvino_predictions = json.loads(capsys.readouterr().out)
    assert len(onnx_predictions) == len(openvino_predictions) > 0
    for o, v in zip(onnx_predictions, openvino_predictions):
        assert (o["path"], o["class"], o["defect"]) == (v["path"], v["class"], v["defect"])
        assert abs(o["confidence"] - v["confidence"]) <= 1e-5


def test_predict_and_stream_openvino_run_where_torch_cannot_be_imported(irs: dict, images: Path) -> None:
    xml = str(irs["folder"] / "model.int8.xml")
    for script, args in (("predict.py", [images, "--json"]), ("stream.py", ["--source", images, "--benchmark"])):
        done = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), "--openvino", xml, *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        count = len(list(images.iterdir()))
        if script == "predict.py":
            assert len(json.loads(done.stdout)) == count
        else:
            assert f"{count} frames ({count} classified" in done.stdout and "torch imported: False" in done.stdout


def _bad_files(folder: Path, onnx_file: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error line says)."""
    garbage = folder / "garbage.xml"
    garbage.write_text("<net>not an IR")
    bare = folder / "bare.xml"
    ov.save_model(ov.convert_model(onnx_file), bare, compress_to_fp16=False)  # an IR without the toolkit's rt_info
    return {"missing": (folder / "missing.xml", "does not exist"), "garbage": (garbage, "is not a readable OpenVINO IR"),
            "onnx": (onnx_file, "is not an OpenVINO IR"), "no metadata": (bare, "has no class names")}


def test_bad_openvino_file_is_one_error_line(onnx_file: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, (path, message) in _bad_files(tmp_path, onnx_file).items():
        assert run_script("predict.py", "--openvino", path, images) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (name, err)


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One export.py --openvino --int8 --benchmark run in its own process, as a user runs it (NNCF, OpenVINO and the
    benchmark's threads start from a fresh process); returns its output folder and stdout."""
    out = tmp_path_factory.mktemp("export")
    done = subprocess.run([sys.executable, "export.py", "--checkpoint", str(trained_run / "best.pt"), "--out", str(out / "model.onnx"),
                           "--openvino", "--int8", "--benchmark", "--runs", "5", "--calibration-images", "16", "--workers", "0",
                           "--output-dir", str(out / "runs")], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"out": out, "stdout": done.stdout}


@pytest.mark.slow
def test_export_openvino_scores_records_and_benchmarks_both_irs(exported: dict) -> None:
    out = exported["out"]
    rows = {row["method"]: row for row in read_rows(out / "runs" / "results.csv")}
    assert set(rows) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    for method, name in (("openvino-fp32", "model.xml"), ("openvino-int8", "model.int8.xml")):
        assert rows[method]["checkpoint"] == str(out / name)
        assert float(rows[method]["file_mb"]) == round(ir_bytes(out / name) / 2**20, 4)
        assert float(rows[method]["latency_ms_1t"]) > 0 and 0 <= float(rows[method]["test_acc"]) <= 1
        assert len(list((out / "runs" / "export").glob(f"*/{method}/metrics.json"))) == 1
    assert rows["openvino-fp32"]["test_acc"] == rows["onnx-fp32"]["test_acc"]
    assert "openvino-fp32 vs PyTorch: max |logit diff| random" in exported["stdout"]
    assert "openvino-int8 vs PyTorch" in exported["stdout"]
    artifacts = [line.split(",")[0] for line in (out / "benchmark.csv").read_text().splitlines()[1:]]
    assert artifacts == ["pytorch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8"]


def _artifact_threshold(path: Path) -> float:
    """The operating point's threshold read the way the device reads it (ONNX metadata or IR rt_info)."""
    if path.suffix == ".xml":
        info = json.loads(ov.Core().read_model(path).get_rt_info([METADATA_KEY]).astype(str))
    else:
        info = read_deploy_info(onnx.load(path, load_external_data=False))
    return info["operating_point"]["threshold"]


@pytest.mark.slow
def test_each_artifact_carries_its_own_threshold_to_predict_and_stream_without_torch(exported: dict, images: Path,
                                                                                    trained_run: Path) -> None:
    out = exported["out"]
    rows = {row["method"]: row for row in read_rows(out / "runs" / "results.csv")}
    checkpoint_point = load_checkpoint(trained_run / "best.pt")["description"].operating_point
    assert checkpoint_point is not None and 0 <= checkpoint_point["threshold"] <= 1
    for method, name in (("onnx-fp32", "model.onnx"), ("onnx-int8", "model.int8.onnx"), ("openvino-fp32", "model.xml"),
                         ("openvino-int8", "model.int8.xml")):
        threshold = _artifact_threshold(out / name)
        assert float(rows[method]["threshold"]) == pytest.approx(threshold, abs=1e-6)
        assert float(rows[method]["false_alarm_budget"]) == 0.05 and float(rows[method]["op_false_alarm_se"]) >= 0
        (metrics,) = (out / "runs" / "export").glob(f"*/{method}/metrics.json")
        assert json.loads(metrics.read_text())["operating_point"]["threshold"] == threshold
        runtime = "--openvino" if name.endswith(".xml") else "--onnx"
        for script, args in (("predict.py", [images, "--json"]), ("stream.py", ["--source", images])):
            done = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), runtime, str(out / name), *map(str, args)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "carries no defect threshold" not in done.stderr
            if script == "predict.py":
                verdicts = [(p["defect_score"], p["defect"]) for p in json.loads(done.stdout)]
            else:
                verdicts = [(line["defect_probability"], line["verdict"] == "defect") for line in map(json.loads, done.stdout.splitlines())]
            assert len(verdicts) == len(list(images.iterdir()))
            assert all(defect == (score >= threshold) for score, defect in verdicts), (method, script, threshold, verdicts)


def test_threshold_flag_overrides_the_stored_one(onnx_file: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    for threshold, expected in (("0", True), ("1", False)):
        assert run_script("predict.py", "--onnx", onnx_file, images, "--json", "--threshold", threshold) == 0
        predictions = json.loads(capsys.readouterr().out)
        assert all(p["defect"] is expected and (p["class"] != "Normal") is expected for p in predictions)
