"""From a data root (or the synthetic set) to cached train/val/test datasets and loaders."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from data.cache import MappedImages, cached_images
from data.images import load_images
from data.scan import DatasetError, ScannedDataset, scan_dataset
from data.splits import make_split, select_fabrics
from data.stitchingnet import normal_index
from data.transforms import Preprocess
from utils.description import SyntheticSource

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


class ImageRows:
    """Rows of one or more image arrays (e.g. the decoded cache's memory map), picked without copying them.

    Indexing with an int gives one image; a slice or an index array gives another ``ImageRows``; ``np.asarray``
    copies.
    """

    def __init__(self, arrays: tuple[MappedImages | np.ndarray, ...], where: np.ndarray) -> None:
        self.arrays, self.where = arrays, where  # where: (N, 2) int64 of (array, row)

    @classmethod
    def of(cls, images: MappedImages | np.ndarray, rows: np.ndarray | list[int] | None = None) -> ImageRows:
        rows = np.arange(len(images)) if rows is None else np.asarray(rows, np.int64)
        return cls((images,), np.stack([np.zeros_like(rows), rows], axis=1))

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray | ImageRows:
        if isinstance(index, (int, np.integer)):
            array, row = self.where[index]
            return self.arrays[array][row]
        return ImageRows(self.arrays, self.where[index])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        shape = self.arrays[0].shape[1:]
        out = np.empty((len(self), *shape), dtype or self.arrays[0].dtype)
        for i, image in enumerate(self):
            out[i] = image
        return out

    def join(self, other: ImageRows) -> ImageRows:
        return ImageRows(self.arrays + other.arrays, np.concatenate([self.where, other.where + [len(self.arrays), 0]]))


class CachedImages(Dataset):
    """Decoded images with their labels; ``transform`` runs per item, rows are read when asked for.

    ``images``: an array (all of it) or ``ImageRows`` (the split's rows of the shared decoded cache).
    """

    def __init__(self, images: np.ndarray | ImageRows, labels: np.ndarray, paths: list[str], transform: Preprocess | None = None):
        self.images = images if isinstance(images, ImageRows) else ImageRows.of(images)
        self.labels, self.paths, self.transform = labels, paths, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])

    def with_transform(self, transform: Preprocess) -> CachedImages:
        return CachedImages(self.images, self.labels, self.paths, transform)


@dataclass
class DataBundle:
    root: Path
    dataset: str  # "real", "synthetic" or "synthetic-zoom<Z>", "-fabrics-<letters>" for a subset: in every results row
    class_names: list[str]
    split: dict
    parts: dict[str, CachedImages]
    synthetic: SyntheticSource | None = None  # so a checkpoint can regenerate its data


@dataclass(frozen=True)
class SplitRequest:
    """How to split: ``stored`` (a checkpoint's split) is reused exactly; otherwise a new stratified split from
    ``seed``, with ``test_fabrics`` held out as the test set and only the ``fabrics`` letters kept. ``added``:
    folders of labelled images (e.g. a reviewed ``stream.py --collect`` folder) joined to the training split only."""

    seed: int = 0
    stored: dict | None = None
    test_fabrics: list[str] | None = None
    fabrics: list[str] | None = None
    added: list[str] | None = None


def load_data(root: Path | str, img_size: int, request: SplitRequest, dataset: str = "real",
              class_names: list[str] | None = None, progress: bool = True) -> DataBundle:
    """Scan, decode and split; ``dataset`` is the results label, extended with the split's fabrics (e.g.
    ``real-fabrics-ABJ``) and ``+added`` where added folders joined the training split. Added images join after the
    split is made, so validation and test stay the main data's and the split is the one a run without them gets;
    the split records them (``added``: {folder: images}); a stored split brings its own."""
    split, fabrics = request.stored, request.fabrics
    scanned = scan_dataset(root)
    check_classes(scanned, class_names)
    stored_added = (split or {}).get("added")
    folders = list(stored_added or {}) if split is not None else request.added or []
    added_scans = scan_added(folders, scanned.root, scanned.class_names)  # before decoding: a wrong folder fails at once
    by_path = {s.path: s for s in scanned.samples}
    # the whole data root is decoded (once, into the shared cache): every subset and split of it reads the same rows
    images, decoded = cached_images(scanned.root, list(by_path), img_size, progress)
    if split is None:
        chosen = {s.path for s in select_fabrics(scanned.samples, fabrics)} if fabrics else by_path
        split = make_split([by_path[p] for p in decoded if p in chosen], request.seed, test_fabrics=request.test_fabrics,
                           fabrics=fabrics)
    else:
        missing = [p for name in SPLITS for p in split[name] if p not in by_path]
        if missing:
            raise DatasetError(
                f"{len(missing)} images of the stored split are not under '{root}' (first: {missing[0]}): "
                "point --data-root at the data the checkpoint was trained on"
            )
    log.debug("%s: %d images decoded at %d px (%.0f MiB, %s)", root, len(decoded), img_size, images.nbytes / 2**20,
              "memory-mapped" if isinstance(images, MappedImages) else "in RAM")
    extra = None
    if added_scans:
        extra, listing = decode_added(added_scans, img_size, progress, stored_added)
        split = {**split, "added": listing}
    row_of = {p: i for i, p in enumerate(decoded)}
    parts = {}
    for name in SPLITS:
        paths = [p for p in split[name] if p in row_of]
        if not paths or name == "train" and len(paths) < 2:
            raise DatasetError(f"the {name} split has {len(paths)} images: add images or change the split shares")
        rows = ImageRows.of(images, [row_of[p] for p in paths])
        labels = np.array([by_path[p].label for p in paths], dtype=np.int64)
        if name == "train" and extra is not None:
            rows, labels, paths = rows.join(extra.images), np.concatenate([labels, extra.labels]), paths + extra.paths
        parts[name] = CachedImages(rows, labels, paths)
    if split.get("fabrics"):  # splits from before --fabrics have no such key
        dataset = f"{dataset}-fabrics-{''.join(split['fabrics'])}"
    if extra is not None:
        dataset += "+added"
    return DataBundle(Path(root), dataset, scanned.class_names, split, parts)


def check_classes(scanned: ScannedDataset, class_names: list[str] | None) -> None:
    """At least two classes, a Normal class (else a warning), and a checkpoint's classes where one is given."""
    root = scanned.root
    present = sorted({sample.label for sample in scanned.samples})
    if len(present) < 2:
        raise DatasetError(f"all images under '{root}' are of one class ({scanned.class_names[present[0]]}): "
                           "a classifier needs images of at least two classes")
    if normal_index(scanned.class_names) is None:
        log.warning("the classes under '%s' have no Normal class: defect recall and false-alarm rate are undefined "
                    "(nan in the results)", root)
    if class_names is not None and list(class_names) != scanned.class_names:
        raise DatasetError(
            f"the data under '{root}' has classes {scanned.class_names}, but the checkpoint was "
            f"trained on {list(class_names)}: use the data root it was trained on"
        )


def scan_added(folders: list[str], root: Path, class_names: list[str]) -> list[ScannedDataset]:
    """The added folders, each image labelled with the data's index of its class folder's name."""
    scans = {}
    for folder in folders:
        path = Path(folder).resolve()
        if not path.is_dir():
            raise DatasetError(f"the --add-data folder '{folder}' is missing (or not a folder)")
        if path.is_relative_to(root.resolve()) or root.resolve().is_relative_to(path):
            raise DatasetError(f"--add-data '{folder}' and the data root '{root}' overlap, so its images would also "
                               "be split into validation and test: keep added folders outside the data root")
        scans.setdefault(path, scan_dataset(path, class_names))
    return list(scans.values())


def decode_added(scans: list[ScannedDataset], img_size: int, progress: bool,
                 stored: dict[str, list[str]] | None) -> tuple[CachedImages, dict[str, list[str]]]:
    """The added images decoded, and {absolute folder: the images decoded} for the split.

    ``stored`` (a stored split's listing): exactly those images, each still there and readable, so a resumed run
    trains on what it started with.
    """
    images, labels, paths, listing = [], [], [], {}
    for scanned in scans:
        folder = str(scanned.root)
        label_of = {s.path: s.label for s in scanned.samples}
        wanted = stored[folder] if stored is not None else list(label_of)
        decoded, kept = load_images(scanned.root, [p for p in wanted if p in label_of], img_size, progress)
        if stored is not None and len(kept) < len(wanted):
            lost = next(p for p in wanted if p not in set(kept))
            raise DatasetError(f"{len(wanted) - len(kept)} added images of the stored split under '{folder}' are missing "
                               f"or unreadable (first: {lost}): restore them, or start a new run")
        images.append(decoded)
        labels.append(np.array([label_of[p] for p in kept], dtype=np.int64))
        paths += [f"{folder}/{p}" for p in kept]
        listing[folder] = kept
    log.info("%d images added to the training split from %s", len(paths), ", ".join(listing))
    return CachedImages(np.concatenate(images), np.concatenate(labels), paths), listing


def make_loader(
    data: CachedImages,
    transform: Preprocess,
    batch_size: int,
    workers: int,
    train: bool,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Training loaders shuffle (DistributedSampler under DDP); eval loaders shard without padding."""
    dataset = data.with_transform(transform)
    sampler = None
    if train and world_size > 1:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    elif not train and world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    generator = torch.Generator().manual_seed(seed)
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=train and per_process % batch_size == 1,  # BatchNorm cannot train on a last batch of one image
        generator=generator,
        worker_init_fn=_seed_worker,
    )


def _seed_worker(worker_id: int) -> None:
    """Each worker's augmentation stream follows from the loader's per-epoch base seed."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset.dataset if isinstance(info.dataset, Subset) else info.dataset
    dataset.transform.reseed(torch.initial_seed() % 2**32)


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Shuffle order and augmentation of an epoch depend on (seed, epoch) only, so a resumed
    run repeats exactly what the uninterrupted one would have done."""
    loader.generator.manual_seed(seed + epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.dataset.transform.reseed(seed * 1000 + epoch)
