"""prune.py and models/pruning.py: real channel removal, weights_only reload, FLOPs targets, PTQ, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script

from models.factory import model_from_checkpoint
from models.int8 import CalibrationWarning
from models.pruning import IMPORTANCES, ChannelPruner, PruneConfig, PruningError, architecture, parse_flops
from models.quantize import load_quantized
from models.stats import count_flops, count_params
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.results import read_rows

QUICK = ("--epochs", "1", "--batch-size", "16", "--workers", "0")


@pytest.fixture(scope="module")
def pruned_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pruned")
    assert run_script("prune.py", "--checkpoint", trained_run / "best.pt", "--ratio", "0.4", *QUICK, "--output-dir", out) == 0
    (run_dir,) = (out / "prune").iterdir()
    return run_dir


def _trained_model(trained_run: Path) -> tuple[torch.nn.Module, dict]:
    payload = load_checkpoint(trained_run / "best.pt")
    return model_from_checkpoint(payload), payload["description"]


def test_pruned_run_is_smaller_keeps_the_classes_and_is_recorded(pruned_run, trained_run):
    (row,) = read_rows(pruned_run.parents[1] / "results.csv")
    (unpruned_row,) = read_rows(trained_run.parents[1] / "results.csv")
    assert (row["script"], row["method"], row["model"]) == ("prune", "prune", "mobilenetv3_small_050")
    assert int(row["params"]) < int(unpruned_row["params"]) and int(row["flops"]) < int(unpruned_row["flops"])
    assert float(row["file_mb"]) < float(unpruned_row["file_mb"]) and float(row["latency_ms_1t"]) > 0
    summary = json.loads((pruned_run / "pruning.json").read_text())
    assert summary["unpruned"]["flops"] == int(unpruned_row["flops"]) and summary["pruned"]["flops"] == int(row["flops"])
    assert summary["unpruned"]["latency_ms_1t"] > 0 and 0 <= summary["pruned"]["test_acc_before_finetuning"] <= 1
    payload = load_checkpoint(pruned_run / "best.pt")
    assert payload["description"].split == load_checkpoint(trained_run / "best.pt")["description"].split
    # the pruned model's own threshold, chosen on its own validation scores, in its checkpoint and its row
    assert float(row["threshold"]) == pytest.approx(payload["description"].operating_point["threshold"], abs=1e-6)
    model = model_from_checkpoint(payload)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 11) and count_params(model) == int(row["params"])


@pytest.mark.parametrize("importance", list(IMPORTANCES))
def test_every_importance_removes_channels_and_reloads_identically(importance, trained_run, tmp_path):
    model, description = _trained_model(trained_run)
    params, flops = count_params(model), count_flops(model, 32)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 11, (8,)))]
    pruner = ChannelPruner(model, 32, PruneConfig(importance, global_pruning=False, steps=1, ratio=0.5), batches)
    assert pruner.step(1) < flops and count_params(model) < params
    save_checkpoint(tmp_path / "pruned.pt", model.state_dict(), description.replace(pruned={"architecture": architecture(model)}))
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "pruned.pt"))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert reloaded(images).shape == (4, 11) and torch.equal(reloaded(images), model.eval()(images))


@pytest.mark.slow
def test_target_flops_is_met_in_every_round_without_overshooting(trained_run):
    model, _ = _trained_model(trained_run)
    base = count_flops(model, 32)
    pruner = ChannelPruner(model, 32, PruneConfig("l1", global_pruning=True, steps=2, round_to=8, target_flops=base // 2))
    assert pruner.step(1) <= base * 3 / 4
    assert 0.35 * base < pruner.step(2) <= base // 2
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels > 8)


def test_flops_targets_parse_units_and_shares():
    assert [parse_flops(t, 1000) for t in ("30M", "1.5G", "800k", "1200", "50%")] == [30_000_000, 1_500_000_000, 800_000, 1200, 500]
    with pytest.raises(PruningError, match="not a FLOPs count"):
        parse_flops("lots", 1000)


@pytest.mark.slow
def test_pruned_checkpoint_goes_through_ptq(pruned_run, tmp_path):
    args = ("--checkpoint", pruned_run / "best.pt", "--mode", "ptq", "--calib-batches", "2", "--batch-size", "16", "--workers", "0")
    with pytest.warns(CalibrationWarning, match="calibrated on only"):  # the tiny set has few images
        assert run_script("quantization-train.py", *args, "--output-dir", tmp_path) == 0
    (int8_path,) = (tmp_path / "quantization").glob("*/int8_ptq.pt")
    assert load_quantized(int8_path)(torch.zeros(1, 3, 32, 32)).shape == (1, 11)
    (row,) = read_rows(tmp_path / "results.csv")
    assert row["method"] == "ptq" and int(row["params"]) == count_params(model_from_checkpoint(load_checkpoint(pruned_run / "best.pt")))


@pytest.mark.parametrize("flags, message", [
    (("--ratio", "0"), "must be between 0 and 1"),
    (("--ratio", "1.5"), "must be between 0 and 1"),
    (("--ratio", "0.5", "--importance", "magnitude"), "invalid choice: 'magnitude'"),
    (("--target-flops", "5G"), "is not below the model's current"),
    (("--target-flops", "1k"), "choose a larger target"),
])
def test_bad_inputs_give_one_clear_line(flags, message, trained_run, tmp_path, capsys):
    assert run_script("prune.py", "--checkpoint", trained_run / "best.pt", *flags, *QUICK, "--output-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "prune").exists()
