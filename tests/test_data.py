"""Layouts, class normalisation, splits, augmentation and unreadable files."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES, make_nested_dataset, write_image

from data.images import load_images
from data.loading import SplitRequest, load_data
from data.scan import DatasetError, class_name_of, fabric_of, scan_dataset
from data.splits import make_split
from data.stitchingnet import CLASSES, normalise_name
from data.transforms import Preprocess


def test_normalise_name_merges_variants():
    variants = ["3. Pinched fabric", "03_pinched_Fabric", "PinchedFabric", "pinched-fabric", " 3 Pinched fabric"]
    assert {normalise_name(v) for v in variants} == {"pinchedfabric"}


def test_nested_layout_labels_fabrics_and_fixed_class_order(tiny_dataset):
    scanned = scan_dataset(tiny_dataset)
    assert scanned.class_names == list(CLASSES)
    assert len(scanned.samples) == 3 * 11 * 4
    assert {s.fabric for s in scanned.samples} == {"A", "B", "C"}
    normal = [s for s in scanned.samples if "/0. Normal/" in s.path]
    assert normal and all(s.label == 0 for s in normal)


def test_class_folder_variants_across_fabrics_are_one_label(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "A. Cotton-Poly" / "1. Skipped stitch" / "a.jpg", 1, rng)
    write_image(tmp_path / "B. Linen-Poly" / "01_skipped_Stitch" / "b.jpg", 1, rng)
    write_image(tmp_path / "B. Linen-Poly" / "normal" / "c.jpg", 0, rng)
    labels = {s.path: s.label for s in scan_dataset(tmp_path).samples}
    assert labels["A. Cotton-Poly/1. Skipped stitch/a.jpg"] == labels["B. Linen-Poly/01_skipped_Stitch/b.jpg"] == 1
    assert labels["B. Linen-Poly/normal/c.jpg"] == 0


def test_plain_class_layout_of_another_dataset_uses_sorted_names(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["good", "bad_seam", "Bad Seam"]:
        write_image(tmp_path / name / f"{name}.jpg", 0, rng)
    scanned = scan_dataset(tmp_path)
    assert scanned.class_names == ["Bad Seam", "good"]  # first spelling in path order names the class
    assert sorted(s.label for s in scanned.samples) == [0, 0, 1]
    assert {s.fabric for s in scanned.samples} == {""}


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples not beside the checkout")
def test_real_sample_file_names_are_read():
    scanned = scan_dataset(SAMPLES)
    assert len(scanned.samples) == 114
    assert {s.label for s in scanned.samples} == set(range(11))
    assert len({s.fabric for s in scanned.samples}) == 11
    k03 = [s for s in scanned.samples if s.path.startswith("K_03_")]
    assert k03 and k03[0].label == 3 and k03[0].fabric == "K"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples not beside the checkout")
def test_real_samples_split_falls_back_to_class_strata():
    split = make_split(scan_dataset(SAMPLES).samples, seed=1)
    assert sum(len(split[k]) for k in ("train", "val", "test")) == 114
    assert len(split["test"]) == round(114 * 0.15)


def test_missing_and_empty_roots_say_how_to_get_data(tmp_path):
    with pytest.raises(DatasetError, match="Kaggle.*--synthetic"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        scan_dataset(tmp_path)


def test_split_is_deterministic_stratified_and_disjoint(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    first, again, other = make_split(samples, 7), make_split(list(reversed(samples)), 7), make_split(samples, 8)
    assert first == again
    assert first["test"] != other["test"]
    parts = [set(first[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(samples) and len(set.union(*parts)) == len(samples)
    label = {s.path: s.label for s in samples}
    assert {label[p] for p in first["test"]} == set(range(11))  # every class in the test set


def test_fabric_hold_out_puts_whole_fabrics_in_test(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    split = make_split(samples, 0, test_fabrics=["c"])
    assert all(p.startswith("C. Denim") for p in split["test"])
    assert len(split["test"]) == 44
    assert not any(p.startswith("C. Denim") for p in split["train"] + split["val"])
    with pytest.raises(DatasetError, match="not in the data"):
        make_split(samples, 0, test_fabrics=["Z"])


def test_fabric_subset_keeps_only_those_fabrics_and_labels_the_data(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    split = make_split(samples, 0, fabrics=["c", "A"])
    paths = split["train"] + split["val"] + split["test"]
    assert split["fabrics"] == ["A", "C"] and len(paths) == 88
    assert {p.split(".")[0] for p in paths} == {"A", "C"}
    with pytest.raises(DatasetError, match="--fabrics Z not in the data"):
        make_split(samples, 0, fabrics=["A", "Z"])
    bundle = load_data(tiny_dataset, 32, SplitRequest(seed=0, fabrics=["C", "A"]))
    assert bundle.dataset == "real-fabrics-AC" and bundle.split == split
    # a checkpoint's split keeps the label
    assert load_data(tiny_dataset, 32, SplitRequest(seed=0, stored=split)).dataset == "real-fabrics-AC"


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_augmentation_versions(version):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    preprocess = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=version)
    outputs = []
    for seed in range(6):
        preprocess.reseed(seed)
        outputs.append(preprocess(image))
    assert outputs[0].shape == (3, 32, 32) and outputs[0].dtype == torch.float32
    changed = any(not torch.equal(out, outputs[0]) for out in outputs[1:])
    assert changed == (version > 0)
    if version == 0:  # exact normalisation
        expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
        assert torch.allclose(outputs[0], expected, atol=1e-5)


def test_augmentation_is_reproducible_from_seed():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    preprocess = Preprocess((0.5,) * 3, (0.25,) * 3, augment=3)
    preprocess.reseed(11)
    a = preprocess(image)
    preprocess.reseed(11)
    assert torch.equal(a, preprocess(image))


def test_corrupt_zero_byte_and_non_image_files_are_skipped_with_a_warning(tmp_path, tiny_dataset, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    bad = root / "A. Cotton-Poly" / "0. Normal"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = next(bad.glob("A_*.jpg")).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    with caplog.at_level(logging.WARNING, logger="data.images"):
        bundle = load_data(root, 32, SplitRequest(seed=0), progress=False)
    skipped = [record.getMessage() for record in caplog.records if "skipping unreadable image" in record.getMessage()]
    for name in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert sum(name in message for message in skipped) == 1
    kept = [p for part in bundle.parts.values() for p in part.paths]
    assert len(kept) == 132 and not any(Path(p).name in {"zero.jpg", "text.jpg", "truncated.jpg"} for p in kept)


def test_decoded_cache_is_resized_rgb(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((50, 70), np.uint8), "L").save(tmp_path / "gray.png")
    images, kept = load_images(tmp_path, ["gray.png"], 32, progress=False)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and kept == ["gray.png"]


def test_stored_split_is_reused_and_checked(tiny_dataset, tmp_path):
    bundle = load_data(tiny_dataset, 32, SplitRequest(seed=3), progress=False)
    again = load_data(tiny_dataset, 32, SplitRequest(seed=99, stored=bundle.split), progress=False)
    assert again.parts["test"].paths == bundle.parts["test"].paths
    make_nested_dataset(tmp_path / "other", fabrics="D", per_class=2)
    with pytest.raises(DatasetError, match="stored split"):
        load_data(tmp_path / "other", 32, SplitRequest(seed=3, stored=bundle.split), progress=False)


def test_fabric_of_follows_the_three_layouts():
    assert fabric_of("C. Denim-Poly/1. Skipped stitch/C_01_0003.jpg") == "C"
    assert fabric_of("I_07_022.jpg") == "I"
    assert fabric_of("Normal/img.jpg") == ""
    assert fabric_of("cotton/Normal/img.jpg") == "cotton"  # an unlettered fabric folder keeps its name, as scan_dataset does


def test_class_name_of_follows_the_three_layouts():
    assert class_name_of("C. Denim-Poly/1. Skipped stitch/C_01_0003.jpg") == "1. Skipped stitch"
    assert class_name_of("I_07_022.jpg") == "Stain and damage"
    assert class_name_of("Normal/img.jpg") == "Normal"
    assert class_name_of("I_11_022.jpg") is None and class_name_of("photo.jpg") is None


def test_importing_the_augmentations_asks_no_server_for_updates():
    """albumentations checks PyPI at import unless told not to: an offline line machine must not wait on it."""
    probe = ("import urllib.request\n"
             "asked = []\n"
             "def refuse(self, request, *args, **kwargs):\n"
             "    asked.append(getattr(request, 'full_url', request))\n"
             "    raise OSError('no network in this test')\n"
             "urllib.request.OpenerDirector.open = refuse\n"
             "import data.transforms\n"
             "print(asked)\n")
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
