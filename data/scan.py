"""Find the images of a dataset tree and label them.

Three layouts are read: ``<root>/<fabric>/<class>/<image>`` (the Kaggle download),
``<root>/<class>/<image>``, and flat ``{fabric}_{class:02d}_{index}.jpg`` files (the
public StitchingNet samples).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from data.stitchingnet import CLASS_KEYS, CLASSES, normalise_name
from utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
_SAMPLE_NAME = re.compile(r"^([A-Za-z])_(\d{2})_[^/]*$")
_FABRIC_FOLDER = re.compile(r"^([A-Za-z])\s*[.)_\-]\s")


class DatasetError(UserError):
    """A data problem the user can fix; its message says how."""


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, with forward slashes
    label: int
    fabric: str  # fabric letter ("A".."K") where known, else the folder name or ""


@dataclass(frozen=True)
class ScannedDataset:
    root: Path
    samples: list[Sample]
    class_names: list[str]


def _fabric_id(folder: str) -> str:
    match = _FABRIC_FOLDER.match(folder)
    return match.group(1).upper() if match else folder


def fabric_of(rel_path: str) -> str:
    """Fabric of an image path relative to its data root, by the layout rules above ("" for <root>/<class>/<image>)."""
    parts = rel_path.split("/")
    if len(parts) == 1:
        match = _SAMPLE_NAME.match(parts[0])
        return match.group(1).upper() if match else ""
    return _fabric_id(parts[-3]) if len(parts) > 2 else ""


def class_name_of(rel_path: str) -> str | None:
    """Class folder name of an image path relative to its data root, a flat sample name's class (``C_03_…`` ->
    "Pinched fabric"), or None where a flat name does not say."""
    parts = rel_path.split("/")
    if len(parts) > 1:
        return parts[-2]
    match = _SAMPLE_NAME.match(parts[0])
    return CLASSES[int(match.group(2))] if match and int(match.group(2)) < len(CLASSES) else None


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_dataset(root: Path | str, class_names: list[str] | None = None) -> ScannedDataset:
    """Label every image under ``root``; raises DatasetError when there is nothing to read.

    ``class_names``: label with these classes, matched by name, instead of the tree's own: images added to a
    dataset of those classes (a reviewed ``stream.py --collect`` folder) get its class indices; the tree may lack
    some classes, but a class folder outside them is an error.
    """
    root = Path(root)
    hint = HOW_TO_GET_DATA if class_names is None else "Give a folder of <class>/<image> files."
    if root.is_file():
        raise DatasetError(f"data root '{root}' is a file, but a folder of images is expected. {hint}")
    if not root.is_dir():
        raise DatasetError(f"data root '{root}' does not exist. {hint}")
    files = _list_images(root)
    if not files:
        raise DatasetError(f"no images found under '{root}'. {hint}")

    entries: list[tuple[str, str, str]] = []  # (relative path, class folder name, fabric)
    for file in files:
        rel = file.relative_to(root).as_posix()
        name = class_name_of(rel)
        if name is None:
            raise DatasetError(
                f"cannot tell the class of '{rel}': put images in class folders or name them "
                "{fabric}_{class:02d}_{index}.jpg"
            )
        entries.append((rel, name, fabric_of(rel)))

    keys = {normalise_name(name) for _, name, _ in entries}
    if class_names is not None:
        index = {normalise_name(name): i for i, name in enumerate(class_names)}
        unknown = sorted({name for _, name, _ in entries if normalise_name(name) not in index})
        if unknown:
            raise DatasetError(f"the class folders {unknown} under '{root}' are not among the data's classes "
                               f"{list(class_names)}: move their images into one of those class folders")
        class_names = list(class_names)
    elif keys <= CLASS_KEYS.keys():
        class_names = list(CLASSES)
        index = CLASS_KEYS
    else:
        display = {}
        for _, name, _ in entries:
            display.setdefault(normalise_name(name), name)
        ordered = sorted(display)
        class_names = [display[k] for k in ordered]
        index = {k: i for i, k in enumerate(ordered)}
        foreign = sorted(display[k] for k in keys - CLASS_KEYS.keys())
        if keys & CLASS_KEYS.keys():  # a StitchingNet tree with strangers: probably a mistake
            log.warning("class folders %s under '%s' are not StitchingNet classes: the %d folder names become the "
                        "classes, in name order", foreign, root, len(class_names))
    samples = [Sample(rel, index[normalise_name(name)], fabric) for rel, name, fabric in entries]
    return ScannedDataset(root, samples, class_names)


HOW_TO_GET_DATA = (
    "Download StitchingNet from Kaggle (hyungjung/stitchingnet-dataset) and unpack it so that "
    "<data-root>/<fabric folder>/<class folder>/<image>.jpg exists (default --data-root "
    "dataset/StitchingNet), or run with --synthetic to use the embedded synthetic StitchingNet."
)
