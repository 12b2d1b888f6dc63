"""models/quantize_pt2e.py and quantization-train.py --api pt2e: PT2E PTQ, its artifacts and their reload, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_in_fresh_process, run_script
from torch import nn

from models import quantize_pt2e
from models.factory import create_model, resolve_model
from models.int8 import CalibrationWarning, QuantizationError
from models.quantize import load_quantized
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.description import RunDescription
from utils.results import read_rows

SIZE = 32
QUICK = ("--api", "pt2e", "--calib-batches", "2", "--batch-size", "16", "--workers", "0")


@pytest.fixture(scope="module")
def fp32() -> nn.Module:
    torch.manual_seed(0)
    model, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 4 - 2


@pytest.fixture(scope="module")
def int8_models(fp32: nn.Module, images: torch.Tensor) -> dict[str, torch.fx.GraphModule]:
    """PT2E PTQ of the random-init model for each quantizer: x86 (X86InductorQuantizer), qnnpack (ArmInductorQuantizer)."""
    batches = [(images[i:i + 8], torch.zeros(8)) for i in range(0, len(images), 8)]
    models = {}
    for backend in ("x86", "qnnpack"):
        with pytest.warns(CalibrationWarning, match="calibrated on only 24 images"):
            models[backend], settings = quantize_pt2e.quantize_ptq(fp32, backend, SIZE, True, batches, 3, 24)
        assert (settings["api"], settings["calibration_images"]) == ("pt2e", 24)
        assert settings["quantizer"] == {"x86": "X86InductorQuantizer", "qnnpack": "ArmInductorQuantizer"}[backend]
    return models


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_converted_graph_quantizes_with_int8_weights(int8_models, fp32, backend):
    int8 = int8_models[backend]
    convs = sum(isinstance(m, nn.Conv2d) for m in fp32.modules())
    ops = quantize_pt2e.qdq_ops(int8)
    assert ops["quantize_per_tensor"] >= convs // 2 and ops["dequantize_per_tensor"] >= convs // 2, ops  # activations
    assert ops["dequantize_per_channel"] >= convs, ops  # per-channel weights (default), one per conv at least
    int8_weights = [v for v in int8.state_dict().values() if v.dtype == torch.int8]
    assert len(int8_weights) >= convs and all(v.dim() >= 2 for v in int8_weights)
    float_weights = [k for k, v in int8.state_dict().items() if v.is_floating_point() and v.dim() == 4]
    assert float_weights == [], "FP32 conv weights left beside their int8 copies"


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_int8_logits_close_to_fp32(int8_models, fp32, images, backend):
    with torch.inference_mode():
        reference, output = fp32(images), int8_models[backend](images)
    error = ((output - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.2, error  # about 0.1 here; a wrong scale or layout gives > 0.5


RELOAD = """
import sys, torch
from models.quantize_pt2e import load_quantized
folder, x = sys.argv[1], torch.load(sys.argv[2])
with torch.inference_mode():
    out = {"checkpoint": load_quantized(f"{folder}/x86.pt")(x), "program": torch.export.load(f"{folder}/x86.pt2").module()(x)}
torch.save(out, sys.argv[3])
"""


def test_artifacts_reload_in_a_fresh_process_with_equal_outputs(int8_models, tmp_path):
    """x86 checkpoint and .pt2 program in a fresh process; the qnnpack checkpoint's rebuild (same code) in this one."""
    payload = {"description": _description(), "model": _fp32_state()}
    for backend, int8 in int8_models.items():
        quantize_pt2e.save_quantized(tmp_path / f"{backend}.pt", int8, payload, {"backend": backend, "per_channel": True, "mode": "ptq"})
    quantize_pt2e.save_program(int8_models["x86"], tmp_path / "x86.pt2")
    raw = torch.load(tmp_path / "x86.pt", map_location="cpu", weights_only=True)  # plain data: no pickled modules
    assert raw["description"]["quantization"]["api"] == "pt2e"
    assert any(v.dtype == torch.int8 for v in raw["model"].values())
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    run_in_fresh_process(RELOAD, tmp_path, tmp_path / "x.pt", tmp_path / "out.pt")
    with torch.inference_mode():
        for kind, output in torch.load(tmp_path / "out.pt").items():
            assert torch.equal(output, int8_models["x86"](x)), kind
        assert torch.equal(quantize_pt2e.load_quantized(tmp_path / "qnnpack.pt")(x), int8_models["qnnpack"](x))
    with pytest.raises(CheckpointError, match="PT2E INT8 checkpoint"):
        load_quantized(tmp_path / "x86.pt")  # the FX loader names the right one


