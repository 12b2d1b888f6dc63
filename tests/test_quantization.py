"""quantization-train.py and models/quantize.py: PTQ + QAT end to end, INT8 reload, fusion, clear errors."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_fresh_process, run_script
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from models.factory import model_from_checkpoint
from models.int8 import CalibrationWarning, QuantizationError
from models.quantize import convert, load_quantized, prepare
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.results import read_rows

QUICK = ("--mode", "both", "--qat-epochs", "1", "--calib-batches", "2", "--batch-size", "16", "--workers", "0")


@pytest.fixture(scope="module")
def quantized_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of PTQ + 1-epoch QAT on the tiny checkpoint (32 px mobilenetv3_small_050)."""
    out = tmp_path_factory.mktemp("quantized")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fake quantisation is many small ops: extra threads only contend on a busy 2-core box
    try:
        with pytest.warns(CalibrationWarning, match="calibrated on only 32 images"):
            assert run_script("quantization-train.py", "--checkpoint", trained_run / "best.pt", *QUICK, "--output-dir", out) == 0
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = (out / "quantization").iterdir()
    return run_dir


@pytest.mark.slow
def test_ptq_and_qat_write_int8_artifacts_and_results_rows(quantized_run, trained_run):
    for name in ("int8_ptq.pt", "int8_ptq.torchscript.pt", "int8_qat.pt", "int8_qat.torchscript.pt", "summary.json",
                 "ptq/metrics.json", "qat/metrics.json", "qat/log.csv"):
        assert (quantized_run / name).is_file(), name
    rows = read_rows(quantized_run.parents[1] / "results.csv")
    assert [r["method"] for r in rows] == ["ptq", "qat"]
    fp32_mb = (trained_run / "best.pt").stat().st_size / 2**20
    fp32_acc = load_checkpoint(trained_run / "best.pt")["description"].metrics["acc"]
    for row in rows:
        assert (row["script"], row["model"], row["img_size"], row["dataset"]) == ("quantization", "mobilenetv3_small_050", "32", "real")
        assert float(row["file_mb"]) == pytest.approx((quantized_run / f"int8_{row['method']}.pt").stat().st_size / 2**20, abs=1e-3)
        assert float(row["file_mb"]) <= 0.4 * fp32_mb
        assert float(row["latency_ms_1t"]) > 0 and int(row["params"]) == 579_499
    assert abs(float(rows[0]["test_acc"]) - fp32_acc) <= 0.15  # 20 test images: PTQ flips at most 3 predictions
    assert rows[1]["epochs"] == "1"
    description = load_checkpoint(quantized_run / "int8_ptq.pt")["description"]
    assert description.quantization["calibration_images"] == 32
    # each INT8 model carries the threshold chosen on its own validation scores, as its row reports
    assert float(rows[0]["threshold"]) == pytest.approx(description.operating_point["threshold"], abs=1e-6)
    assert float(rows[0]["false_alarm_budget"]) == 0.05 and 0 <= float(rows[0]["op_false_alarm_rate"]) <= 1
    assert description.split == load_checkpoint(trained_run / "best.pt")["description"].split


RELOAD = """
import sys, torch
from models.quantize import load_quantized
run, x = sys.argv[1], torch.load(sys.argv[2])
with torch.inference_mode():
    outputs = {m: (load_quantized(f"{run}/int8_{m}.pt")(x), torch.jit.load(f"{run}/int8_{m}.torchscript.pt")(x)) for m in ("ptq", "qat")}
torch.save(outputs, sys.argv[3])
"""


@pytest.mark.slow
def test_int8_artifacts_reload_in_a_fresh_process_with_identical_outputs(quantized_run, tmp_path):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    run_in_fresh_process(RELOAD, quantized_run, tmp_path / "x.pt", tmp_path / "out.pt")
    fresh = torch.load(tmp_path / "out.pt")
    for method, (checkpoint, torchscript) in fresh.items():
        with torch.inference_mode():
            here = load_quantized(quantized_run / f"int8_{method}.pt")(x)
        assert torch.equal(checkpoint, torchscript) and torch.equal(checkpoint, here), method
        assert torch.isfinite(here).all()
    raw = torch.load(quantized_run / "int8_ptq.pt", map_location="cpu", weights_only=True)
    assert any(t.is_quantized for t in raw["model"].values() if isinstance(t, torch.Tensor))


