"""PTQ methods of models/quantize.py and quantization-train.py: observers, equalisation, bias correction, --max-drop."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_in_fresh_process, run_script
from torch.ao.nn import quantized as nnq

from models.factory import create_model, model_from_checkpoint, resolve_model
from models.int8 import DEFAULT_OBSERVER, calibrate
from models.quantize import (
    ACTIVATION_OBSERVERS,
    convert,
    correct_bias,
    equalize,
    fewest_float_units,
    float_units,
    prepare,
    save_quantized,
)
from utils.checkpoint import load_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def fp32(trained_run: Path) -> torch.nn.Module:
    return model_from_checkpoint(load_checkpoint(trained_run / "best.pt")).eval()


@pytest.fixture(scope="module")
def images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two calibration batches of 64 (above MIN_CALIBRATION_IMAGES: no warning)."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 3, SIZE, SIZE, generator=generator), torch.zeros(64)) for _ in range(2)]


def _calibrated(fp32: torch.nn.Module, images: list, backend: str = "x86", observer: str = DEFAULT_OBSERVER,
                equalized: bool = False) -> torch.fx.GraphModule:
    prepared = prepare(fp32, backend, SIZE, observer=observer)
    if equalized:
        equalize(prepared)
    calibrate(prepared, images, len(images), 0)
    return prepared


def _qparams(converted: torch.fx.GraphModule) -> dict[str, float]:
    """Every activation scale and zero point of an INT8 graph (quantised modules and quantize nodes)."""
    return {k: float(v) for k, v in converted.state_dict().items() if k.endswith(("scale", "zero_point")) and v.numel() == 1}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_each_observer_changes_the_activation_qparams(fp32, images, backend):
    default = _qparams(convert(_calibrated(fp32, images, backend), SIZE))
    assert len(default) > 50
    for observer in set(ACTIVATION_OBSERVERS) - {DEFAULT_OBSERVER}:
        other = _qparams(convert(_calibrated(fp32, images, backend, observer=observer), SIZE))
        assert other.keys() == default.keys()
        differing = sum(other[k] != default[k] for k in default)
        assert differing > len(default) // 4, (observer, differing)


def test_equalization_changes_weights_but_not_the_fp32_function(fp32, images):
    prepared = prepare(fp32, "x86", SIZE)  # BatchNorm folded; eval-mode observers only watch
    x = images[0][0]
    weights = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("weight")}
    with torch.inference_mode():
        before = prepared(x)
    assert equalize(prepared) >= 4  # the ReLU blocks of mobilenetv3_small_050
    changed = [k for k, v in prepared.state_dict().items() if k in weights and not torch.equal(v, weights[k])]
    with torch.inference_mode():
        after = prepared(x)
    assert len(changed) >= 8
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)


def test_bias_correction_reduces_the_mean_output_error(fp32, images):
    prepared = _calibrated(fp32, images)
    int8 = convert(prepared, SIZE)
    x = torch.cat([batch for batch, _ in images])
    with torch.inference_mode():
        reference = fp32(x)
        before = (int8(x) - reference).mean(0).abs().mean()
        quantised = sum(isinstance(module, (nnq.Conv2d, nnq.Linear)) for module in int8.modules())
        assert correct_bias(int8, prepared, images, len(images)) == quantised > 0
        after = (int8(x) - reference).mean(0).abs().mean()
    assert after < before


UNITS = [[f"block{i}"] for i in range(6)]
GAIN = {"block0": 0.01, "block1": 0.0, "block2": 0.05, "block3": 0.02, "block4": 0.0, "block5": 0.03}  # per unit floated


def accuracy_with_float(names: list[str]) -> float:
    return 0.8 + sum(GAIN[name] for name in names)


def test_fewest_float_units_adds_the_unit_that_helps_most_until_the_target():
    evaluated = []

    def accuracy(names: list[str]) -> float:
        evaluated.append(names)
        return accuracy_with_float(names)

    model, names, acc = fewest_float_units(UNITS, list, accuracy, target=0.88)
    assert names == ["block2", "block5"] and model == names and acc == pytest.approx(0.88)
    assert len(evaluated) == 1 + 6 + 5  # all INT8, then every remaining unit per step
    assert fewest_float_units(UNITS, list, accuracy, target=0.8)[1] == []
    assert sorted(fewest_float_units(UNITS, list, accuracy, target=0.99)[1]) == sorted(GAIN)  # bound missed: all float


def test_fewest_float_units_warns_when_most_of_the_model_stays_float(caplog):
    with caplog.at_level(logging.WARNING, logger="models.quantize"):
        assert len(fewest_float_units(UNITS, list, accuracy_with_float, target=0.90)[1]) == 3  # half: no warning
        assert not caplog.records
        assert len(fewest_float_units(UNITS, list, accuracy_with_float, target=0.91)[1]) == 4
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["4 of 6 units stay in float to reach 0.9100"]


def test_float_units_are_blocks_with_weightless_modules_joined(fp32):
    units = float_units(fp32)
    assert units[0] == ["conv_stem", "bn1"]  # the stem's activation goes with its conv
    assert ["blocks.0.0"] in units and ["blocks.1.0"] in units  # timm blocks, not their layers
    assert units[-1] == ["classifier"]
    names = [name for unit in units for name in unit]
    assert len(names) == len(set(names)) and "global_pool" in names


def test_a_float_block_floats_its_activations_but_keeps_qnnpack_relu6_convs(fp32, images):
    relu6_model = create_model(resolve_model("mobilenetv2_050"), 11, pretrained=False)[0].eval()
    prepared = _calibrated(relu6_model, images, "qnnpack")
    block = "blocks.1.0"
    relu6_inside = [conv for conv in prepared.meta["relu6_convs"] if conv.startswith(f"{block}.")]
    assert relu6_inside
    int8 = convert(prepared, SIZE, [block])
    inside = {name: type(module).__module__ for name, module in int8.named_modules() if name.startswith(f"{block}.")}
    assert all(inside[conv].startswith("torch.ao.nn.intrinsic.quantized") for conv in relu6_inside)
    assert any(not kind.startswith("torch.ao.nn") for name, kind in inside.items() if name not in relu6_inside)
    mv3 = convert(_calibrated(fp32, images, "qnnpack"), SIZE, ["blocks.2.0"])
    float_ops = [node for node in mv3.graph.nodes if node.op == "call_module" and node.target.startswith("blocks.2.0.")
                 and type(mv3.get_submodule(node.target)).__module__.startswith("torch.nn.modules.activation")]
    assert float_ops  # hardswish inside the block runs in float


RELOAD = """
import sys, torch
from models.quantize import load_quantized
with torch.inference_mode():
    torch.save(load_quantized(sys.argv[1])(torch.load(sys.argv[2])), sys.argv[3])
