"""stream.py --collect: keep the tiles a person should label, so the line's own pictures can retrain the model.

Two kinds of tile are worth a person's look: the defective tiles of an alerted frame (was the alert right?) and
every tile whose defect score lies near the threshold (the model was unsure). Each is saved at source resolution
(the region the model saw, before resizing) as ``<dir>/<predicted class>/<source>_f<frame>_t<tile>.png``: moving
a file into the right class folder labels it, and the folder is a ``<root>/<class>/<image>`` dataset that
data/scan.py reads. ``<dir>/collected.csv`` records every saved file. Torch-free: it runs on the edge device.
"""
from __future__ import annotations

import csv
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from deploy.sources import Frame
from deploy.stream import Verdict
from utils.errors import UserError
from utils.io import WriteError, atomic_open

log = logging.getLogger(__name__)

CSV_NAME = "collected.csv"
COLUMNS = ("file", "source", "source_file", "frame", "tile", "time", "score", "threshold", "predicted", "reason")
ARGMAX_CENTRE = 0.5  # the band's centre for a model without a threshold (argmax verdicts)
DEFAULT_BAND = 0.1
DEFAULT_MAX = 2000


class CollectError(UserError):
    """The --collect folder cannot be used."""


def safe_name(text: str) -> str:
    """Only letters, digits, '.', '_' and '-' (a URL or 'camera 0' becomes a file-name part), never empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "source"


def source_stem(source: str, live: bool, started: datetime) -> str:
    """The file-name prefix of a source: a file's or folder's stem; a live source (camera, URL) also gets the run's
    start time, since its frame numbers restart every run and would otherwise name a new tile like an old one."""
    if not live:
        return safe_name(Path(source).stem)  # 'line3.mp4' -> 'line3', 'frames/' -> 'frames'
    return f"{safe_name(source.split('://', 1)[-1])}_{started.strftime('%Y%m%dT%H%M%SZ')}"  # 'camera 0' -> 'camera_0_2024...'


def save_png(image: np.ndarray, path: Path) -> None:
    """A lossless PNG written atomically (a reader never sees half a picture)."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} tile as PNG")
    with atomic_open(path, "wb") as handle:
        handle.write(encoded.tobytes())


class Collector:
    """Saves the alerted defective tiles and the tiles within ``band`` of the threshold, at most ``limit`` per run.

    A file name already in any class folder (the same tile saved by an earlier run of the same file, perhaps
    labelled since) is kept, not saved twice.
    """

    def __init__(self, folder: Path, band: float, limit: int, class_names: list[str], source: str, live: bool):
        if folder.is_file():
            raise CollectError(f"--collect '{folder}' is a file: give a folder (it is created if missing)")
        bad = [name for name in class_names if name in ("", ".", "..") or "/" in name or "\\" in name]
        if bad:
            raise CollectError(f"the model's class names {bad} cannot be folder names: --collect needs class names "
                               "that are valid folder names")
        self.folder, self.band, self.limit, self.class_names = folder, band, limit, list(class_names)
        self.source = source
        self.stem = source_stem(source, live, datetime.now(UTC))
        self.saved = self.skipped = 0
        self.stopped = False
        try:
            for name in self.class_names:
                (folder / name).mkdir(parents=True, exist_ok=True)
            table = folder / CSV_NAME
            new = not table.exists() or table.stat().st_size == 0
            self._handle = open(table, "a", encoding="utf-8", newline="")
        except OSError as error:
            raise WriteError.of(folder, error) from None
        self._csv = csv.writer(self._handle)
        if new:
            self._write(COLUMNS)

    def _write(self, row: tuple | list) -> None:
        self._csv.writerow(row)
        self._handle.flush()  # a kill loses no row already written

    def picks(self, verdict: Verdict, threshold: float | None) -> list[tuple[int, str]]:
        """(tile, reason) of the tiles to keep: 'alert' (defective in an alerted frame) before 'uncertain' (in the band)."""
        centre = ARGMAX_CENTRE if threshold is None else threshold
        alerted = set(verdict.defect_tiles) if verdict.alert else set()
        return [(i, "alert" if i in alerted else "uncertain") for i, score in enumerate(verdict.scores)
                if i in alerted or abs(score - centre) <= self.band]

    def add(self, frame: Frame, verdict: Verdict, threshold: float | None) -> int:
        """Save this frame's tiles worth labelling; returns how many files were written."""
        if self.stopped or frame.image is None:
            return 0
        picks = self.picks(verdict, threshold)
        written = 0
        for tile, reason in picks:
            if self.saved >= self.limit:
                self.stopped = True
                log.warning("--collect-max %d files reached: no more tiles are collected in this run (inspection goes on)",
                            self.limit)
                break
            name = f"{self.stem}_f{frame.index:06d}_t{tile:02d}.png"
            if any((self.folder / cls / name).exists() for cls in self.class_names):
                self.skipped += 1
                continue
            predicted = verdict.predicted[tile]
            box = verdict.boxes[tile]
            try:
                save_png(frame.image[box.y:box.y + box.h, box.x:box.x + box.w], self.folder / predicted / name)
                self._write((f"{predicted}/{name}", self.source, frame.path or "", frame.index, tile,
                             datetime.now(UTC).isoformat(timespec="milliseconds"), f"{verdict.scores[tile]:.6f}",
                             "" if threshold is None else f"{threshold:.6f}", predicted, reason))
            except (WriteError, OSError) as error:  # a full or read-only disk ends collecting, not the inspection
                self.stopped = True
                log.warning("--collect stopped: %s (inspection goes on)", error)
                break
            self.saved += 1
            written += 1
        return written

    def close(self) -> None:
        self._handle.close()

    def report(self) -> str:
        """The run's line for the summary."""
        earlier = f", {self.skipped} kept from an earlier run" if self.skipped else ""
        return f"collected {self.saved} tiles to label under '{self.folder}' (listed in {CSV_NAME}{earlier})"
