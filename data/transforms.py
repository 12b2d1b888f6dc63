"""Augmentation versions 0-3 (albumentations) and the shared eval preprocessing."""
from __future__ import annotations

import os

# albumentations asks PyPI for a newer version at import (up to 2 s per process, a warning per spawned worker when
# offline): a training machine on a factory network must not wait on it or leak requests.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

AUGMENT_VERSIONS = (0, 1, 2, 3)


def _augmentations(version: int) -> list[A.BasicTransform]:
    if version not in AUGMENT_VERSIONS:
        raise ValueError(f"augment version must be one of {AUGMENT_VERSIONS}, got {version}")
    ops: list[A.BasicTransform] = []
    if version >= 1:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Rotate(limit=10, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        ]
    if version >= 2:
        ops += [
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    if version >= 3:
        ops += [
            A.GaussianBlur(blur_limit=(3, 5), p=0.3),
            A.GaussNoise(std_range=(0.02, 0.06), p=0.3),
        ]
    return ops


class Preprocess:
    """uint8 HWC image -> normalised float CHW tensor, after optional augmentation.

    Images are already resized when cached, so this stays cheap enough for the
    main process on a 2-core CPU.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: int = 0):
        self.augment = A.Compose(_augmentations(augment)) if augment else None
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def reseed(self, seed: int) -> None:
        """Make the augmentation stream a function of ``seed`` (exact resume, per-worker streams)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        # a new float array: the cached image is a read-only memory map, never handed to torch as it is
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        return (tensor - self.mean) / self.std
