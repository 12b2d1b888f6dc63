"""The decoded cache: reused, invalidated by its source, rebuilt when damaged, built once under concurrency,
RAM when it cannot be written, and the same pages for every split, worker and process."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_nested_dataset, write_image

import data.cache
import data.images
from data.cache import DecodedCacheWarning, MappedImages, cached_images
from data.images import load_images
from data.loading import SplitRequest, load_data, make_loader
from data.transforms import Preprocess

SIZE = 32


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[str]]:
    root = make_nested_dataset(tmp_path / "data", fabrics="AB", per_class=1)
    return root, sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files Pillow decodes from now on."""
    seen: list[str] = []
    read = data.images.read_image

    def counting(path: Path, size: int) -> np.ndarray:
        seen.append(str(path))
        return read(path, size)

    monkeypatch.setattr(data.images, "read_image", counting)
    return seen


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def test_second_load_maps_the_cache_without_decoding(source, tmp_path, decodes):
    root, paths = source
    expected, _ = load_images(root, paths, SIZE, progress=False)
    decodes.clear()
    first, kept = cached_images(root, paths, SIZE, progress=False, cache_dir=tmp_path / "cache")
    assert len(decodes) == len(paths) and kept == paths
    again, kept_again = cached_images(root, paths, SIZE, progress=False, cache_dir=tmp_path / "cache")
    assert len(decodes) == len(paths)  # nothing decoded the second time
    assert isinstance(again, MappedImages) and not np.asarray(again).flags.writeable and kept_again == paths
    assert digest(again) == digest(first) == digest(expected)


def test_a_changed_or_added_image_invalidates_the_cache(source, tmp_path, decodes, caplog):
    root, paths = source
    cache = tmp_path / "cache"
    cached_images(root, paths, SIZE, progress=False, cache_dir=cache)
    changed = root / paths[0]
    write_image(changed, 7, np.random.default_rng(99), size=48)
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        images, _ = cached_images(root, paths, SIZE, progress=False, cache_dir=cache)
    assert len(decodes) == len(paths) and sum("out of date" in r.getMessage() for r in caplog.records) == 1
    assert np.array_equal(images[0], data.images.read_image(changed, SIZE))
    added = "B. Linen-Poly/0. Normal/B_00_new.jpg"
    write_image(root / added, 0, np.random.default_rng(1))
    images, kept = cached_images(root, [*paths, added], SIZE, progress=False, cache_dir=cache)
    assert added in kept and np.array_equal(images[kept.index(added)], data.images.read_image(root / added, SIZE))
    assert len(list(cache.glob("*.u8"))) == 1  # the replaced pixel files are gone


def test_a_truncated_cache_is_rebuilt_with_one_warning(source, tmp_path, caplog):
    root, paths = source
    cache = tmp_path / "cache"
    good = digest(cached_images(root, paths, SIZE, progress=False, cache_dir=cache)[0])
    (pixels,) = cache.glob("*.u8")
    os.truncate(pixels, pixels.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        images, _ = cached_images(root, paths, SIZE, progress=False, cache_dir=cache)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "damaged" in warning
    assert digest(images) == good


BUILD = """
import sys
from pathlib import Path
import data.cache
import data.images
from data.cache import cached_images
calls = []
read = data.images.read_image
data.images.read_image = lambda path, size: calls.append(path) or read(path, size)
root = Path(sys.argv[1])
paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
images, kept = cached_images(root, paths, 32, progress=False, cache_dir=Path(sys.argv[2]))
import hashlib
import numpy as np
print(len(calls), hashlib.sha256(np.asarray(images).tobytes()).hexdigest())
"""


def test_two_processes_building_at_once_decode_once_and_share_one_file(source, tmp_path):
    root, paths = source
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(tmp_path / "cache")], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    counts, digests = zip(*(out.split() for out, _ in outputs))
    assert sorted(map(int, counts)) == [0, len(paths)]  # one decoded, the other waited and mapped its file
    assert len(set(digests)) == 1 and digests[0] == digest(load_images(root, paths, SIZE, progress=False)[0])
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob("*.tmp"))


def test_an_unwritable_cache_folder_falls_back_to_ram_with_one_warning(source, tmp_path):
    root, paths = source
    (tmp_path / "not-a-folder").write_text("")  # mkdir below a file fails, for root too (unlike a read-only mode)
    with pytest.warns(DecodedCacheWarning, match="cannot write the decoded cache") as caught:
        images, kept = cached_images(root, paths, SIZE, progress=False, cache_dir=tmp_path / "not-a-folder" / "cache")
    assert len(caught) == 1 and not isinstance(images, MappedImages) and kept == paths
    assert digest(images) == digest(load_images(root, paths, SIZE, progress=False)[0])


def test_a_full_disk_falls_back_to_ram_and_leaves_no_partial_file(source, tmp_path, monkeypatch):
    root, paths = source

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.warns(DecodedCacheWarning, match="No space left"):
        images, _ = cached_images(root, paths, SIZE, progress=False, cache_dir=tmp_path / "cache")
    assert len(images) == len(paths) and not isinstance(images, MappedImages)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix in (".u8", ".tmp", ".json")]


def test_pages_read_are_handed_back_and_read_again_unchanged(source, tmp_path, monkeypatch):
    root, paths = source
    images, _ = cached_images(root, paths, SIZE, progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(data.cache, "RELEASE_BYTES", 1)  # release after every read
    assert digest([images[i] for i in range(len(images))] * 2) == digest(np.concatenate([np.asarray(images)] * 2))


def test_splits_and_loader_workers_read_the_one_mapped_array(tiny_dataset):
    bundle = load_data(tiny_dataset, SIZE, SplitRequest(seed=0), progress=False)
    arrays = {id(part.images.arrays[0]) for part in bundle.parts.values()}
    assert len(arrays) == 1 and isinstance(bundle.parts["test"].images.arrays[0], MappedImages)
    test = bundle.parts["test"]
    shipped = pickle.dumps(test)  # what a spawned worker receives: the file name, not the pixels
    assert len(shipped) < np.asarray(test.images).nbytes
    assert pickle.loads(shipped).images.arrays[0].path == test.images.arrays[0].path
    preprocess = Preprocess([0.5] * 3, [0.25] * 3)
    expected = torch.stack([preprocess(image) for image in test.images])
    loader = make_loader(test, preprocess, batch_size=8, workers=2, train=False, seed=0)
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)


def test_the_cache_of_a_deleted_dataset_is_removed_when_another_is_built(source, tmp_path, caplog):
    root, rel = source
    cache = tmp_path / "cache"
    gone = make_nested_dataset(tmp_path / "gone", fabrics="C", per_class=1)
    cached_images(gone, sorted(str(p.relative_to(gone)) for p in gone.rglob("*.jpg")), SIZE, progress=False, cache_dir=cache)
    cached_images(root, rel, SIZE, progress=False, cache_dir=cache)
    assert len(list(cache.glob("*.u8"))) == 2  # both roots exist: both kept
    shutil.rmtree(gone)
    with caplog.at_level(logging.INFO, logger="data.cache"):
        cached_images(root, rel, 2 * SIZE, progress=False, cache_dir=cache)
    assert {p.name.split("-")[0] for p in cache.iterdir()} == {"data"}  # the two sizes of 'data' stay, 'gone' is removed
    assert len(list(cache.glob("*.u8"))) == 2 and any("the folder is gone" in r.getMessage() for r in caplog.records)
    images, kept = cached_images(root, rel, SIZE, progress=False, cache_dir=cache)  # still mapped, not decoded again
    assert isinstance(images, MappedImages) and kept == rel
