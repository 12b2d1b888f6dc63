"""Procedural StitchingNet look-alike: 11 fabrics x 11 stitch classes, written in the real layout.

Lets the toolkit be run, tested and benchmarked end to end without the (non-commercial) real dataset.
``render`` draws one image, ``generate`` writes (and caches) a set on every core, ``python -m data.synthetic``
is the command line. See docs/synthetic.md.
"""
from data.synthetic.generate import (
    GENERATOR_VERSION,
    MARKER,
    REAL_TOTAL,
    SyntheticSet,
    ensure_synthetic,
    generate,
    generated_label,
    image_name,
    plan_counts,
)
from data.synthetic.render import MAX_ZOOM, MIN_IMG_SIZE, image_rng, render, render_image, write_preview

__all__ = ["GENERATOR_VERSION", "MARKER", "MAX_ZOOM", "MIN_IMG_SIZE", "REAL_TOTAL", "SyntheticSet", "ensure_synthetic", "generate",
           "generated_label", "image_name", "image_rng", "plan_counts", "render", "render_image", "write_preview"]