def float_batch_norms(converted: torch.fx.GraphModule) -> list[str]:
    """Nodes of a converted graph that still run BatchNorm in float (should be none)."""
    found = []
    for node in converted.graph.nodes:
        if node.op == "call_module" and isinstance(converted.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            found.append(node.name)
        elif node.op in ("call_function", "call_method") and "batch_norm" in getattr(node.target, "__name__", str(node.target)):
            found.append(node.name)
    return found


def test_timm_batchnorm_act_is_fused_away(trained_run):
    """The known trap: naive prepare_fx leaves timm's BatchNormAct2d in float; the unfolding removes all."""
    fp32 = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    example = (torch.randn(4, 3, 32, 32),)
    naive = prepare_fx(copy.deepcopy(fp32), get_default_qconfig_mapping("x86"), example)
    naive(*example)
    assert len(float_batch_norms(convert_fx(naive))) >= 30
    prepared = prepare(fp32, "x86", 32)
    prepared(*example)
    assert float_batch_norms(convert(prepared, 32)) == []


def _conv_bn_relu6_net() -> nn.Module:
    """MobileNetV2-style stem and depthwise layer; BatchNorm scaled so that some activations pass 6 and clip."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    for norm in (net[1], net[4]):
        norm.weight.data.uniform_(1.0, 4.0)
    return net.eval()


@pytest.mark.parametrize("qat", [False, True])
def test_qnnpack_relu6_networks_stay_accurate(qat):
    """qnnpack's quantised relu6 is wrong on channels-last tensors; conv-bn-ReLU6 must fuse with a [0, 6] range instead."""
    net = _conv_bn_relu6_net()
    images = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        assert (net[:2](images) > 6).any(), "the test net must exercise the clipping at 6"
        reference = net(images)
        prepared = prepare(net, "qnnpack", 32, qat=qat).eval()  # eval: QAT BatchNorm uses its running statistics
        prepared(images)
        int8 = convert(prepared, 32)
        output = int8(images)
    kinds = {type(module).__name__ for module in int8.modules()}
    assert "ConvReLU2d" in kinds and not kinds & {"ReLU6", "Hardtanh"}
    assert (output - reference).norm() / reference.norm() < 0.05  # 0.011 here; the unfixed kernel gives 0.5


class DataDependentGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_module_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DataDependentGate())
    with pytest.raises(QuantizationError, match=r"module '1' \(DataDependentGate\) stops it"):
        prepare(model, "x86", 16)


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_give_one_clear_line(trained_run, quantized_run, tmp_path, capsys):
    best = trained_run / "best.pt"
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    payload = load_checkpoint(best)
    classes = [*payload["description"].class_names[:-1], "Unknown"]
    save_checkpoint(tmp_path / "classes.pt", payload["model"], payload["description"].replace(class_names=classes))
    cases = [
        (("--checkpoint", tmp_path / "missing.pt"), "does not exist"),
        (("--checkpoint", tmp_path / "other.pt"), "not a checkpoint of this project"),
        (("--checkpoint", quantized_run / "int8_ptq.pt"), "already INT8"),
        (("--checkpoint", tmp_path / "classes.pt"), "trained on"),
        (("--checkpoint", best, "--backend", "arm"), "choose one of x86, fbgemm, qnnpack"),
    ]
    for args, message in cases:
        assert run_script("quantization-train.py", *args, *QUICK, "--output-dir", tmp_path / "runs") == 2
        assert message in _error_line(capsys), args
    with pytest.raises(CheckpointError, match="FP32 checkpoint, not an INT8 one"):
        load_quantized(best)


def test_a_torch_without_fx_quantisation_is_one_line_naming_pt2e(trained_run, tmp_path, monkeypatch, capsys):
    """A future torch that removed torch.ao.quantization's FX graph mode: --api fx says what to use; PT2E still loads."""
    monkeypatch.setitem(sys.modules, "torch.ao.quantization.quantize_fx", None)  # what "import" then raises: ImportError
    monkeypatch.delitem(sys.modules, "models.quantize", raising=False)
    code = run_script("quantization-train.py", "--checkpoint", trained_run / "best.pt", "--mode", "ptq", "--workers", "0",
                      "--output-dir", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "no longer ships" in line and "--api pt2e" in line and "Traceback" not in err
    assert not (tmp_path / "quantization").exists()
    from models import quantize_pt2e  # the PT2E path does not need FX
    assert quantize_pt2e.API == "pt2e"
