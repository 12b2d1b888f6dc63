"""main.py end to end: outputs, results table, resume after a kill, DDP, and clear errors."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_TRAIN, run_script

from engine.config import TrainConfig, data_source, resolve
from engine.loop import smoothed_cross_entropy, train_one_epoch
from engine.run import build_optimizer, prepare_data
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.cli import add_config_arg, parse_command_line
from utils.description import RunDescription, SyntheticSource
from utils.distributed import Runtime
from utils.results import COLUMNS, append_result, read_rows


def script_env() -> dict[str, str]:
    """The environment now (with the test run's private cache folder), offline and on one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)


def test_run_folder_holds_checkpoints_reports_and_a_results_row(trained_run):
    for name in ("best.pt", "last.pt", "log.csv", "split.json", "metrics.json", "confusion_matrix.csv",
                 "confusion_matrix.png", "misclassified.csv", "classification_report.txt"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(trained_run.parents[1] / "results.csv")
    assert len(rows) == 1 and list(rows[0]) == list(COLUMNS)
    row = rows[0]
    assert (row["script"], row["method"], row["model"], row["dataset"], row["pretrained"]) == ("main", "fp32", "mobilenetv3_small_050",
                                                                                               "real", "False")
    assert int(row["params"]) == 579_499 and float(row["latency_ms_1t"]) > 0
    assert 0 <= float(row["test_acc"]) <= 1 and 0 <= float(row["defect_recall"]) <= 1
    assert float(row["file_mb"]) == pytest.approx((trained_run / "best.pt").stat().st_size / 2**20, abs=1e-3)
    with open(trained_run / "log.csv") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    fabrics = metrics["per_fabric"]
    with open(trained_run / "per_fabric.csv") as handle:
        assert [r["fabric"] for r in csv.DictReader(handle)] == list(fabrics) == sorted(fabrics)
    test_images = len(json.loads((trained_run / "split.json").read_text())["test"])
    assert sum(f["images"] for f in fabrics.values()) == test_images
    assert sum(f["acc"] * f["images"] for f in fabrics.values()) / test_images == pytest.approx(metrics["acc"])


def test_checkpoints_are_self_describing_and_weights_only(trained_run):
    best = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert "resume" not in best and {"optimizer", "scheduler", "rng", "epoch"} <= set(last["resume"])
    description = best["description"]
    for key in ("model", "alpha", "num_classes", "class_names", "img_size", "mean", "std", "split", "args", "metrics"):
        assert key in description, key
    assert description["num_classes"] == 11 and description["img_size"] == 32
    split = json.loads((trained_run / "split.json").read_text())
    assert description["split"] == split


def test_untrusted_pickles_are_refused(tmp_path):
    torch.save({"format": "stitchdefect-checkpoint", "model": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")


def test_stats_only_prints_one_json_line_per_model(capsys):
    assert run_script("main.py", "--stats-only", "--model", "lcnet_050,mobilenetv3_small", "--alpha", "0.5") == 2  # alpha+timm name
    capsys.readouterr()
    assert run_script("main.py", "--stats-only", "--model", "mobilenetv3_small", "--alpha", "0.5") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["model"], line["alpha"], line["params"]) == ("mobilenetv3_small_050", 0.5, 579_499)
    assert line["flops"] > 0 and line["size_mb"] == pytest.approx(579_499 * 4 / 2**20, abs=1e-3)


def _final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    flags = (*TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "4", "--patience", "10")
    assert cli("main.py", *flags, "--output-dir", tmp_path / "full").returncode == 0

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "main.py", *map(str, flags), "--output-dir", str(out)],
                               cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(out.glob("main/*/last.pt")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (last,) = out.glob("main/*/last.pt")
    assert load_checkpoint(last)["resume"]["epoch"] < 4, "the run finished before it was killed"

    resumed = cli("main.py", "--resume", last)
    assert resumed.returncode == 0, resumed.stderr
    (full_dir,) = (tmp_path / "full" / "main").iterdir()
    expected, got = _final_weights(full_dir), _final_weights(last.parent)
    assert all(torch.allclose(expected[k].float(), got[k].float(), atol=1e-6) for k in expected)
    assert len(read_rows(out / "results.csv")) == 1


def _append_rows(path: str, worker: int) -> None:
    for i in range(20):
        append_result(path, {"run_id": f"{worker}-{i}", "model": "m", "test_acc": i})


@pytest.mark.slow
def test_concurrent_results_writers_lose_no_row(tmp_path):
    path = str(tmp_path / "results.csv")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_append_rows, [(path, w) for w in range(4)])
    rows = read_rows(path)
    assert sorted(r["run_id"] for r in rows) == sorted(f"{w}-{i}" for w in range(4) for i in range(20))


@pytest.mark.ddp
def test_ddp_two_processes_on_cpu(tiny_dataset, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "main.py",
         *map(str, TINY_TRAIN), "--data-root", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path)],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "main").iterdir())
    assert len(runs) == 1 and (runs[0] / "best.pt").is_file()  # only rank 0 writes
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 1
    log = list(csv.DictReader(open(runs[0] / "log.csv")))
    assert len(log) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("--data-root", "/nonexistent/StitchingNet"), "Kaggle"),
        (("--model", "mobilenetv3_smal"), "unknown model"),
        (("--warmup-epochs", "5", "--epochs", "5"), "--warmup-epochs (5) must be smaller than --epochs (5)"),
        (("--resume", "/nonexistent/last.pt"), "does not exist"),
        (("--synthetic", "--fabrics", "a,z"), "--fabrics Z: the synthetic set's fabrics are A,B,C,D,E,F,G,H,I,J,K"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message):
    result = cli("main.py", "--no-pretrained", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


@pytest.mark.parametrize("args, message", [(("--label-smoothing", "1"), "--label-smoothing: must be in [0, 1)"),
                                           (("--synthetic", "--synthetic-zoom", "8"), "--synthetic-zoom: must be in [1, 4]"),
                                           (("--model", "lcnet", "--alpha", "-1"), "--alpha: must be a positive number, got -1")])
def test_out_of_range_flags_are_refused_before_any_work(args, message):
    result = cli("main.py", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("main.py: error:") and message in result.stderr


def test_resume_from_best_pt_is_refused(trained_run):
    assert run_script("main.py", "--resume", trained_run / "best.pt") == 2


def test_diverging_loss_stops_with_a_clear_message(tiny_dataset, tmp_path):
    result = cli("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "3", "--lr", "1e30", "--output-dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loss became" in result.stderr


def test_warmup_ramps_the_learning_rate_linearly_then_decays():
    model = torch.nn.Linear(4, 11)
    training = TrainConfig(lr=3e-3, lr_backbone=None, weight_decay=0.0, epochs=5, warmup_epochs=2)
    optimizer, scheduler = build_optimizer(model, training, pretrained=False)
    rates = []
    for _ in range(training.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert rates[3] < rates[2] and rates[4] < rates[3]


def test_optimizer_uses_the_fused_adamw_step_on_cpu():
    optimizer, _ = build_optimizer(torch.nn.Linear(4, 11), TrainConfig(), pretrained=False)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_label_smoothing_trains_on_the_smoothed_target():
    model = torch.nn.Linear(4, 11)
    images, targets = torch.randn(8, 4), torch.arange(8)
    plain, logits = smoothed_cross_entropy(0.0)(model, images, targets)
    smooth, _ = smoothed_cross_entropy(0.1)(model, images, targets)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, targets).item())
    uniform = -logits.log_softmax(1).mean(1)
    assert smooth.item() == pytest.approx((0.9 * F.cross_entropy(logits, targets, reduction="none") + 0.1 * uniform).mean().item(),
                                          rel=1e-5)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_clip_grad_norm_bounds_the_step(clip):
    """With plain SGD at lr 1 the step is the gradient itself: clipped, its norm is at most ``clip``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 11)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = [(100 * torch.randn(8, 4), torch.arange(8))]
    train_one_epoch(model, batch, torch.optim.SGD(model.parameters(), lr=1.0), Runtime(torch.device("cpu"), channels_last=False),
                    0, clip_grad_norm=clip)
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    if clip is None:
        assert step > 1.0
    else:
        assert step == pytest.approx(clip, rel=1e-4)


def test_zoomed_synthetic_runs_are_labelled_apart(v1_description):
    old_checkpoint = RunDescription.from_dict({**v1_description, "synthetic": {"per_class": 2, "img_size": 32}})  # before --synthetic-zoom
    synthetic, root = data_source({}, 32, old_checkpoint)
    assert root is None and synthetic.label == "synthetic" and synthetic.zoom == 1.0
    assert SyntheticSource(2, 32, 1.0).label == "synthetic"
    assert SyntheticSource(2, 56, 4.0).label == "synthetic-zoom4"


def test_the_readme_quick_start_is_a_valid_command_for_one_lines_fabrics(monkeypatch):
    """The README's first command, a recipe, must keep parsing as the flags change: it is what a new user runs first."""
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines() if "python main.py" in line and "pip install" in line]
    argv = shlex.split(line.split("python main.py", 1)[1])
    assert argv[0] == "--config" and len(line.split("&& ", 1)[1]) <= 80
    parser = runpy.run_path(str(ROOT / "main.py"), run_name="not_main")["get_args_parser"]()
    add_config_arg(parser)
    monkeypatch.chdir(ROOT)  # the README runs from the repository root
    config = resolve(vars(parse_command_line(parser, argv)))
    assert config.data.data_root is None and config.data.source == SyntheticSource(240, 112, 4.0, "ABJ")
    assert config.data.fabrics == ["A", "B", "J"] and config.training.epochs <= config.training.patience


def test_a_fabric_subset_run_generates_trains_and_reloads_only_those_fabrics(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    flags = ("--synthetic", "--synthetic-per-class", "4", "--fabrics", "j,b", "--epochs", "1", "--output-dir", out)
    assert run_script("main.py", *TINY_TRAIN, *flags) == 0
    (row,) = read_rows(out / "results.csv")
    assert row["dataset"] == "synthetic-fabrics-BJ"
    (folder,) = (tmp_path / "cache" / "stitchdefect").glob("synthetic-*")  # beside it: decoded/
    assert folder.name.endswith("-fabrics-BJ") and sorted(p.name[0] for p in folder.iterdir() if p.is_dir()) == ["B", "J"]
    description = load_checkpoint(next((out / "main").iterdir()) / "best.pt")["description"]
    assert description.synthetic == SyntheticSource(4, 32, 1.0, "BJ") and description.split["fabrics"] == ["B", "J"]
    assert {p[0] for part in ("train", "val", "test") for p in description.split[part]} == {"B", "J"}
    shutil.rmtree(folder)  # another machine: the checkpoint alone regenerates the same subset, under the same label
    bundle = prepare_data(resolve({}, pinned=description), Runtime(torch.device("cpu")))
    assert bundle.root == folder and bundle.dataset == "synthetic-fabrics-BJ" and bundle.split == description.split
