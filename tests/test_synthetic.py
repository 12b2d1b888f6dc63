"""Synthetic StitchingNet generator: layout, counts, determinism, caching and CLI errors."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.stitchingnet import CLASSES, FABRICS, class_folder
from data.synthetic import (
    GENERATOR_VERSION,
    MARKER,
    REAL_TOTAL,
    SyntheticSet,
    ensure_synthetic,
    generate,
    generated_label,
    plan_counts,
    render_image,
)
from engine.config import resolve
from engine.run import prepare_data
from utils.distributed import Runtime

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny set (1 image per fabric x class) made through the cache entry point."""
    return ensure_synthetic(tmp_path_factory.mktemp("cache"), SyntheticSet(per_class=1, seed=3, img_size=SIZE), workers=2, progress=False)


def test_layout_names_and_counts(cached: Path) -> None:
    assert cached.name == f"synthetic-v{GENERATOR_VERSION}-n1-s3-{SIZE}px"
    assert sorted(p.name for p in cached.iterdir() if p.is_dir()) == sorted(FABRICS.values())
    for letter, fabric in FABRICS.items():
        assert sorted(p.name for p in (cached / fabric).iterdir()) == sorted(class_folder(c) for c in range(len(CLASSES)))
        for c in range(len(CLASSES)):
            assert [p.name for p in (cached / fabric / class_folder(c)).iterdir()] == [f"{letter}_{c:02d}_0000.jpg"]
    assert not list(cached.rglob("*.tmp"))


