"""StitchingNet's fixed vocabulary: the 11 classes (0 = Normal) and the 11 fabrics."""
from __future__ import annotations

import re

CLASSES: tuple[str, ...] = (
    "Normal",
    "Skipped stitch",
    "Broken stitch",
    "Pinched fabric",
    "Crooked seam",
    "Thread sagging",
    "Puckering",
    "Stain and damage",
    "Needle mark",
    "Bobbin thread pulling up",
    "Overlapped stitch",
)

# Fabric letter -> folder name as in the Kaggle download ("A. Cotton-Poly", ...).
FABRICS: dict[str, str] = {
    "A": "A. Cotton-Poly",
    "B": "B. Linen-Poly",
    "C": "C. Denim-Poly",
    "D": "D. Velveteen-Poly",
    "E": "E. Polyester-Poly",
    "F": "F. Satin-Core",
    "G": "G. Chiffon-Poly",
    "H": "H. Nylon-Core",
    "I": "I. Jacquard-Poly",
    "J": "J. Oxford-Core",
    "K": "K. Polyester (coated)-Core",
}


def fabric_letters(text: str) -> list[str]:
    """A command line's fabric list: ``"a, B,j"`` -> ``["A", "B", "J"]``."""
    return sorted({part.strip().upper() for part in text.split(",") if part.strip()})


def class_folder(index: int) -> str:
    """Folder name used for a class, e.g. ``"3. Pinched fabric"``."""
    return f"{index}. {CLASSES[index]}"


def normalise_name(name: str) -> str:
    """Key that makes folder-name variants of one class equal.

    Drops a numeric prefix ("03_", "3. ", "3-"), case, and spaces/underscores/hyphens,
    so "3. Pinched fabric", "03_pinched_Fabric" and "PinchedFabric" all map to "pinchedfabric".
    """
    name = re.sub(r"^\s*\d+\s*[._\-)\s]\s*", "", name)
    return re.sub(r"[\s_\-]+", "", name).lower()


CLASS_KEYS: dict[str, int] = {normalise_name(c): i for i, c in enumerate(CLASSES)}


def normal_index(class_names: list[str] | tuple[str, ...]) -> int | None:
    """Index of the Normal class in a class list, found by name (None when the list has none).

    Every other class is a defect. A dataset with folders outside StitchingNet's classes is ordered
    by name, so Normal is not always class 0.
    """
    normal = normalise_name(CLASSES[0])
    return next((i for i, name in enumerate(class_names) if normalise_name(name) == normal), None)
