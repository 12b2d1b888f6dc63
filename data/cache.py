"""Decoded images on disk, shared by every run, script, DDP rank and DataLoader worker.

One memory-mapped uint8 array per (data root, image size, decoder version) under the cache folder, written once
under a file lock (concurrent runs and ranks wait for the first one instead of decoding again) and replaced
atomically. It is trusted only while its source is unchanged: the same image files with the same sizes and
modification times. Pages come from disk, so the pixels are held once in the page cache whatever the number of
processes, and a data set larger than RAM still trains.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data.images import decode_images, load_images
from utils.io import WriteError, atomic_open

DECODER_VERSION = 1  # bump when data.images.read_image's pixels change: older caches are then decoded again
CACHE_ENV = "XDG_CACHE_HOME"
RELEASE_BYTES = 64 * 2**20  # mapped pages a process holds before handing them back

log = logging.getLogger(__name__)


class DecodedCacheWarning(UserWarning):
    """The decoded cache cannot be written (read-only or full disk): images are decoded into RAM instead."""


def cache_root() -> Path:
    """Where generated data and decoded images are kept: ``$XDG_CACHE_HOME/stitchdefect`` (default ~/.cache)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache")) / "stitchdefect"


def cached_images(root: Path, rel_paths: list[str], size: int, progress: bool = True,
                  cache_dir: Path | None = None) -> tuple[MappedImages | np.ndarray, list[str]]:
    """``rel_paths`` under ``root`` decoded at ``size``: a read-only memory map of the cache and the paths kept.

    Same contract as ``data.images.load_images`` (unreadable files are dropped); a cache folder that cannot be
    written gives the in-RAM array with one warning.
    """
    rel_paths = sorted(rel_paths)
    entry = _Entry(Path(cache_dir) if cache_dir else cache_root() / "decoded", Path(root), size)
    listing = _listing(Path(root), rel_paths)
    found, _ = entry.open(listing)
    if found is not None:
        return found
    try:
        with entry.locked():
            found, problem = entry.open(listing)  # another process may have built it while this one waited
            if found is not None:
                return found
            if problem:
                log.warning("the decoded cache of '%s' at %d px %s: decoding again", root, size, problem)
            return entry.build(rel_paths, listing, progress)
    except (OSError, WriteError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        warnings.warn(f"cannot write the decoded cache in '{entry.folder}' ({reason}): decoding into RAM; point "
                      f"{CACHE_ENV} at a writable folder with room to share decoded images between runs",
                      DecodedCacheWarning, stacklevel=2)
        return load_images(Path(root), rel_paths, size, progress)


class MappedImages:
    """A read-only memory map of a cache file, indexed like an (N, size, size, 3) uint8 array.

    Rows are read where they are asked for (no copy of a split). Every ``RELEASE_BYTES`` read, the process hands the
    mapped pages back (``MADV_DONTNEED``): they stay in the page cache, shared by every process, and the next read of
    them is a minor fault, so a process's resident memory stays flat however large the data. Pickled (a spawned
    DataLoader worker), it travels as its file name and is mapped again.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = Path(path), tuple(shape)
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self._map, np.uint8, count=int(np.prod(self.shape))).reshape(self.shape)
        self._read = 0

    dtype = np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        image = self.array[index]
        self._read += image.nbytes
        if self._read >= RELEASE_BYTES:
            self._map.madvise(mmap.MADV_DONTNEED)  # a read-only file map: the pages are read again, never lost
            self._read = 0
        return image

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype)

    def __reduce__(self) -> tuple:
        return MappedImages, (self.path, self.shape)


def _listing(root: Path, rel_paths: list[str]) -> str:
    """Digest of the file list with each file's size and modification time: any change, addition or removal changes it."""
    digest = hashlib.sha256()
    for rel in rel_paths:
        try:
            stat = (root / rel).stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}\0missing\n".encode())
    return digest.hexdigest()


