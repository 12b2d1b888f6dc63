"""Reproducible train/val/test splits, stratified by (fabric, class)."""
from __future__ import annotations

from collections import Counter

from sklearn.model_selection import train_test_split

from data.scan import DatasetError, Sample


def _strata(samples: list[Sample], n_parts: list[int]) -> list | None:
    """(fabric, class) strata when every group is large enough for each split, else class only."""
    min_needed = 2  # sklearn needs two members of each stratum to split it
    by_pair = Counter((s.fabric, s.label) for s in samples)
    if min(by_pair.values()) >= min_needed and all(n >= len(by_pair) for n in n_parts):
        return [f"{s.fabric}|{s.label}" for s in samples]
    by_class = Counter(s.label for s in samples)
    if min(by_class.values()) >= min_needed and all(n >= len(by_class) for n in n_parts):
        return [s.label for s in samples]
    return None


def _split_two(samples: list[Sample], second_share: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    n_second = max(1, round(len(samples) * second_share))
    strata = _strata(samples, [n_second, len(samples) - n_second])
    return train_test_split(samples, test_size=n_second, random_state=seed, stratify=strata)


def select_fabrics(samples: list[Sample], fabrics: list[str], flag: str = "--fabrics") -> list[Sample]:
    """The samples of these fabrics; a fabric the data lacks is an error naming ``flag``."""
    wanted = {f.strip().upper() for f in fabrics}
    known = {s.fabric.upper() for s in samples}
    unknown = wanted - known
    if unknown:
        raise DatasetError(
            f"{flag} {','.join(sorted(unknown))} not in the data; fabrics found: "
            f"{','.join(sorted(known)) or 'none (layout has no fabric folders)'}"
        )
    return [s for s in samples if s.fabric.upper() in wanted]


def make_split(
    samples: list[Sample],
    seed: int,
    val_share: float = 0.15,
    test_share: float = 0.15,
    test_fabrics: list[str] | None = None,
    fabrics: list[str] | None = None,
) -> dict:
    """Split ``samples`` into train/val/test lists of relative paths.

    The result depends only on the sorted file list, the shares and ``seed``. ``fabrics`` keeps
    only those fabrics (a detector for what one line sews). With ``test_fabrics`` those fabrics
    form the whole test set (unseen-fabric generalisation) and the rest is split into train/val.
    """
    samples = sorted(samples, key=lambda s: s.path)
    if fabrics:
        samples = select_fabrics(samples, fabrics)
    if len(samples) < 3:
        raise DatasetError(f"need at least 3 images to split into train/val/test, found {len(samples)}")
    if test_fabrics:
        test = select_fabrics(samples, test_fabrics, "--test-fabrics")
        held_out = {s.path for s in test}
        rest = [s for s in samples if s.path not in held_out]
        if len(rest) < 2:
            raise DatasetError("--test-fabrics leaves fewer than 2 images for train and validation")
        train, val = _split_two(rest, val_share / (1 - test_share), seed)
    else:
        rest, test = _split_two(samples, test_share, seed)
        train, val = _split_two(rest, val_share / (1 - test_share), seed)
    return {
        "seed": seed,
        "val_share": val_share,
        "test_share": test_share,
        "test_fabrics": sorted(test_fabrics) if test_fabrics else [],
        "fabrics": sorted({f.strip().upper() for f in fabrics}) if fabrics else [],
        **{name: sorted(s.path for s in part) for name, part in (("train", train), ("val", val), ("test", test))},
    }