def test_cli_pt2e_ptq_writes_artifacts_row_and_summary(trained_run, tmp_path):
    with pytest.warns(CalibrationWarning, match="calibrated on only 32 images"):
        assert run_script("quantization-train.py", "--checkpoint", trained_run / "best.pt", *QUICK, "--mode", "ptq",
                          "--no-compile", "--output-dir", tmp_path) == 0
    (run_dir,) = (tmp_path / "quantization").iterdir()
    for name in ("int8_ptq.pt", "int8_ptq.pt2", "summary.json", "ptq/metrics.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "int8_qat.pt").exists() and not (run_dir / "int8_ptq.torchscript.pt").exists()
    (row,) = read_rows(tmp_path / "results.csv")
    assert (row["script"], row["method"], row["model"], row["img_size"]) == ("quantization", "ptq", "mobilenetv3_small_050", "32")
    assert float(row["latency_ms_1t"]) > 0
    assert float(row["file_mb"]) == pytest.approx((run_dir / "int8_ptq.pt").stat().st_size / 2**20, abs=1e-3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["api"] == "pt2e" and summary["ptq"]["api"] == "pt2e" and "eager" in summary["ptq"]["latency_timed"]
    assert float(row["test_acc"]) == pytest.approx(summary["ptq"]["test_acc"], abs=1e-4)
    settings = load_checkpoint(run_dir / "int8_ptq.pt")["description"].quantization
    assert (settings["api"], settings["quantizer"], settings["calibration_images"]) == ("pt2e", "X86InductorQuantizer", 32)
    fp32_acc = load_checkpoint(trained_run / "best.pt")["description"].metrics["acc"]
    assert abs(summary["ptq"]["test_acc"] - fp32_acc) <= 0.15  # 20 test images: PTQ flips at most 3 predictions


@pytest.mark.parametrize("flags, named", [
    (("--equalize",), "--equalize"),
    (("--bias-correction", "--max-drop", "1"), "--bias-correction, --max-drop"),
    (("--observer", "percentile"), "--observer percentile"),
])
def test_fx_only_options_with_pt2e_give_one_error_line(flags, named, tmp_path, capsys):
    code = run_script("quantization-train.py", "--checkpoint", tmp_path / "never-read.pt", *QUICK, *flags, "--output-dir", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "quantization").exists()  # refused before any work (the checkpoint is never opened)


def test_cli_pt2e_qat_distils_converts_and_reloads(trained_run, tmp_path):
    """--api pt2e --mode qat: torch.export in training mode, prepare_qat_pt2e, the shared loop with the FP32 model as
    teacher, convert; the checkpoint and the program reload to the same outputs."""
    assert run_script("quantization-train.py", "--checkpoint", trained_run / "best.pt", *QUICK[:2], "--mode", "qat",
                      "--qat-epochs", "1", "--observer-epochs", "1", "--bn-freeze-epochs", "0", "--batch-size", "16",
                      "--workers", "0", "--no-compile", "--output-dir", tmp_path) == 0
    (run_dir,) = (tmp_path / "quantization").iterdir()
    for name in ("int8_qat.pt", "int8_qat.pt2", "qat/log.csv", "qat/metrics.json"):
        assert (run_dir / name).is_file(), name
    (row,) = read_rows(tmp_path / "results.csv")
    assert (row["method"], row["epochs"]) == ("qat", "1")
    settings = load_checkpoint(run_dir / "int8_qat.pt")["description"].quantization
    assert (settings["api"], settings["mode"], settings["teacher"]) == ("pt2e", "qat", "self")
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        from_checkpoint = quantize_pt2e.load_int8(run_dir / "int8_qat.pt")(x)
        assert torch.equal(from_checkpoint, quantize_pt2e.load_program(run_dir / "int8_qat.pt2")(x))
    fp32_acc = load_checkpoint(trained_run / "best.pt")["description"].metrics["acc"]
    assert abs(float(row["test_acc"]) - fp32_acc) <= 0.15


def test_pt2e_qat_freezes_batchnorm_also_after_train():
    """The schedule's BatchNorm freeze must survive the loop's model.train() at the start of every epoch."""
    torch.manual_seed(0)
    model, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    prepared = quantize_pt2e.prepare(model, "x86", SIZE, qat=True)
    running_means = lambda: [b.clone() for n, b in prepared.named_buffers() if n.endswith("running_mean")]  # noqa: E731
    prepared.train()
    before = running_means()
    prepared(torch.randn(4, 3, SIZE, SIZE))
    assert any(not torch.equal(a, b) for a, b in zip(before, running_means()))  # training BatchNorm updates them
    quantize_pt2e.freeze_batchnorm(prepared)
    prepared.eval().train()
    frozen = running_means()
    prepared(torch.randn(4, 3, SIZE, SIZE))
    assert all(torch.equal(a, b) for a, b in zip(frozen, running_means()))


def test_qat_teacher_of_other_classes_is_one_error_line(trained_run, tmp_path, capsys):
    payload = load_checkpoint(trained_run / "best.pt")
    other = tmp_path / "other.pt"
    description = payload["description"].replace(class_names=[f"x{i}" for i in range(payload["description"].num_classes)])
    save_checkpoint(other, payload["model"], description)
    code = run_script("quantization-train.py", "--checkpoint", trained_run / "best.pt", "--mode", "qat", "--qat-teacher",
                      other, "--batch-size", "16", "--workers", "0", "--output-dir", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "--qat-teacher" in line and "same classes" in line and "Traceback" not in err


def test_unexportable_model_is_one_quantization_error_for_qat_too():
    with pytest.raises(QuantizationError, match="cannot be exported with torch.export") as failure:
        quantize_pt2e.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), DataDependentGate()), "x86", 16, qat=True)
    assert "\n" not in str(failure.value)


class DataDependentGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_unexportable_model_is_one_quantization_error():
    with pytest.raises(QuantizationError, match="cannot be exported with torch.export") as failure:
        quantize_pt2e.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), DataDependentGate()), "x86", 16)
    assert "\n" not in str(failure.value)


def _fp32_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = create_model(resolve_model("mobilenetv3_small_050"), 11, pretrained=False)
    return model.state_dict()


def _description() -> RunDescription:
    names = [f"class {i}" for i in range(11)]
    return RunDescription(
        script="main", method="fp32", model="mobilenetv3_small_050", family=None, alpha=None, num_classes=11, class_names=names,
        img_size=SIZE, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], pretrained=False, dataset="synthetic",
        data_root="", augment=0, seed=0, split={},
    )

