"""main.py --init (a new run from a trained checkpoint) and --add-data (reviewed images joined to the training split)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, run_script, write_image

from data.loading import SplitRequest, load_data
from data.scan import DatasetError
from engine.config import RunConfig
from engine.run import HeldOutWarning, prepare_data
from models.factory import model_from_checkpoint
from models.pruning import ChannelPruner, PruneConfig, architecture
from models.stats import count_params
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import Runtime
from utils.results import read_rows

CPU = Runtime(torch.device("cpu"))
REVIEWED = sorted(["Broken stitch/seam_f000000_t00.png", "Broken stitch/seam_f000001_t00.png",
                   "Broken stitch/seam_f000002_t00.png", "Normal/seam_f000000_t00.png", "Normal/seam_f000001_t00.png"])


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reviewed collect folder: <class name>/<file>.png as stream.py --collect writes it, and its CSV."""
    folder = tmp_path_factory.mktemp("collect")
    rng = np.random.default_rng(3)
    for name, label, count in (("Normal", 0, 2), ("Broken stitch", 2, 3)):
        for i in range(count):
            write_image(folder / name / f"seam_f{i:06d}_t00.png", label, rng)
    (folder / "Puckering").mkdir()  # an empty class folder, as the collector leaves them
    (folder / "collected.csv").write_text("file,score\n")
    return folder


def one_run(out: Path) -> Path:
    (run_dir,) = (out / "main").iterdir()
    return run_dir


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_init_starts_a_new_run_from_the_checkpoint_weights(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--init", trained_run / "best.pt", "--epochs", "1",
                      "--lr", "1e-12", "--lr-backbone", "1e-12", "--output-dir", out) == 0
    run_dir = one_run(out)
    before, after = (load_checkpoint(path)["model"] for path in (trained_run / "best.pt", run_dir / "best.pt"))
    weights = [key for key in before if key.endswith(".weight") and before[key].dim() > 1]  # conv/linear, not BatchNorm stats
    assert weights and all(torch.allclose(before[key], after[key], atol=1e-6) for key in weights)
    description = load_checkpoint(run_dir / "best.pt")["description"]
    assert description.args["init"] == str(trained_run / "best.pt") and description.pretrained  # lr-backbone 1e-4 by default
    assert description.operating_point is not None and description.split == load_checkpoint(trained_run / "best.pt")["description"].split


def test_init_with_other_classes_is_one_error_line(trained_run: Path, tiny_dataset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    payload = load_checkpoint(trained_run / "best.pt")
    description = payload["description"]
    renamed = description.replace(class_names=[f"class {i}" for i in range(description.num_classes)])
    save_checkpoint(tmp_path / "other.pt", payload["model"], renamed)
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--init", tmp_path / "other.pt", "--epochs", "1",
                      "--output-dir", tmp_path / "runs") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "trained on ['class 0'," in line and "has classes ['Normal'," in line
    assert not (tmp_path / "runs" / "main").exists()


@pytest.mark.parametrize("extra, message", [(("--resume", "x.pt"), "drop --resume and --weights"),
                                            (("--weights", "x.pt"), "drop --resume and --weights"),
                                            (("--model", "resnet18"), "the architecture comes from the checkpoint")])
