"""Data: StitchingNet layouts, splits, augmentation, in-RAM caching and the synthetic set."""
