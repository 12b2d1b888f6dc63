"""Bad input and faults a careless user or a full disk produce: one clear line, correct figures, nothing damaged."""
from __future__ import annotations

import builtins
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, FillsUp, run_script, write_image
from PIL import Image

from data.loading import CachedImages, SplitRequest, load_data, make_loader
from data.stitchingnet import class_folder
from data.transforms import Preprocess
from deploy.classify import predict
from engine.config import RunConfig
from engine.metrics import classification_metrics, per_fabric_metrics
from engine.run import create_run_dir
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import Runtime
from utils.io import WriteError, atomic_open, atomic_path


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_last_training_batch_of_one_image_is_dropped():
    """Row 1: BatchNorm cannot train on one image; any split size can leave one over."""
    def batch_sizes(images: int) -> list[int]:
        data = CachedImages(np.zeros((images, 8, 8, 3), np.uint8), np.zeros(images, np.int64), [str(i) for i in range(images)])
        return [len(targets) for _, targets in make_loader(data, Preprocess([0.5] * 3, [0.5] * 3), 16, 0, train=True, seed=0)]

    assert batch_sizes(17) == [16] and batch_sizes(18) == [16, 2] and batch_sizes(16) == [16]


def test_training_split_of_one_more_than_a_batch_multiple_trains(tiny_dataset, tmp_path):
    train_images = len(load_data(tiny_dataset, 32, SplitRequest(seed=0), progress=False).parts["train"])
    flags = [*TINY_TRAIN[:-4], "--batch-size", str(train_images - 1), "--workers", "0", "--seed", "0"]
    assert run_script("main.py", *flags, "--data-root", tiny_dataset, "--epochs", "1", "--output-dir", tmp_path) == 0


@pytest.mark.parametrize("script, flags", [
    ("main.py", ["--resume", "{empty}"]),
    ("quantization-train.py", ["--checkpoint", "{empty}"]),
    ("prune.py", ["--checkpoint", "{empty}", "--ratio", "0.5"]),
    ("distill.py", ["--teacher", "{empty}"]),
    ("export.py", ["--checkpoint", "{empty}"]),
    ("predict.py", ["--checkpoint", "{empty}", "{empty}"]),
])
def test_zero_byte_checkpoint_is_one_line_in_every_script(script, flags, tmp_path, capsys):
    """Row 2."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    args = [flag.format(empty=empty) for flag in flags]
    assert run_script(script, *args, *(["--output-dir", tmp_path / "runs"] if script != "predict.py" else [])) == 2
    (line,) = _error_lines(capsys)
    assert "empty.pt" in line and "not a readable checkpoint" in line
    assert not (tmp_path / "runs").exists()


def test_defect_figures_find_normal_by_name_when_classes_are_not_stitchingnet(tiny_dataset, tmp_path, caplog):
    """Row 3: an extra, foreign class folder re-orders the classes; Normal is no longer class 0."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(root / "A. Cotton-Poly" / "Loose thread" / f"x{i}.jpg", 5, rng)
    bundle = load_data(root, 32, SplitRequest(seed=0), progress=False)
    normal = bundle.class_names.index("0. Normal")
    assert normal != 0 and any("not StitchingNet classes" in r.getMessage() for r in caplog.records)
    defect = (normal + 1) % len(bundle.class_names)
    targets = np.array([normal, normal, defect, defect])
    metrics = classification_metrics(targets, np.array([normal, defect, defect, normal]), bundle.class_names)
    assert metrics["false_alarm_rate"] == 0.5 and metrics["defect_recall"] == 0.5


def test_per_fabric_metrics_split_the_test_set_by_fabric():
    names = ["Normal", "Skipped stitch"]
    paths = ["A. Cotton/0. Normal/a0.jpg", "A. Cotton/1. Skipped stitch/a1.jpg", "C_00_1.jpg", "C_01_1.jpg", "C_01_2.jpg", "Normal/x.jpg"]
    targets = np.array([0, 1, 0, 1, 1, 0])
    preds = np.array([0, 1, 1, 0, 1, 0])
    table = per_fabric_metrics(targets, preds, paths, names)
    assert list(table) == ["A", "C"]  # the image without a fabric is in no row
    assert table["A"] == {"images": 2, "acc": 1.0, "defect_recall": 1.0, "false_alarm_rate": 0.0}
    assert table["C"]["images"] == 3 and table["C"]["acc"] == pytest.approx(1 / 3)
    assert table["C"]["defect_recall"] == 0.5 and table["C"]["false_alarm_rate"] == 1.0
    assert per_fabric_metrics(targets, preds, ["Normal/x.jpg"] * 6, names) == {}


class _Always(torch.nn.Module):
    def __init__(self, index: int, classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(index), classes).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(images), -1)


def test_predict_flags_defects_by_the_normal_class_name(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "seam.png")
    info = {"model": "always", "class_names": ["Broken stitch", "Normal", "Skipped stitch"], "mean": [0.5] * 3, "std": [0.5] * 3,
            "img_size": 8}
    flags = [next(predict(_Always(index, 3), info, [tmp_path / "seam.png"])).defect for index in range(3)]
    assert flags == [True, False, True]
    (prediction,) = predict(_Always(0, 2), {**info, "class_names": ["bad", "worse"]}, [tmp_path / "seam.png"])
    assert prediction.defect is None and prediction.verdict == "-" and "no Normal class" in caplog.text


