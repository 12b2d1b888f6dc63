"""The renderer of the synthetic StitchingNet look-alike: one photograph of a seam per (fabric, class, index).

Pure and deterministic: ``render_image`` depends only on its arguments (per-image random streams, table-based
cos, integer warping), so any process on any CPU draws the same bits. See docs/synthetic.md for what each class and
fabric looks like.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data.stitchingnet import CLASSES, FABRICS

_S = 224  # working resolution; other --img-size values are resized from it
_M = 16  # canvas margin, so warped pixels near the border still find fabric
_C = _S + 2 * _M
_SS = 2  # supersampling of drawn threads (anti-aliasing)
# Seams as close up as in the real photographs (thread 3-7.5 px wide at 224) and no defect so faint that it
# vanishes at the 64-128 px inputs used on CPUs: v1 drew thinner seams and fainter defects, and models
# trained from scratch on it stayed near chance (docs/synthetic.md, learnability).
_SEAM_SCALE = 2.5
_MIN_SEVERITY = 0.6
MIN_IMG_SIZE = 8  # smaller images cannot hold a stitch
MAX_ZOOM = 4.0  # beyond it the window (56 px) no longer holds a whole defect
_FABRIC_INDEX = {letter: i for i, letter in enumerate(FABRICS)}

_CY, _CX = np.mgrid[0:_C, 0:_C].astype(np.float32)
_Y, _X = np.mgrid[0:_S, 0:_S].astype(np.float32)


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32) / 255


@dataclass(frozen=True)
class _Fabric:
    weave: str  # plain | twill | basket | pile | satin | sheer | smooth | jacquard
    colour: np.ndarray  # warp / main colour
    colour2: np.ndarray  # weft / pattern colour
    period: tuple[float, float]  # thread pitch range in px at 224
    contrast: float  # weave relief in brightness
    thread: np.ndarray
    bobbin: np.ndarray  # tone of the lower thread when it shows on top
    thread_width: tuple[float, float]
    twist: float  # probability of a continuous twisted-rope look instead of dashes
    relief: float  # shading strength of folds (satin > cotton)
    lint: float  # probability of stray fibres
    alt_colour: np.ndarray | None = None  # occasional second dye (oxford comes in tan and orange)


# Colours measured by eye/median from the public samples; thread similar for A, C, D, G, contrasting otherwise.
_FABRIC_LOOKS: dict[str, _Fabric] = {
    "A": _Fabric("plain", _rgb(140, 142, 141), _rgb(134, 136, 137), (2.6, 3.2), 0.22, _rgb(178, 176, 168), _rgb(110, 112, 114), (1.3, 2.0), 0.2, 0.8, 0.3),
    "B": _Fabric("plain", _rgb(126, 170, 50), _rgb(116, 160, 46), (3.0, 3.8), 0.32, _rgb(178, 40, 32), _rgb(235, 225, 205), (1.3, 2.0), 0.7, 0.8, 0.3),
    "C": _Fabric("twill", _rgb(58, 58, 98), _rgb(205, 203, 210), (2.3, 2.8), 0.35, _rgb(92, 90, 118), _rgb(190, 188, 196), (1.4, 2.1), 0.3, 0.9, 0.2),
    "D": _Fabric("pile", _rgb(144, 134, 152), _rgb(126, 116, 136), (3.0, 4.0), 0.10, _rgb(104, 96, 114), _rgb(185, 178, 190), (1.3, 2.0), 0.3, 1.1, 0.3),
    "E": _Fabric("plain", _rgb(222, 14, 52), _rgb(212, 12, 50), (1.8, 2.3), 0.06, _rgb(246, 168, 38), _rgb(250, 215, 120), (1.3, 1.9), 0.1, 0.9, 0.3),
    "F": _Fabric("satin", _rgb(138, 133, 134), _rgb(128, 124, 125), (1.4, 1.8), 0.05, _rgb(62, 150, 82), _rgb(190, 200, 185), (1.2, 1.8), 0.6, 1.6, 0.2),
    "G": _Fabric("sheer", _rgb(137, 137, 142), _rgb(125, 126, 131), (1.9, 2.3), 0.12, _rgb(88, 90, 96), _rgb(175, 175, 180), (1.3, 2.0), 0.6, 1.1, 0.3),
    "H": _Fabric("twill", _rgb(56, 53, 60), _rgb(48, 46, 52), (1.7, 2.1), 0.14, _rgb(236, 236, 230), _rgb(160, 160, 170), (2.0, 3.0), 0.9, 1.0, 0.95),
    "I": _Fabric("jacquard", _rgb(186, 142, 124), _rgb(40, 46, 72), (2.6, 3.2), 0.30, _rgb(38, 40, 62), _rgb(190, 180, 170), (1.6, 2.4), 0.4, 0.9, 0.2),
    "J": _Fabric("basket", _rgb(180, 148, 104), _rgb(168, 136, 94), (2.3, 2.8), 0.45, _rgb(66, 48, 40), _rgb(205, 190, 160), (1.6, 2.4), 0.3, 0.9, 0.2, _rgb(226, 160, 36)),
    "K": _Fabric("smooth", _rgb(164, 100, 174), _rgb(158, 96, 168), (2.0, 2.5), 0.03, _rgb(52, 30, 74), _rgb(120, 120, 160), (1.3, 2.0), 0.8, 1.2, 0.2),
}


def image_rng(seed: int, fabric: str, class_index: int, index: int) -> np.random.Generator:
    """Per-image stream: independent of worker count and order, identical on every run."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _FABRIC_INDEX[fabric], class_index, index])))


