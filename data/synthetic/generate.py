"""The cached synthetic set: the renderer's images written in the real dataset's layout, on every core.

Each image comes from its own random stream (``render.image_rng``), so the files are the same bytes whatever the
number of worker processes and the order they finish in.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from data.stitchingnet import CLASSES, FABRICS, class_folder
from data.synthetic.render import MAX_ZOOM, MIN_IMG_SIZE, render_image
from utils.description import SyntheticSource
from utils.logs import progress as progress_bar

GENERATOR_VERSION = "2"
REAL_TOTAL = 14_565  # images in the real StitchingNet download
REAL_NORMAL_PER_FABRIC = 221
MARKER = ".complete.json"
_NAME = re.compile(r"^[A-K]_\d{2}_\d{4,}\.jpg$")


def plan_counts(like_stitchingnet: bool, per_class: int | None = None, fabrics: str | None = None) -> dict[tuple[str, int], int]:
    """Images per (fabric letter, class index); pure, so sizes can be checked without rendering.

    ``like_stitchingnet`` mirrors the real download: 221 Normal per fabric and the remaining
    images spread evenly (first pairs get the remainder) over the 110 defect pairs, 14,565 in all.
    ``fabrics`` (letters, e.g. "ABJ") keeps only those fabrics, with the counts they have in the full plan.
    """
    unknown = sorted(set(fabrics or "") - set(FABRICS))
    if unknown:
        raise ValueError(f"fabrics {','.join(unknown)} are not among the synthetic set's {','.join(FABRICS)}")
    chosen = [f for f in FABRICS if fabrics is None or f in fabrics]
    if like_stitchingnet:
        pairs = [(f, c) for f in FABRICS for c in range(1, len(CLASSES))]
        defects = REAL_TOTAL - REAL_NORMAL_PER_FABRIC * len(FABRICS)
        base, extra = divmod(defects, len(pairs))
        plan = {(f, 0): REAL_NORMAL_PER_FABRIC for f in FABRICS}
        plan.update({pair: base + (i < extra) for i, pair in enumerate(pairs)})
        return {(f, c): plan[f, c] for f in chosen for c in range(len(CLASSES))}
    if per_class is None or per_class <= 0:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    return {(f, c): per_class for f in chosen for c in range(len(CLASSES))}


def image_name(fabric: str, class_index: int, index: int) -> str:
    """File name in the real dataset's style, e.g. ``A_03_0007.jpg``."""
    return f"{fabric}_{class_index:02d}_{index:04d}.jpg"



_Task = tuple[Path, int, str, int, int, int, float]