def test_export_refuses_a_bad_torch_int8_file_before_writing_anything(trained_run, tmp_path, capsys):
    """Row 8."""
    (tmp_path / "not.pt").write_text("not TorchScript")
    code = run_script("export.py", "--checkpoint", trained_run / "best.pt", "--benchmark", "--torch-int8", tmp_path / "not.pt",
                      "--output-dir", tmp_path / "runs")
    assert code == 2 and "is not a TorchScript model" in _error_lines(capsys)[0]
    assert not (tmp_path / "runs").exists()


def test_weights_that_do_not_fit_the_description_are_one_line(trained_run, tmp_path, capsys):
    """Row 10: the format marker is right but the weights belong to another architecture."""
    payload = load_checkpoint(trained_run / "best.pt")
    save_checkpoint(tmp_path / "other.pt", payload["model"], payload["description"].replace(model="lcnet_050"))
    assert run_script("export.py", "--checkpoint", tmp_path / "other.pt", "--output-dir", tmp_path / "runs") == 2
    (line,) = _error_lines(capsys)
    assert "do not fit the lcnet_050" in line


def test_synthetic_images_below_the_generator_minimum_are_one_line(tmp_path, capsys):
    assert run_script("main.py", "--synthetic", "--synthetic-per-class", "1", "--img-size", "4", "--output-dir", tmp_path) == 2
    (line,) = _error_lines(capsys)
    assert "--img-size 4 is below the synthetic set's minimum of 8 px" in line and not list(tmp_path.iterdir())


def test_a_single_class_dataset_is_refused(tmp_path, capsys):
    """Row 11: accuracy 1.0 on one class says nothing."""
    rng = np.random.default_rng(0)
    for i in range(12):
        write_image(tmp_path / "data" / class_folder(0) / f"n{i}.jpg", 0, rng)
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tmp_path / "data", "--epochs", "1", "--output-dir", tmp_path / "runs") == 2
    (line,) = _error_lines(capsys)
    assert "one class" in line and "at least two" in line
    assert not (tmp_path / "runs" / "results.csv").exists()


def test_disk_full_mid_run_is_one_line_and_the_last_good_checkpoint_loads(tiny_dataset, tmp_path, monkeypatch, capsys):
    saves = []
    real_open = builtins.open

    def fill_up(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith((".best.pt.", ".last.pt.")):
            saves.append(file)
            if len(saves) == 3:  # epoch 2's first checkpoint write
                return FillsUp(handle)
        return handle

    monkeypatch.setattr(builtins, "open", fill_up)
    code = run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "3", "--patience", "3",
                      "--output-dir", tmp_path)
    assert code == 2
    (line,) = _error_lines(capsys)
    assert "cannot write" in line and "No space left on device" in line
    (run_dir,) = (tmp_path / "main").iterdir()
    assert load_checkpoint(run_dir / "best.pt")["description"].epoch == 1
    assert not list(run_dir.glob(".*.tmp"))


def test_write_into_a_path_that_is_not_a_folder_names_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"cannot write '.*file/out\.csv': File exists"):
        with atomic_open(tmp_path / "file" / "out.csv") as handle:
            handle.write("a")


def test_runs_started_at_the_same_moment_get_their_own_folders(tmp_path):
    barrier, folders = threading.Barrier(8), []

    def start() -> None:
        barrier.wait()
        folders.append(create_run_dir(RunConfig(output_dir=str(tmp_path)), "main", "tiny", Runtime(torch.device("cpu"))))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 8 and all(Path(folder).is_dir() for folder in folders)


def test_a_fifo_is_streamed_to_not_replaced(tmp_path):
    """A named pipe given as an output keeps being a pipe, and its reader gets the whole text."""
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    with atomic_open(fifo) as handle:
        handle.write("path,class\na.png,Normal\n")
    reader.join(timeout=10)
    assert received == ["path,class\na.png,Normal\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not list(tmp_path.glob(".*.tmp"))


def test_a_character_device_is_written_through_not_replaced():
    """/dev/null stays a device (the helper used to rename a regular file over it when run as root)."""
    with atomic_open("/dev/null") as handle:
        handle.write("x" * 10_000)
    with atomic_path("/dev/null") as path, open(path, "wb") as handle:  # writers that take a path: onnx.save, savefig
        handle.write(b"y")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_full_device_is_one_write_error_and_stays_a_device():
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with pytest.raises(WriteError, match=r"cannot write '/dev/full': No space left on device"):
        with atomic_open("/dev/full") as handle:
            handle.write("a,b\n" * 1000)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_predict_csv_into_a_fifo_reaches_its_reader(tmp_path, capsys):
    """End to end: predict.py --csv FIFO, as a user piping results into another program."""
    from test_stream import stub_model
    model = stub_model(tmp_path / "stub.onnx")
    image = tmp_path / "seam.png"
    write_image(image, 1, np.random.default_rng(0), size=32)
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert run_script("predict.py", "--onnx", model, image, "--csv", fifo) == 0
    reader.join(timeout=10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert len(received) == 1 and "seam.png" in received[0] and received[0].count("\n") >= 2