def _remove_orphans(folder: Path) -> None:
    """Delete the entries whose data root no longer exists (a deleted or moved dataset, a test's temporary folder):
    nothing can use them again, and each holds 150 kB per image at 224 px."""
    for meta in folder.glob("*.json"):
        try:
            root = Path(json.loads(meta.read_text())["root"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or damaged: its own next use rebuilds it
        if root.exists():
            continue
        freed = 0
        for path in [*folder.glob(f"{meta.stem}.*.u8"), meta, folder / f"{meta.stem}.lock"]:
            with contextlib.suppress(OSError):
                freed += path.stat().st_size
                path.unlink()
        log.info("removed the decoded cache of '%s' (the folder is gone): %.2f GB freed", root, freed / 1e9)


class _Entry:
    """The files of one cache entry: ``<key>.json`` (what was decoded) names ``<key>.<build>.u8`` (the pixels)."""

    def __init__(self, folder: Path, root: Path, size: int) -> None:
        self.folder, self.root, self.size = folder, root, size
        source = f"{root.resolve()}|{size}|{DECODER_VERSION}"
        self.key = f"{root.resolve().name}-{size}px-d{DECODER_VERSION}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
        self.meta = folder / f"{self.key}.json"

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.size, self.size, 3

    def open(self, listing: str) -> tuple[tuple[MappedImages | np.ndarray, list[str]] | None, str | None]:
        """(the mapped array and paths kept, None) if the cache matches ``listing``; else (None, what is wrong or None if absent)."""
        try:
            meta = json.loads(self.meta.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, "has a damaged description"
        if meta.get("listing") != listing or meta.get("decoder") != DECODER_VERSION or meta.get("size") != self.size:
            return None, "is out of date (images were changed, added or removed)"
        kept = meta["kept"]
        data = self.folder / meta["file"]
        expected = len(kept) * int(np.prod(self.row_shape))
        try:
            actual = data.stat().st_size
        except OSError:
            return None, "lost its pixel file"
        if actual != expected:
            return None, f"is damaged ({actual:,} bytes instead of {expected:,})"
        if meta["skipped"]:
            log.warning("%d images under '%s' are unreadable and skipped (first: %s)", len(meta["skipped"]), self.root,
                        meta["skipped"][0])
        if not kept:
            return (np.zeros((0, *self.row_shape), np.uint8), kept), None
        try:
            return (MappedImages(data, (len(kept), *self.row_shape)), kept), None
        except OSError:  # replaced by a concurrent rebuild since the description was read
            return None, "lost its pixel file"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive while held, across processes (fcntl; released by the kernel if the holder dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def build(self, rel_paths: list[str], listing: str, progress: bool) -> tuple[MappedImages | np.ndarray, list[str]]:
        """Decode into a new pixel file, then switch the description to it (under the lock)."""
        for orphan in self.folder.glob(f"{self.key}.*.tmp"):  # left by a builder that was killed (the lock is ours)
            orphan.unlink(missing_ok=True)
        data = self.folder / f"{self.key}.{uuid.uuid4().hex[:8]}.u8"
        tmp = data.with_suffix(".tmp")
        row_bytes = int(np.prod(self.row_shape))
        kept, skipped = [], []
        start = time.perf_counter()
        try:
            with open(tmp, "wb") as handle:
                if rel_paths:  # claim the space now: a full disk fails here, not half-way (or as SIGBUS on a map)
                    os.posix_fallocate(handle.fileno(), 0, len(rel_paths) * row_bytes)
                for rel, image in zip(rel_paths, decode_images(self.root, rel_paths, self.size, progress)):
                    if image is None:
                        skipped.append(rel)
                        continue
                    handle.write(np.ascontiguousarray(image).data)
                    kept.append(rel)
                handle.truncate(len(kept) * row_bytes)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, data)
            with atomic_open(self.meta) as handle:
                json.dump({"root": str(self.root.resolve()), "size": self.size, "decoder": DECODER_VERSION,
                           "listing": listing, "file": data.name, "kept": kept, "skipped": skipped}, handle)
        finally:
            tmp.unlink(missing_ok=True)
        for old in self.folder.glob(f"{self.key}.*.u8"):  # processes still mapping an old file keep reading it
            if old != data:
                old.unlink(missing_ok=True)
        _remove_orphans(self.folder)
        log.info("decoded %d images of '%s' at %d px in %.1f s into %s (reused by later runs)", len(kept), self.root,
                 self.size, time.perf_counter() - start, data)
        if not kept:
            return np.zeros((0, *self.row_shape), np.uint8), kept
        return MappedImages(data, (len(kept), *self.row_shape)), kept