# ----------------------------------------------------------------------------- noise helpers

# Fixed bank of Gaussian noise; images take random slices of it (drawing fresh normals is slow).
_BANK = np.random.default_rng(20240917).standard_normal(1 << 20, dtype=np.float32)
_BANK.flags.writeable = False  # _bank_noise hands out views


def _bank_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    size = math.prod(shape)
    start = int(rng.integers(0, _BANK.size - size))
    return _BANK[start:start + size].reshape(shape)


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], size: int = _C) -> np.ndarray:
    """Smooth value noise, roughly in [-1, 1], with ``cells`` (x, y) bumps across a ``size`` square.

    Pillow's resize, not a matrix product: BLAS kernels differ between CPUs, Pillow's C code does not.
    """
    grid = rng.random((cells[1] + 1, cells[0] + 1), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------- fabric


def _weave_coords(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grain-aligned canvas coordinates as a (1, C) row and a (C, 1) column, randomly shifted.

    Kept separable so per-thread terms cost 1-D work; the seam, not the weave, carries the tilt.
    """
    return _CX[:1] + np.float32(rng.uniform(0, 64)), _CY[:, :1] + np.float32(rng.uniform(0, 64))


_COS = np.round(np.cos(np.arange(4096) * (2 * np.pi / 4096)), 6).astype(np.float32)


def _cos(x: np.ndarray) -> np.ndarray:
    """cos from a 4096-entry table: fast, and exact integer indexing gives the same bits on every CPU
    (numpy's SIMD float kernels can differ in the last bit between processors)."""
    return _COS.take((x * (4096 / (2 * np.pi))).astype(np.int32) & 4095)


def _exp(x: np.ndarray) -> np.ndarray:
    """exp in float64, then float32: last-bit differences between CPUs' SIMD kernels vanish in the rounding."""
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def _weave(u: np.ndarray, v: np.ndarray, pitch: float, kind: str, rng: np.random.Generator, slub: float) -> tuple[np.ndarray, np.ndarray]:
    """Thread relief and warp-on-top weight, both in [0, 1], built from smooth waves (little aliasing).

    Warp threads run along v, weft along u; ``kind`` picks which one is on top where.
    """
    cu, cv = _cos(np.pi * u / pitch), _cos(np.pi * v / pitch)
    if kind == "twill":  # diagonal ribs, warp mostly on top
        valley = (0.5 + 0.5 * _cos(np.pi * (u + v) / pitch)) ** 2
        top = 1.1 - valley * (0.3 + 0.9 * _bank_noise(rng, (_C, _C)))  # weft shows as random specks
    elif kind == "basket":  # pairs of threads interlaced together
        top = 0.5 + 0.8 * _cos(np.pi * u / (2 * pitch)) * _cos(np.pi * v / (2 * pitch))
    else:
        top = 0.5 + 0.8 * cu * cv
    top = np.clip(top, 0, 1)
    relief = top * cu * cu + (1 - top) * cv * cv  # cos^2(x) = (1 + cos 2x) / 2: the thread profile
    # Uneven yarns: every thread gets its own brightness (slubs in linen, streaks in denim).
    jitter = rng.normal(0, slub, 2 * 512).astype(np.float32)
    yarn = top * jitter.take((u / pitch).astype(np.int32) & 511) + (1 - top) * jitter.take(512 + ((v / pitch).astype(np.int32) & 511))
    return relief * (1 + yarn), top


def _fabric(fab: _Fabric, rng: np.random.Generator) -> np.ndarray:
    """Flat fabric texture on the canvas, RGB float in [0, 1]."""
    u, v = _weave_coords(rng)
    pitch = rng.uniform(*fab.period)
    colour = fab.alt_colour if fab.alt_colour is not None and rng.random() < 0.2 else fab.colour
    colour2 = fab.colour2 * (colour / fab.colour)
    mottle = _smooth_noise(rng, (int(rng.integers(3, 7)),) * 2)
    fine = _bank_noise(rng, (_C, _C))
    flat = np.broadcast_to(colour, (_C, _C, 3))
    if fab.weave in ("plain", "twill", "basket"):
        relief, top = _weave(u, v, pitch, fab.weave, rng, 0.12)
        base = colour2 + top[..., None] * (colour - colour2)
        light = 1 - fab.contrast + fab.contrast * relief + 0.03 * mottle + 0.025 * fine
    elif fab.weave == "sheer":  # two fine layers slightly rotated: the moire of a sheer fabric
        relief, _ = _weave(u, v, pitch, "plain", rng, 0.05)
        a = math.radians(rng.uniform(2, 6))
        relief2, _ = _weave(u * math.cos(a) + v * math.sin(a), v * math.cos(a) - u * math.sin(a), pitch * 1.05, "plain", rng, 0.05)
        base = flat
        light = 1 - fab.contrast + 0.5 * fab.contrast * (relief + relief2) + 0.04 * mottle + 0.02 * fine
    elif fab.weave == "pile":  # velveteen: short fibres catching light in patches, faint cords
        grain = _smooth_noise(rng, (110, 110))
        rows = 0.5 + 0.5 * _cos(2 * np.pi * v / pitch)
        base = flat
        light = 1 + 0.14 * grain + 0.06 * mottle + fab.contrast * (rows - 0.5) + 0.06 * _smooth_noise(rng, (16, 16)) + 0.03 * fine
    elif fab.weave == "satin":  # long warp floats: faint lengthwise lines and broad sheen bands
        lines = rng.normal(0, 1, 512).astype(np.float32).take((u / pitch).astype(np.int32) & 511)
        sheen = _smooth_noise(rng, (int(rng.integers(2, 4)), 1))
        base = flat
        light = 1 + 0.015 * lines + 0.09 * sheen + 0.03 * mottle + 0.012 * fine
    elif fab.weave == "jacquard":  # woven two-colour pattern over a small diamond structure
        pattern = _smooth_noise(rng, (4, 4)) + 0.4 * _smooth_noise(rng, (10, 10)) + 0.1 * _smooth_noise(rng, (40, 40))
        on = np.clip((pattern - rng.uniform(-0.2, 0.2)) * 6 + 0.5 + 0.5 * fine, 0, 1)
        base = colour2 + on[..., None] * (colour - colour2)
        diamonds = np.abs(_cos(np.pi * (u + v) / (pitch * 1.4)) * _cos(np.pi * (u - v) / (pitch * 1.4)))
        light = 1 - fab.contrast + fab.contrast * np.sqrt(diamonds) + 0.05 * fine
    else:  # smooth coated polyester
        base = flat
        light = 1 + 0.012 * fine + 0.03 * mottle + 0.04 * _smooth_noise(rng, (2, 2))
    return base * light[..., None]


# ----------------------------------------------------------------------------- scene


class _Scene:
    """One image being built: seam geometry, thread strokes, fabric deformation and overlays."""

    def __init__(self, fab: _Fabric, rng: np.random.Generator) -> None:
        self.fab, self.rng = fab, rng
        self.y0 = _M + _S * rng.uniform(0.36, 0.64)
        self.slope = math.tan(math.radians(rng.uniform(-4, 4)))
        self.curve = rng.uniform(-7, 7)
        self.wobble = (rng.uniform(0, 1.2), rng.uniform(50, 200), rng.uniform(0, 2 * np.pi))
        self.bump: Callable[[np.ndarray], np.ndarray] | None = None  # crooked seam: offset as a function of x
        self.stitch = _SEAM_SCALE * rng.uniform(5, 10)
        self.width = _SEAM_SCALE * rng.uniform(*fab.thread_width)
        self.twisted = rng.random() < fab.twist
        self.gap = rng.uniform(0.0, 0.12) if self.twisted else rng.uniform(0.15, 0.38)
        self.zig = rng.uniform(0.5, 1.3) if self.twisted else rng.uniform(0.0, 0.5)
        self.layers: dict[str, Image.Image] = {}  # supersampled 'L' drawings, created when first drawn on
        self.height = np.zeros((_S, _S), np.float32)
        self.dx = np.zeros((_S, _S), np.float32)
        self.dy = np.zeros((_S, _S), np.float32)
        self.overlays: list[Callable[[np.ndarray], np.ndarray]] = []  # applied to the canvas after the threads
        self.xs = np.array([])
        self.keep = np.array([], bool)
        self.focus_x: float | None = None  # canvas point a zoomed camera looks at: the defect (y: on the seam by default)
        self.focus_y: float | None = None

    def seam_y(self, x: np.ndarray | float) -> np.ndarray:
        """Seam centre line in canvas coordinates (x in canvas coordinates)."""
        t = (np.asarray(x, np.float64) - _C / 2) / (_S / 2)
        amp, length, phase = self.wobble
        y = self.y0 + self.slope * t * _S / 2 + self.curve * t * t + amp * np.sin(2 * np.pi * np.asarray(x) / length + phase)
        return y + self.bump(np.asarray(x, np.float64)) if self.bump else y

    def lay_stitches(self) -> None:
        steps = self.stitch * (1 + self.rng.uniform(-0.08, 0.08, int(_C / self.stitch) + 4))
        self.xs = -self.rng.uniform(0, self.stitch) + np.concatenate([[0], np.cumsum(steps)])
        self.keep = np.ones(len(self.xs) - 1, bool)

    def stitch_at(self, x: float) -> int:
        return int(np.clip(np.searchsorted(self.xs, x) - 1, 0, len(self.keep) - 1))

    def _draw(self, layer: str) -> ImageDraw.ImageDraw:
        if layer not in self.layers:
            self.layers[layer] = Image.new("L", (_C * _SS, _C * _SS))
        return ImageDraw.Draw(self.layers[layer])

    def line(self, layer: str, points: list[tuple[float, float]], width: float) -> None:
        pts = [(x * _SS, y * _SS) for x, y in points]
        self._draw(layer).line(pts, fill=255, width=max(1, round(width * _SS)), joint="curve" if len(pts) > 2 else None)

    def dot(self, layer: str, x: float, y: float, r: float) -> None:
        self._draw(layer).ellipse([(x - r) * _SS, (y - r) * _SS, (x + r) * _SS, (y + r) * _SS], fill=255)

    def draw_stitches(self) -> None:
        """Regular stitches: dashes with gaps where the needle went in, or a twisted rope."""
        i = np.flatnonzero(self.keep)
        g = self.gap * (self.xs[i + 1] - self.xs[i]) / 2
        a, b = self.xs[i] + g, self.xs[i + 1] - g
        side = np.where(i % 2, self.zig, -self.zig)
        ya, yb = self.seam_y(a) + side, self.seam_y(b) - side
        for stitch in zip(a, ya, b, yb):
            self.line("top", [stitch[:2], stitch[2:]], self.width)

    def add_lint(self) -> None:
        """Stray fibres: a nuisance on every class, mostly visible on dark fabrics."""
        if self.rng.random() >= self.fab.lint:
            return
        for _ in range(int(self.rng.integers(1, 7))):
            x, y = self.rng.uniform(0, _C, 2)
            self.line("fibre", _curl(self.rng, x, y, self.rng.uniform(4, 16), self.rng.uniform(0, 2 * np.pi), 0.25), 0.5)


def _curl(rng: np.random.Generator, x: float, y: float, length: float, angle: float, bend: float) -> list[tuple[float, float]]:
    """A loose thread or fibre: a polyline whose direction drifts randomly."""
    points, steps = [(x, y)], max(3, int(length / 3))
    for _ in range(steps):
        angle += rng.normal(0, bend)
        x, y = x + length / steps * math.cos(angle), y + length / steps * math.sin(angle)
        points.append((x, y))
    return points


def _defect_x(scene: _Scene) -> float:
    """Where along the seam the defect sits (canvas x)."""
    scene.focus_x = _M + _S * scene.rng.uniform(0.15, 0.85)
    return scene.focus_x


def _skipped(scene: _Scene, severity: float) -> None:
    """The needle missed: one straight, taut float spans several stitch positions."""
    i = scene.stitch_at(_defect_x(scene))
    k = min(3 + int(severity * 4), len(scene.keep) - i)
    scene.keep[i:i + k] = False
    a, b = scene.xs[i] + 0.5, scene.xs[i + k] - 0.5
    lift = scene.rng.choice([-1, 1]) * scene.rng.uniform(0.5, 2.5)
    scene.line("top", [(a, scene.seam_y(a) + lift), (b, scene.seam_y(b) + lift)], scene.width * 0.85)


def _broken(scene: _Scene, severity: float) -> None:
    """The thread broke: a gap in the seam, usually with a loose end sticking out."""
    i = scene.stitch_at(_defect_x(scene))
    k = 1 + int(severity * 3.5)
    scene.keep[i:i + k] = False
    ends = [(scene.xs[i], 0.0), (scene.xs[min(i + k, len(scene.xs) - 1)], np.pi)]
    for n, (x, back) in enumerate(ends):
        if scene.rng.random() < (0.75 if n == 0 else 0.35):
            side = scene.rng.choice([-1, 1])
            angle = back + side * math.radians(scene.rng.uniform(15, 75)) * (1 if n == 0 else -1)
            length = scene.rng.uniform(5, 14 + 36 * severity)
            scene.line("top", _curl(scene.rng, x, float(scene.seam_y(x)), length, angle, 0.12), scene.width * 0.9)


def _pinched(scene: _Scene, severity: float) -> None:
    """Fabric caught in the seam: creases radiate from one point and the seam kinks there."""
    cx = _defect_x(scene) - _M
    cy = float(scene.seam_y(cx + _M)) - _M
    rx, ry = _X - cx, _Y - cy
    r = np.sqrt(rx * rx + ry * ry) + 1e-3
    amp = 3 + 6 * severity
    base = scene.rng.uniform(0, 2 * np.pi)
    for k in range(int(scene.rng.integers(2, 6))):
        theta = base + k * np.pi / 2 + scene.rng.normal(0, 0.45)
        along = rx * math.cos(theta) + ry * math.sin(theta)
        across = -rx * math.sin(theta) + ry * math.cos(theta) + scene.rng.uniform(-0.01, 0.01) * along ** 2
        reach, width = scene.rng.uniform(30, 60 + 60 * severity), scene.rng.uniform(3.5, 10)
        ridge = _exp(-(across / width) ** 2 - np.maximum(along, 0) / reach) * (along > 0) * np.clip(along / 3, 0, 1)
        scene.height += amp * scene.rng.uniform(0.5, 1) * ridge
    pull = _exp(-(r / (10 + 20 * severity)) ** 2)
    scene.dx += (0.15 + 0.25 * severity) * rx * pull
    scene.dy += (0.15 + 0.25 * severity) * ry * pull + scene.rng.choice([-1, 1]) * (2 + 4 * severity) * _exp(-(rx / 8) ** 2 - (ry / 20) ** 2)


def _crooked(scene: _Scene, severity: float) -> None:
    """The seam leaves its line for a stretch: a bump, or a step to a new line."""
    x0, width = _defect_x(scene), scene.rng.uniform(20, 70)
    amp = scene.rng.choice([-1, 1]) * (3.5 + 10 * severity)
    if scene.rng.random() < 0.65:
        scene.bump = lambda x: amp * np.where(np.abs(x - x0) < width / 2, 0.5 + 0.5 * np.cos(2 * np.pi * (x - x0) / width), 0)
    else:
        scene.bump = lambda x: amp * 0.5 * (1 + np.tanh((x - x0) / (width / 6)))


def _sagging(scene: _Scene, severity: float) -> None:
    """Low tension: loose stitches droop into irregular loops, losing the seam's rhythm."""
    x0 = _defect_x(scene)
    span = _S * 2 if scene.rng.random() < 0.3 else scene.rng.uniform(40, 140)
    lo, hi = scene.stitch_at(x0 - span / 2), scene.stitch_at(x0 + span / 2) + 1
    scene.keep[lo:hi] = False
    points = []
    for i in range(lo, hi):
        a, b = scene.xs[i], scene.xs[i + 1] + scene.rng.normal(0, 0.15 * scene.stitch)
        droop = scene.rng.choice([-1, 1]) * scene.rng.uniform(0.8, 1.5 + 4.5 * severity)
        for t in np.linspace(0, 1, 4, endpoint=False):
            x = a + (b - a) * t
            points.append((x, float(scene.seam_y(x)) + droop * math.sin(np.pi * t)))
    scene.line("top", points, scene.width * scene.rng.uniform(1.0, 1.25))


def _puckering(scene: _Scene, severity: float) -> None:
    """Uneven feed: the fabric gathers into irregular waves along the seam (across or beside it)."""
    rng = scene.rng
    dist = _Y - (scene.seam_y(_X + _M) - _M).astype(np.float32)
    x0, span = _defect_x(scene) - _M, rng.uniform(70, 240)
    window = np.sqrt(np.clip(1 - np.abs(_X - x0) / (span / 2), 0, 1))
    wave, amp = rng.uniform(20, 45), 1.2 + 3.5 * severity
    irregular = 3.5 * _smooth_noise(rng, (3, 3), _S)
    strength = window * (0.7 + 0.3 * _smooth_noise(rng, (4, 4), _S))
    if rng.random() < 0.7:  # wrinkles crossing the seam, often slanted, reaching further on one side
        reach = np.where(dist > 0, rng.uniform(12, 50), rng.uniform(12, 50))
        envelope = _exp(-(dist / reach) ** 2) * strength
        phase = 2 * np.pi * (_X + rng.uniform(-0.8, 0.8) * dist) / wave + irregular
        ridges = _cos(phase)
        scene.height += amp * ridges * envelope
        scene.dx += 0.3 * amp * _cos(phase - np.pi / 2) * envelope
        scene.dy += 0.4 * amp * ridges * envelope
    else:  # ripples running beside the seam
        envelope = _exp(-(dist / rng.uniform(20, 40)) ** 2) * strength
        scene.height += amp * _cos(2 * np.pi * dist / wave + irregular) * envelope
        scene.dy += 0.4 * amp * _cos(2 * np.pi * _X / rng.uniform(30, 60)) * envelope


def _stain(scene: _Scene, severity: float) -> None:
    """A dark or ink spot, a smear, or a scuffed/torn patch near the seam."""
    rng = scene.rng
    x0 = _defect_x(scene)
    y0 = float(scene.seam_y(x0)) + rng.uniform(-45, 45)
    scene.focus_y = (float(scene.seam_y(x0)) + y0) / 2  # a zoomed camera keeps both the seam and the stain in view
    kind = rng.choice(["spot", "smear", "scuff"], p=[0.45, 0.3, 0.25])
    size = 4 + 12 * severity
    a, b = (size, size * rng.uniform(0.6, 1)) if kind == "spot" else (size * rng.uniform(1.5, 3), size * rng.uniform(0.2, 0.45))
    angle = rng.uniform(0, np.pi)
    ink = [_rgb(20, 20, 24), _rgb(40, 50, 140), _rgb(70, 55, 40), _rgb(90, 90, 95)][int(rng.integers(4))]
    strength = rng.uniform(0.55, 0.9) if kind == "spot" else rng.uniform(0.4, 0.7)
    edge = _smooth_noise(rng, (8, 8))
    if kind == "scuff":
        for _ in range(int(rng.integers(2, 9))):
            px, py = x0 + rng.normal(0, a / 2), y0 + rng.normal(0, b)
            scene.line("fibre", _curl(rng, px, py, rng.uniform(4, 4 + a), angle + rng.normal(0, 0.3), 0.15), 0.5)

    def overlay(canvas: np.ndarray) -> np.ndarray:
        du, dv = _CX - x0, _CY - y0
        d = ((du * math.cos(angle) + dv * math.sin(angle)) / a) ** 2 + ((dv * math.cos(angle) - du * math.sin(angle)) / b) ** 2
        alpha = (np.clip((1 - d + 0.35 * edge) / 0.5, 0, 1) * strength)[..., None]
        if kind == "scuff":  # worn: lighter, greyer, weave rubbed flat
            worn = canvas.mean(axis=2, keepdims=True) * 0.4 + canvas * 0.6 + 0.12
            return canvas * (1 - alpha) + worn * alpha
        return canvas * (1 - alpha) + (canvas * 0.35 + ink * 0.65) * alpha

    scene.overlays.append(overlay)


def _needle_mark(scene: _Scene, severity: float) -> None:
    """Needle went through without thread: a row of small holes beside the seam."""
    rng = scene.rng
    n = int(3 + severity * 9)
    x = _defect_x(scene) - n * scene.stitch / 2
    offset = rng.choice([-1, 1]) * rng.uniform(3, 22)
    r = _SEAM_SCALE * rng.uniform(0.5, 0.8 + 0.7 * severity)
    for _ in range(n):
        scene.dot("holes", x, float(scene.seam_y(x)) + offset + rng.normal(0, 0.4), r)
        x += scene.stitch * rng.uniform(0.9, 1.1)


def _bobbin(scene: _Scene, severity: float) -> None:
    """Upper tension too high: the seam lies flat and straight, the bobbin thread showing beside it."""
    rng = scene.rng
    x0 = _defect_x(scene)
    span = _S * 2 if rng.random() < 0.5 else rng.uniform(50, 150)
    lo, hi = scene.stitch_at(x0 - span / 2), scene.stitch_at(x0 + span / 2) + 1
    scene.keep[lo:hi] = False
    xs = np.linspace(scene.xs[lo], scene.xs[hi], max(2, int((scene.xs[hi] - scene.xs[lo]) / 6)))
    ys = scene.seam_y(xs)
    scene.line("top", list(zip(xs, ys)), scene.width * 0.85)
    side = rng.choice([-1, 1]) * rng.uniform(0.6, 1.2 + severity * 1.3)
    scene.line("bobbin", list(zip(xs, ys + side)), scene.width * rng.uniform(0.5, 0.9))
    for x in scene.xs[lo:hi + 1]:  # loops of lower thread pulled up through each needle hole
        scene.dot("bobbin", x, float(scene.seam_y(x)) + side * 0.5, scene.width * rng.uniform(0.4, 0.6 + 0.4 * severity))


def _overlapped(scene: _Scene, severity: float) -> None:
    """Stitches piled up in one place: a short, thick, dark tangle on the seam."""
    rng = scene.rng
    x0, length = _defect_x(scene), rng.uniform(6, 12 + 26 * severity)
    band = rng.uniform(1.0, 1.5 + 2.5 * severity)
    for _ in range(int(6 + 16 * severity)):
        a, b = x0 + rng.uniform(-length / 2, length / 2, 2)
        pts = [(x, float(scene.seam_y(x)) + rng.uniform(-band, band)) for x in (a, (a + b) / 2, b)]
        scene.line("tangle", pts, scene.width * rng.uniform(0.8, 1.4))


_DEFECTS = {1: _skipped, 2: _broken, 3: _pinched, 4: _crooked, 5: _sagging, 6: _puckering, 7: _stain, 8: _needle_mark, 9: _bobbin, 10: _overlapped}


# ----------------------------------------------------------------------------- rendering


_LANES = np.uint32(0x00FF00FF)


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(a * (256 - w) + b * w) / 256 per byte of packed RGBX uint32 pixels, two bytes at a time.

    Consumes ``a`` and ``b`` (in-place steps: fewer large temporaries)."""
    iw = 256 - w
    lo = a & _LANES
    lo *= iw
    t = b & _LANES
    t *= w
    lo += t
    for x, k in ((a, iw), (b, w)):
        x >>= 8
        x &= _LANES
        x *= k
    a += b
    for x in (lo, a):
        x += 0x00800080
        x >>= 8
        x &= _LANES
    a <<= 8
    lo |= a
    return lo


def _warp(canvas: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear sample of the flat uint8 canvas at deformed coordinates (applied to every class alike).

    Integer arithmetic on packed pixels (1/256 px): fast, and the same bits on every CPU.
    """
    packed = np.dstack([canvas, canvas[..., :1]]).view(np.uint32)[..., 0].ravel()
    fx = np.rint(np.clip(u, 0, _C - 1.01) * 256).astype(np.uint32)
    fy = np.rint(np.clip(v, 0, _C - 1.01) * 256).astype(np.uint32)
    i = (fy >> 8) * _C + (fx >> 8)
    wx, wy = fx & 255, fy & 255
    top = _lerp(packed.take(i), packed.take(i + 1), wx)
    bottom = _lerp(packed.take(i + _C), packed.take(i + _C + 1), wx)
    return _lerp(top, bottom, wy)[..., None].view(np.uint8)[..., :3]


def _region(mask: Image.Image, pad: int = 0) -> tuple[slice, slice] | None:
    """Bounding box of a mask's ink (plus ``pad``): composite there only, threads cover ~5% of the frame."""
    box = mask.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return slice(max(y0 - pad, 0), min(y1 + pad, _C)), slice(max(x0 - pad, 0), min(x1 + pad, _C))


def _ink(mask: Image.Image, region: tuple[slice, slice]) -> np.ndarray:
    return np.asarray(mask, np.float32)[region][..., None] / 255


def render(fabric: str, class_index: int, rng: np.random.Generator, img_size: int = _S, zoom: float = 1.0) -> Image.Image:
    """One synthetic photograph of a seam on ``fabric`` showing defect ``class_index`` (0 = Normal).

    ``zoom`` > 1 frames a closer view: a (224 / zoom) px window around the defect (a random seam
    point for Normal), jittered so the defect is not always centred, then resized to ``img_size``.
    """
    fab = _FABRIC_LOOKS[fabric]
    scene = _Scene(fab, rng)
    canvas = _fabric(fab, rng)
    defect = _DEFECTS.get(class_index)
    severity = _MIN_SEVERITY + (1 - _MIN_SEVERITY) * rng.random() ** 0.8
    if defect is _crooked:  # changes the seam line before stitches are laid on it
        defect(scene, severity)
    scene.lay_stitches()
    if defect is not None and defect is not _crooked:
        defect(scene, severity)
    scene.draw_stitches()
    scene.add_lint()

    # Threads: a soft cast shadow first (it is what shows a same-colour thread), then thread colours.
    masks = {name: layer.reduce(_SS) for name, layer in scene.layers.items()}
    threads = [masks[n] for n in ("top", "bobbin", "tangle") if n in masks]
    cast = threads[0] if len(threads) == 1 else Image.fromarray(np.max([np.asarray(m) for m in threads], axis=0))
    sx, sy = (int(k) for k in rng.integers(0, 3, 2))
    shadow = cast.filter(ImageFilter.BoxBlur(1)).transform(cast.size, Image.AFFINE, (1, 0, -sx, 0, 1, -sy))
    if (box := _region(shadow)) is not None:
        canvas[box] *= 1 - 0.45 * _ink(shadow, box)
    if "holes" in masks:  # dark hole with a lighter rim of pushed-aside fibres
        box = _region(masks["holes"], pad=2)
        holes, rim = _ink(masks["holes"], box), _ink(masks["holes"].filter(ImageFilter.BoxBlur(1)), box)
        canvas[box] = canvas[box] * (1 - 0.7 * holes) + 0.35 * np.clip(rim - holes, 0, 1) * (1 - canvas[box])
    if "fibre" in masks and (box := _region(masks["fibre"])) is not None:
        canvas[box] += 0.6 * _ink(masks["fibre"], box) * (np.clip(canvas[box] + 0.35, 0, 1) - canvas[box])
    jitter = 1 + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    shine = 1 + 0.08 * _bank_noise(rng, (_C, _C, 1))
    thread = np.clip(fab.thread * jitter, 0, 1)
    for name, colour in (("bobbin", fab.bobbin * jitter), ("top", thread), ("tangle", thread * 0.75)):
        if name in masks and (box := _region(masks[name])) is not None:
            canvas[box] += _ink(masks[name], box) * (colour * shine[box] - canvas[box])
    for overlay in scene.overlays:
        canvas = overlay(canvas)

    # Fabric never lies perfectly flat: every class gets gentle undulations, sliding a little along
    # their slopes, and a sub-pixel shift. White balance is applied to the canvas before the warp.
    undulation = rng.uniform(0, 3) * _smooth_noise(rng, (3, 3), _S)
    scene.height += undulation
    gy, gx = np.gradient(undulation)
    drift = rng.uniform(0, 15)
    gain = 255 * rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.03, 0.03, 3))
    canvas *= gain.astype(np.float32)
    canvas += 0.5
    canvas8 = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    u = _X + (_M + rng.uniform(0, 1)) + scene.dx + drift * gx
    v = _Y + (_M + rng.uniform(0, 1)) + scene.dy + drift * gy
    image = _warp(canvas8, u, v).astype(np.float32)

    # Lighting: folds shaded by a random light direction (with highlights), a broad gradient, vignette.
    gy, gx = np.gradient(scene.height)
    phi = rng.uniform(0, 2 * np.pi)
    slope = gx * math.cos(phi) + gy * math.sin(phi)
    shade = 1 + 0.22 * fab.relief * slope
    psi, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.3)
    shade *= 1 + tilt * ((_X / _S - 0.5) * math.cos(psi) + (_Y / _S - 0.5) * math.sin(psi))
    shade *= 1 - rng.uniform(0, 0.15) * (((_X / _S - 0.5) ** 2 + (_Y / _S - 0.5) ** 2) * 2)
    image *= shade[..., None]
    image += (0.08 * 255 * fab.relief * np.maximum(slope, 0))[..., None]

    # Camera: slight defocus, sensor noise, the size asked for.
    image += 0.5
    image8 = np.clip(image, 0, 255, out=image).astype(np.uint8)
    defocus = rng.uniform(0, 1.0)
    if defocus > 0.2:
        image8 = np.asarray(Image.fromarray(image8).filter(ImageFilter.BoxBlur(defocus)))
    noise = rng.uniform(1, 4) * _bank_noise(rng, (_S, _S, 3)) + 0.5
    noise += image8
    pixels = Image.fromarray(np.clip(noise, 0, 255, out=noise).astype(np.uint8))
    if zoom != 1:
        pixels = pixels.crop(_zoom_window(scene, rng, zoom))
    if pixels.width != img_size:
        pixels = pixels.resize((img_size, img_size), Image.LANCZOS if img_size < pixels.width else Image.BICUBIC)
    return pixels


