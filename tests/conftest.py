"""Shared fixtures: tiny datasets written by the tests and one tiny trained checkpoint."""
from __future__ import annotations

import errno
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "stitchingnet-samples"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT))

from data.stitchingnet import FABRICS, class_folder  # noqa: E402
from deploy.onnx_export import export_onnx  # noqa: E402
from models.factory import model_from_checkpoint  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.logs import THIRD_PARTY_WARNINGS  # noqa: E402
from utils.signal_stack import SS_DISABLE, current_signal_stack  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The scripts' third-party warning filters (utils.logs), as pytest filters: one list for both."""
    for action, message, category, module in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"{action}:{message}:{category.__name__}:{module}")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated sets and decoded images go to a folder of this test run, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


def signal_stack_is_mapped() -> bool:
    """Whether this thread's alternate signal stack, if it has one, lies in mapped memory (Linux): Python runs its
    signal handlers on it, so an unmapped one turns the next signal into SIGSEGV (deploy/openvino_runtime.py)."""
    stack = current_signal_stack()
    if stack is None or stack.ss_flags & SS_DISABLE or not stack.ss_sp:
        return True
    with open("/proc/self/maps") as maps:
        ranges = [tuple(int(end, 16) for end in line.split()[0].split("-")) for line in maps]
    return any(low <= stack.ss_sp and stack.ss_sp + stack.ss_size <= high for low, high in ranges)


@pytest.fixture(autouse=True)
def signal_stack_left_mapped() -> Iterator[None]:
    """Each test leaves the alternate signal stack mapped, so a test that breaks it fails itself instead of a later one
    dying of SIGSEGV with no Python frame at the next signal."""
    yield
    assert signal_stack_is_mapped(), "this thread's alternate signal stack is unmapped: see deploy/openvino_runtime.py"


def write_image(path: Path, label: int, rng: np.random.Generator, size: int = 40) -> None:
    """A small JPEG whose mean colour depends on the class, so tiny runs can learn something."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.array([label * 23 % 256, (label * 57 + 80) % 256, (255 - label * 19) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_nested_dataset(root: Path, fabrics: str = "ABC", per_class: int = 4, seed: int = 0) -> Path:
    """``root/<fabric folder>/<class folder>/<image>.jpg`` like the Kaggle download."""
    rng = np.random.default_rng(seed)
    for fabric in fabrics:
        for label in range(11):
            for i in range(per_class):
                write_image(root / FABRICS[fabric] / class_folder(label) / f"{fabric}_{label:02d}_{i:03d}.jpg", label, rng)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nested_dataset(tmp_path_factory.mktemp("data") / "StitchingNet")


def run_script(script: str, *args: str) -> int:
    """Run a toolkit script in this process (fast: no re-import of torch); returns its exit code."""
    old_argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old_argv


def run_in_fresh_process(code: str, *args: object, timeout: int = 300) -> None:
    """Run ``python -c code args`` in a new interpreter (nothing loaded yet: what a user's process sees); fails with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]


class FillsUp:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC (as write(2) says it)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


TINY_TRAIN = ("--model", "mobilenetv3_small_050", "--no-pretrained", "--img-size", "32", "--batch-size", "16", "--workers", "0")


@pytest.fixture(scope="session")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a 2-epoch main.py run on the tiny dataset (holds best.pt, last.pt, split.json)."""
    out = tmp_path_factory.mktemp("runs")
    assert run_script("main.py", *TINY_TRAIN, "--data-root", tiny_dataset, "--epochs", "2", "--output-dir", out) == 0
    (run_dir,) = (out / "main").iterdir()
    return run_dir


@pytest.fixture(scope="session")
def onnx_file(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained checkpoint exported to ONNX (FP32, with its deploy metadata)."""
    payload = load_checkpoint(trained_run / "best.pt")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model_from_checkpoint(payload), payload["description"], path)
    return path


@pytest.fixture
def v1_description() -> dict:
    """A run description exactly as toolkit versions before the typed RunDescription wrote it (schema 1)."""
    return {
        "script": "main", "method": "fp32", "model": "mobilenetv3_small_050", "family": None, "alpha": None,
        "num_classes": 11, "class_names": ["Normal", "Skipped stitch", "Broken stitch", "Pinched fabric", "Crooked seam",
                                           "Thread sagging", "Puckering", "Stain and damage", "Needle mark", "Bobbin thread pulling up",
                                           "Overlapped stitch"],
        "img_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "pretrained": False,
        "dataset": "synthetic", "data_root": "/cache/synthetic-v2-n2-s0-32px", "synthetic": {"per_class": 2, "img_size": 32},
        "augment": 1, "seed": 0, "split": {"seed": 0, "val_share": 0.15, "test_share": 0.15, "test_fabrics": [], "train": [],
                                           "val": [], "test": []},
        "args": {"model": "mobilenetv3_small_050", "epochs": 2, "lr": 0.001, "seed": 0, "synthetic": True},
        "epoch": 2, "val_loss": 2.3, "val_acc": 0.1, "metrics": {"acc": 0.1},
    }