def test_init_refuses_flags_it_would_override(trained_run: Path, tiny_dataset: Path, tmp_path: Path, extra: tuple[str, ...],
                                              message: str, capsys: pytest.CaptureFixture) -> None:
    flags = [flag for flag in TINY_TRAIN if flag not in ("--model", "mobilenetv3_small_050")]
    assert run_script("main.py", *flags, "--data-root", tiny_dataset, "--init", trained_run / "best.pt", *extra,
                      "--output-dir", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_init_from_a_pruned_checkpoint_keeps_its_architecture_and_resumes(trained_run: Path, tiny_dataset: Path,
                                                                          tmp_path: Path) -> None:
    payload = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(payload)
    ChannelPruner(model, 32, PruneConfig("l1", global_pruning=False, steps=1, ratio=0.5)).step(1)
    pruned = {"architecture": architecture(model)}
    save_checkpoint(tmp_path / "pruned.pt", model.state_dict(), payload["description"].replace(pruned=pruned))
    out = tmp_path / "runs"  # no --model, no --img-size: both are the checkpoint's
    assert run_script("main.py", "--no-pretrained", "--batch-size", "16", "--workers", "0", "--data-root", tiny_dataset,
                      "--init", tmp_path / "pruned.pt", "--epochs", "1", "--output-dir", out) == 0
    run_dir = one_run(out)
    assert run_script("main.py", "--resume", run_dir / "last.pt") == 0  # an --init run resumes in the same architecture
    best = load_checkpoint(run_dir / "best.pt")
    assert best["description"].pruned == pruned and best["description"].img_size == 32 and best["description"].pretrained
    assert count_params(model_from_checkpoint(best)) == count_params(model) < count_params(model_from_checkpoint(payload))
    assert len(read_rows(out / "results.csv")) == 2


def test_init_warns_where_its_training_images_would_be_tested(trained_run: Path, tiny_dataset: Path) -> None:
    init = load_checkpoint(trained_run / "best.pt")["description"]
    config = RunConfig.from_flags({"data_root": str(tiny_dataset), "img_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeldOutWarning)
        prepare_data(config, CPU, init=init)  # its run's seed: its split, nothing seen is tested
    with pytest.warns(HeldOutWarning, match="--seed 2025"):
        prepare_data(RunConfig.from_flags({**config.flags, "seed": 7}), CPU, init=init)


def test_added_images_join_the_training_split_only(trained_run: Path, tiny_dataset: Path, reviewed: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--add-data", reviewed, "--epochs", "1",
                      "--output-dir", out) == 0
    split = json.loads((one_run(out) / "split.json").read_text())
    plain = json.loads((trained_run / "split.json").read_text())
    assert all(split[name] == plain[name] for name in ("train", "val", "test"))  # the same split as without them
    assert split["added"] == {str(reviewed.resolve()): REVIEWED}
    (row,) = read_rows(out / "results.csv")
    assert row["dataset"] == "real+added"


def test_added_images_take_the_data_class_indices_by_name(tiny_dataset: Path, reviewed: Path, tmp_path: Path) -> None:
    plain = load_data(tiny_dataset, 32, SplitRequest(seed=0), progress=False)
    folder = shutil.copytree(reviewed, tmp_path / "reviewed")
    bundle = load_data(tiny_dataset, 32, SplitRequest(seed=0, added=[str(folder)]), progress=False)
    train, before = bundle.parts["train"], plain.parts["train"]
    assert all(bundle.parts[name].paths == plain.parts[name].paths for name in ("val", "test"))
    assert train.paths == before.paths + [f"{folder.resolve()}/{path}" for path in REVIEWED]
    assert train.labels[len(before):].tolist() == [2, 2, 2, 0, 0]  # Broken stitch is class 2 of the data, not 1 of the folder
    assert np.array_equal(train.images[:len(before)], before.images) and bundle.dataset == "real+added"
    assert load_data(tiny_dataset, 32, SplitRequest(seed=0, stored=bundle.split), progress=False).parts["train"].paths == train.paths
    (folder / REVIEWED[0]).unlink()  # a resumed run trains on what it started with, or stops
    with pytest.raises(DatasetError, match="1 added images of the stored split .* missing"):
        load_data(tiny_dataset, 32, SplitRequest(seed=0, stored=bundle.split), progress=False)


@pytest.mark.parametrize("folder, message", [("added", "['Loose button'] under"), ("data", "overlap"),
                                             ("missing", "is missing (or not a folder)")])
def test_a_bad_added_folder_is_one_error_line(tiny_dataset: Path, tmp_path: Path, folder: str, message: str,
                                              capsys: pytest.CaptureFixture) -> None:
    write_image(tmp_path / "added" / "Loose button" / "a.png", 1, np.random.default_rng(0))
    write_image(tmp_path / "added" / "Normal" / "a.png", 0, np.random.default_rng(0))
    path = {"added": tmp_path / "added", "data": tiny_dataset / "A. Cotton-Poly", "missing": tmp_path / "missing"}[folder]
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--add-data", path, "--epochs", "1",
                      "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