"""


def _fresh_process_output(checkpoint: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    run_in_fresh_process(RELOAD, checkpoint, tmp_path / "x.pt", tmp_path / "out.pt")
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow
def test_float_layers_and_observer_survive_a_reload_in_a_fresh_process(trained_run, fp32, images, tmp_path):
    prepared = _calibrated(fp32, images, observer="percentile", equalized=True)
    float_layers = [name for unit in prepared.meta["float_units"][1:3] for name in unit]
    int8 = convert(prepared, SIZE, float_layers)
    correct_bias(int8, prepared, images, len(images))
    assert all(not type(module).__module__.startswith("torch.ao.nn.quantized")
               for name, module in int8.named_modules() if any(name.startswith(f"{unit}.") for unit in float_layers))
    payload = load_checkpoint(trained_run / "best.pt")
    settings = {"backend": "x86", "per_channel": True, "mode": "ptq", "observer": "percentile", "float_layers": float_layers}
    save_quantized(tmp_path / "int8.pt", int8, payload, settings)
    x = images[0][0][:8]
    with torch.inference_mode():
        expected = int8(x)
    assert torch.equal(_fresh_process_output(tmp_path / "int8.pt", x, tmp_path), expected)


@pytest.mark.slow
def test_max_drop_holds_on_validation_and_reports_float_layers(trained_run, tmp_path, capsys):
    args = ("--checkpoint", trained_run / "best.pt", "--mode", "ptq", "--max-drop", "0", "--bias-correction", "--calib-batches", "2",
            "--batch-size", "16", "--workers", "0", "--output-dir", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 32 calibration images: CalibrationWarning
        assert run_script("quantization-train.py", *args) == 0
    (run_dir,) = (tmp_path / "quantization").iterdir()
    ptq = json.loads((run_dir / "summary.json").read_text())["ptq"]
    assert ptq["val_acc"] >= ptq["val_acc_fp32"] and ptq["max_drop"] == 0
    settings = load_checkpoint(run_dir / "int8_ptq.pt")["description"].quantization
    assert settings["float_layers"] == ptq["float_layers"] and settings["bias_correction"] is True
    assert f"float layers ({len(ptq['float_layers'])})" in capsys.readouterr().out
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        traced = torch.jit.load(run_dir / "int8_ptq.torchscript.pt")(x)  # traced from the in-memory INT8 model
    assert torch.equal(_fresh_process_output(run_dir / "int8_ptq.pt", x, tmp_path), traced)


@pytest.mark.parametrize("flags", [("--max-drop", "0.5"), ("--equalize", "--observer", "percentile")])
def test_ptq_methods_with_qat_only_give_one_error_line(flags, tmp_path, capsys):
    code = run_script("quantization-train.py", "--checkpoint", tmp_path / "never-read.pt", "--mode", "qat", *flags,
                      "--output-dir", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and flags[0] in lines[0] and "--mode ptq" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "quantization").exists()  # refused before the checkpoint is opened