def test_images_are_rgb_jpegs_of_requested_size(cached: Path) -> None:
    for path in cached.rglob("*.jpg"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_same_seed_is_byte_identical_whatever_the_process(cached: Path) -> None:
    """Files written by two worker processes equal a re-render in this process, JPEG bytes included."""
    for fabric, c in [("A", 0), ("C", 3), ("E", 7), ("H", 9), ("K", 10)]:
        image, quality = render_image(3, fabric, c, 0, SIZE)
        again = io.BytesIO()
        image.save(again, format="JPEG", quality=quality)
        assert again.getvalue() == (cached / FABRICS[fabric] / class_folder(c) / f"{fabric}_{c:02d}_0000.jpg").read_bytes()


def test_regenerating_gives_identical_files(cached: Path, tmp_path: Path) -> None:
    assert generate(tmp_path, SyntheticSet(per_class=1, seed=3, img_size=SIZE), workers=2, progress=False) == 121
    assert files(tmp_path) == files(cached)


def test_other_seed_differs() -> None:
    for fabric, c in [("A", 0), ("E", 7), ("K", 10)]:
        a, _ = render_image(3, fabric, c, 0, SIZE)
        b, _ = render_image(4, fabric, c, 0, SIZE)
        assert a.tobytes() != b.tobytes()


def test_classes_differ_within_a_fabric() -> None:
    images = {render_image(0, "B", c, 0, SIZE)[0].tobytes() for c in range(len(CLASSES))}
    assert len(images) == len(CLASSES)


def test_cache_is_reused(cached: Path) -> None:
    marker = cached / MARKER
    before = {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()}
    assert ensure_synthetic(cached.parent, SyntheticSet(per_class=1, seed=3, img_size=SIZE), workers=2, progress=False) == cached
    assert {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()} == before
    assert marker.exists()


def test_like_stitchingnet_plan_matches_real_size() -> None:
    plan = plan_counts(like_stitchingnet=True)
    assert sum(plan.values()) == REAL_TOTAL == 14_565
    assert set(plan) == {(f, c) for f in FABRICS for c in range(len(CLASSES))}
    assert all(plan[f, 0] == 221 for f in FABRICS)
    defects = [n for (f, c), n in plan.items() if c]
    assert max(defects) - min(defects) <= 1
    assert plan == plan_counts(like_stitchingnet=True)


def test_per_class_plan() -> None:
    assert set(plan_counts(False, 2).values()) == {2}
    with pytest.raises(ValueError):
        plan_counts(False, 0)


@pytest.mark.parametrize("args", [["--out", "x"], ["--out", "x", "--per-class", "0"], ["--per-class", "2"], [],
                                  ["--out", "x", "--per-class", "1", "--zoom", "0.5"]])
def test_cli_bad_arguments_fail_with_one_error_line(args: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "data.synthetic", *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == errors[0]


def test_zoom_leaves_the_standard_images_unchanged() -> None:
    """Generator v2 images (and caches) stay valid: zoom draws its window after every other random draw."""
    digests = {key: hashlib.sha256(render_image(5, *key, 1, 224)[0].tobytes()).hexdigest()[:16] for key in [("E", 7), ("H", 8), ("B", 0)]}
    assert digests == {("E", 7): "7ae02ab7f6a718e6", ("H", 8): "9d43a2fce798c8ac", ("B", 0): "1ea5dc125290b19d"}


@pytest.mark.parametrize("fabric, class_index", [("E", 7), ("K", 0), ("H", 8)])
def test_zoom_frames_a_window_of_the_standard_scene(fabric: str, class_index: int) -> None:
    full = np.asarray(render_image(2, fabric, class_index, 0, 224)[0])
    zoomed = np.asarray(render_image(2, fabric, class_index, 0, 112, zoom=2)[0])
    assert zoomed.shape == (112, 112, 3)
    rows = np.lib.stride_tricks.sliding_window_view(full, (112, 3), axis=(1, 2))[:, :, 0]  # (y, x, 112, 3)
    y, x = np.argwhere((rows == zoomed[0]).all(axis=(2, 3)))[0]
    assert (full[y:y + 112, x:x + 112] == zoomed).all()


def test_zoomed_cache_has_its_own_folder_and_marker(tmp_path: Path) -> None:
    folder = ensure_synthetic(tmp_path, SyntheticSet(per_class=1, seed=0, img_size=SIZE, zoom=2), workers=1, progress=False)
    assert folder.name == f"synthetic-v{GENERATOR_VERSION}-n1-s0-{SIZE}px-zoom2"
    assert json.loads((folder / MARKER).read_text())["zoom"] == 2


def test_marker_from_before_zoom_is_reused_as_zoom_1(cached: Path) -> None:
    marker = cached / MARKER
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "zoom"}
    marker.write_text(json.dumps(old))
    before = {p: p.stat().st_mtime_ns for p in cached.rglob("*.jpg")}
    assert ensure_synthetic(cached.parent, SyntheticSet(per_class=1, seed=3, img_size=SIZE), workers=2, progress=False) == cached
    assert {p: p.stat().st_mtime_ns for p in cached.rglob("*.jpg")} == before


def test_fabric_subset_plan_keeps_the_full_plan_counts() -> None:
    full = plan_counts(like_stitchingnet=True)
    assert plan_counts(True, fabrics="AJ") == {key: n for key, n in full.items() if key[0] in "AJ"}
    assert set(plan_counts(False, 3, "K").values()) == {3} and len(plan_counts(False, 3, "K")) == len(CLASSES)
    with pytest.raises(ValueError, match="Z"):
        plan_counts(False, 1, "AZ")


def test_fabric_subset_cache_holds_the_same_images_as_the_full_set(cached: Path) -> None:
    folder = ensure_synthetic(cached.parent, SyntheticSet(per_class=1, seed=3, img_size=SIZE, fabrics="BK"), workers=1, progress=False)
    assert folder.name == f"synthetic-v{GENERATOR_VERSION}-n1-s3-{SIZE}px-fabrics-BK"
    assert json.loads((folder / MARKER).read_text())["fabrics"] == "BK"
    subset = files(folder)
    assert sorted({name.split(".")[0] for name in subset}) == ["B", "K"] and len(subset) == 2 * len(CLASSES)
    assert subset == {name: data for name, data in files(cached).items() if name in subset}


def test_images_are_the_same_bytes_whatever_the_number_of_workers(cached: Path, tmp_path: Path) -> None:
    """One process, three processes and the fixture's two write the same files."""
    hashes = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        generate(out, SyntheticSet(per_class=1, seed=3, img_size=SIZE, fabrics="AK"), workers=workers, progress=False)
        hashes.append({name: hashlib.sha256(data).hexdigest() for name, data in files(out).items()})
    two = {name: hashlib.sha256(data).hexdigest() for name, data in files(cached).items() if name in hashes[0]}
    assert len(hashes[0]) == 2 * len(CLASSES) and hashes[0] == hashes[1] == two


def test_cli_writes_the_set_and_prints_one_line(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(tmp_path), "--per-class", "1", "--fabrics", "K",
                          "--img-size", "16", "--workers", "1", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"wrote {len(CLASSES)} images to {tmp_path}\n" and run.stderr == ""  # -q: no progress bar
    assert len(files(tmp_path)) == len(CLASSES)


def test_a_generated_set_given_as_data_root_is_labelled_synthetic_not_real(cached: Path, tiny_dataset: Path, tmp_path: Path):
    """Figures measured on generated images must never reach the results table as real data."""
    request = {"img_size": SIZE, "epochs": 1}
    bundle = prepare_data(resolve({**request, "data_root": str(cached)}), Runtime(torch.device("cpu")))
    assert bundle.dataset == "synthetic"
    assert prepare_data(resolve({**request, "data_root": str(tiny_dataset)}), Runtime(torch.device("cpu"))).dataset == "real"
    zoomed = tmp_path / "zoomed"
    generate(zoomed, SyntheticSet(per_class=1, seed=3, img_size=SIZE, zoom=2, fabrics="A"), workers=1, progress=False)
    assert generated_label(zoomed) == "synthetic-zoom2"
    (zoomed / MARKER).write_text("{not json")
    assert generated_label(zoomed) is None and generated_label(tiny_dataset) is None