def _zoom_window(scene: _Scene, rng: np.random.Generator, zoom: float) -> tuple[int, int, int, int]:
    """Square crop box (image coordinates) of side 224 / zoom on the seam, around the defect.

    Drawn after everything else, so zoom 1 leaves every other random draw, and every image, unchanged.
    """
    side = round(_S / zoom)
    focus = scene.focus_x if scene.focus_x is not None else _M + _S * rng.uniform(0.15, 0.85)
    cx = focus - _M + rng.uniform(-0.25, 0.25) * side
    cy = (scene.focus_y if scene.focus_y is not None else float(scene.seam_y(focus))) - _M + rng.uniform(-0.15, 0.15) * side
    x0 = int(np.clip(round(cx - side / 2), 0, _S - side))
    y0 = int(np.clip(round(cy - side / 2), 0, _S - side))
    return x0, y0, x0 + side, y0 + side


def render_image(seed: int, fabric: str, class_index: int, index: int, img_size: int = _S, zoom: float = 1.0) -> tuple[Image.Image, int]:
    """Image number ``index`` of one (fabric, class) pair and the JPEG quality it is saved with."""
    rng = image_rng(seed, fabric, class_index, index)
    quality = int(rng.integers(85, 96))
    return render(fabric, class_index, rng, img_size, zoom), quality



def write_preview(path: Path, seed: int = 0, img_size: int = _S, cell: int = 80, zoom: float = 1.0) -> None:
    """Contact sheet: one row per fabric (A-K), one column per class (00-10), image 0 of each pair.

    Saved as a 128-colour PNG so the sheet stays small enough to commit (~250 KB).
    """
    font = ImageFont.load_default(size=max(10, cell // 6))
    pad = cell // 3
    sheet = Image.new("RGB", (pad + len(CLASSES) * cell, pad + len(FABRICS) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c in range(len(CLASSES)):
        draw.text((pad + c * cell + cell // 2, pad // 2), f"{c:02d}", fill="black", font=font, anchor="mm")
    for r, fabric in enumerate(FABRICS):
        draw.text((pad // 2, pad + r * cell + cell // 2), fabric, fill="black", font=font, anchor="mm")
        for c in range(len(CLASSES)):
            image, _ = render_image(seed, fabric, c, 0, img_size, zoom)
            sheet.paste(image.resize((cell, cell), Image.LANCZOS), (pad + c * cell, pad + r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