def _write(task: _Task) -> None:
    out_dir, seed, fabric, class_index, index, img_size, zoom = task
    image, quality = render_image(seed, fabric, class_index, index, img_size, zoom)
    path = out_dir / FABRICS[fabric] / class_folder(class_index) / image_name(fabric, class_index, index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def _write_chunk(tasks: list[_Task]) -> int:
    for task in tasks:
        _write(task)
    return len(tasks)


@dataclass(frozen=True)
class SyntheticSet:
    """Which synthetic images: ``per_class`` per (fabric, class) pair, or the real dataset's counts with
    ``like_stitchingnet``; a ``zoom`` times closer camera; only the ``fabrics`` letters (None: all eleven)."""

    per_class: int | None = None
    seed: int = 0
    img_size: int = 224
    like_stitchingnet: bool = False
    zoom: float = 1.0
    fabrics: str | None = None

    def marker(self) -> dict:
        """What a generated folder's completion marker records of it."""
        return {"generator_version": GENERATOR_VERSION, "per_class": None if self.like_stitchingnet else self.per_class,
                "seed": self.seed, "like_stitchingnet": self.like_stitchingnet, "img_size": self.img_size,
                "zoom": self.zoom, "fabrics": self.fabrics}

    def folder_name(self) -> str:
        size = "like-stitchingnet" if self.like_stitchingnet else f"n{self.per_class}"
        zoomed = f"-zoom{self.zoom:g}" if self.zoom != 1 else ""
        subset = f"-fabrics-{self.fabrics}" if self.fabrics else ""
        return f"synthetic-v{GENERATOR_VERSION}-{size}-s{self.seed}-{self.img_size}px{zoomed}{subset}"


def generated_label(root: Path) -> str | None:
    """The results label ("synthetic", "synthetic-zoom4") of a folder this generator wrote (it holds the completion
    marker), so a generated set given as ``--data-root`` is never recorded as real data; None for any other folder."""
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
        return SyntheticSource(marker.get("per_class"), int(marker["img_size"]), float(marker.get("zoom", 1))).label
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def generate(out_dir: Path, spec: SyntheticSet, workers: int | None = None, progress: bool = True) -> int:
    """Write the synthetic set (or only the ``fabrics`` letters) under ``out_dir`` in the real nested layout; returns images written.

    Files are replaced atomically and ``.complete.json`` is written last, so a folder with the
    marker is whole. Our own stale images (from a larger earlier run) are removed. ``workers`` processes (default:
    every CPU) render; the progress bar follows the log level (hidden by ``-q``) and ``progress``.
    """
    if spec.seed < 0:
        raise ValueError(f"seed must be >= 0, got {spec.seed}")
    if spec.img_size < MIN_IMG_SIZE:
        raise ValueError(f"img_size must be >= {MIN_IMG_SIZE}, got {spec.img_size}")
    if not 1 <= spec.zoom <= MAX_ZOOM:
        raise ValueError(f"zoom must be in [1, {MAX_ZOOM}], got {spec.zoom}")
    plan = plan_counts(spec.like_stitchingnet, spec.per_class, spec.fabrics)
    out_dir = Path(out_dir)
    (out_dir / MARKER).unlink(missing_ok=True)
    tasks = []
    for (fabric, class_index), count in plan.items():
        folder = out_dir / FABRICS[fabric] / class_folder(class_index)
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {image_name(fabric, class_index, i) for i in range(count)}
        for old in folder.iterdir():
            if (old.name.endswith(".tmp") or _NAME.match(old.name)) and old.name not in wanted:
                old.unlink()
        tasks += [(out_dir, spec.seed, fabric, class_index, i, spec.img_size, spec.zoom) for i in range(count)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    step = max(1, min(32, len(tasks) // (4 * workers)))  # small enough to keep every worker busy
    chunks = [tasks[i:i + step] for i in range(0, len(tasks), step)]
    with progress_bar(None, total=len(tasks), unit="img", desc="synthetic", disable=not progress) as bar:
        if workers == 1:
            for chunk in chunks:
                bar.update(_write_chunk(chunk))
        else:
            # spawned, not forked: a fork copies locks other threads hold (ONNX Runtime's, torch's, a logger's) and
            # can hang a worker forever. Each child imports the launching script once (a few seconds for main.py).
            with get_context("spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_write_chunk, chunks):
                    bar.update(done)
    marker = {**spec.marker(), "images": len(tasks)}
    tmp = out_dir / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, out_dir / MARKER)
    return len(tasks)


def ensure_synthetic(cache_root: Path, spec: SyntheticSet, workers: int | None = None, progress: bool = True) -> Path:
    """Cached synthetic set ``spec``; generated only when its completion marker is missing or differs."""
    folder = Path(cache_root) / spec.folder_name()
    wanted = spec.marker()
    try:
        # markers from before --zoom and --fabrics are zoom 1, all fabrics
        done = {"zoom": 1.0, "fabrics": None, **json.loads((folder / MARKER).read_text())}
        if {k: done.get(k) for k in wanted} == wanted:
            return folder
    except (OSError, ValueError):  # no marker yet, or a torn one: (re)generate
        pass
    generate(folder, spec, workers, progress)
    return folder
