"""Inspect a stream of frames: tiles classified in one batch, a verdict per frame, debounced alerts, JSON lines, summary.

Torch-free with an ``EdgeClassifier``; stream.py is its command line (deploy.serve its view in a browser).
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import cv2
import numpy as np

from deploy.overlay import draw_overlay, save_frame
from deploy.sources import Frame
from deploy.tiling import Box, GeometryError, cut_tiles, tile_boxes
from utils.errors import UserError
from utils.io import WriteError
from utils.operating_point import flag_defects, top_defect_classes

log = logging.getLogger(__name__)

STAGES = ("capture", "preprocess", "inference")
TIMING_WINDOW = 10_000  # frames whose stage times the percentiles cover (memory stays flat on a days-long run)
STATUS_EVERY_S = 5.0
WINDOW = "stream.py"


class Classifier(Protocol):
    """``deploy.edge.EdgeClassifier`` or ``deploy.classify.TorchClassifier``."""

    info: dict
    normal: int | None

    def prepare(self, images: np.ndarray) -> Any: ...
    def infer(self, inputs: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class Settings:
    roi: Box | None = None
    tile: int | None = None
    stride: int | None = None
    threshold: float | None = None  # None: a tile is defective when its top class is not Normal (as predict.py)
    consecutive: int = 1


@dataclass
class Verdict:
    """One frame's verdict; ``tile`` is the most defective tile (highest 1 - P(Normal)) among the deciding ones."""

    frame: int
    defect: bool
    label: str
    confidence: float
    defect_probability: float
    tile: int
    boxes: list[Box]
    defect_tiles: list[int]
    labels: list[str | None]  # per tile: "class 0.93" when defective, None when normal
    alert: bool = False
    scores: list[float] = field(default_factory=list)  # per tile: the defect score 1 - P(Normal) (for --collect)
    predicted: list[str] = field(default_factory=list)  # per tile: its top defect class when defective, else Normal

    def to_json(self) -> dict:
        return {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "frame": self.frame,
                "verdict": "defect" if self.defect else "normal", "class": self.label, "confidence": round(self.confidence, 6),
                "defect_probability": round(self.defect_probability, 6), "tile": self.tile, "box": self.boxes[self.tile].to_list(),
                "defect_tiles": self.defect_tiles, "alert": self.alert}


class Debouncer:
    """An alert when ``consecutive`` defective frames come in a row, once per such run: one bad frame never alerts
    (with N > 1) and a lasting defect does not alert on every frame."""

    def __init__(self, consecutive: int):
        self.consecutive, self.run = consecutive, 0

    def update(self, defective: bool) -> bool:
        self.run = self.run + 1 if defective else 0
        return self.run == self.consecutive


class Inspector:
    """Cuts a frame into tiles, classifies them in one batch and judges the frame."""

    def __init__(self, classifier: Classifier, settings: Settings):
        if classifier.normal is None:
            raise UserError(f"the model's classes {classifier.info['class_names']} have no Normal class: "
                            "stream.py cannot tell defects apart")
        self.classifier, self.settings = classifier, settings
        self.names: list[str] = classifier.info["class_names"]
        self.size: int = classifier.info["img_size"]
        self._boxes: dict[tuple[int, int], list[Box]] = {}

    def boxes(self, frame: np.ndarray) -> list[Box]:
        """Tile boxes for this frame size (computed once per size: a folder may mix sizes)."""
        key = (frame.shape[1], frame.shape[0])
        if key not in self._boxes:
            self._boxes[key] = tile_boxes(key, self.settings.roi, self.settings.tile, self.settings.stride)
        return self._boxes[key]

    def inspect(self, index: int, frame: np.ndarray, times: dict[str, float]) -> Verdict:
        """The frame's verdict; adds the preprocess and inference seconds to ``times``."""
        started = time.perf_counter()
        boxes = self.boxes(frame)
        inputs = self.classifier.prepare(cut_tiles(frame, boxes, self.size))
        prepared = time.perf_counter()
        probs = self.classifier.infer(inputs)
        times["preprocess"], times["inference"] = prepared - started, time.perf_counter() - prepared
        return self.judge(index, probs, boxes)

    def judge(self, index: int, probs: np.ndarray, boxes: list[Box]) -> Verdict:
        normal = self.classifier.normal
        defect_prob, defective = flag_defects(probs, normal, self.settings.threshold)
        top_defect = top_defect_classes(probs, normal)  # the class a defective tile is reported as
        labels = [f"{self.names[top_defect[i]]} {probs[i, top_defect[i]]:.2f}" if defective[i] else None for i in range(len(boxes))]
        candidates = np.flatnonzero(defective) if defective.any() else np.arange(len(boxes))
        tile = int(candidates[np.argmax(defect_prob[candidates])])
        label = int(top_defect[tile]) if defective[tile] else normal
        predicted = [self.names[top_defect[i]] if defective[i] else self.names[normal] for i in range(len(boxes))]
        return Verdict(index, bool(defective.any()), self.names[label], float(probs[tile, label]), float(defect_prob[tile]), tile,
                       boxes, [int(i) for i in np.flatnonzero(defective)], labels, scores=defect_prob.tolist(), predicted=predicted)


@dataclass
class Summary:
    """Counts and per-stage latencies of a run, for the status line and the final summary."""

    frames: int = 0
    unreadable: int = 0
    defective: int = 0
    alerts: int = 0
    reconnects: int = 0
    tiles: int = 0
    started: float = field(default_factory=time.perf_counter)
    times: dict[str, deque] = field(default_factory=lambda: {stage: deque(maxlen=TIMING_WINDOW) for stage in STAGES})

    def add(self, verdict: Verdict, times: dict[str, float]) -> None:
        self.frames += 1
        self.defective += verdict.defect
        self.alerts += verdict.alert
        self.tiles = len(verdict.boxes)
        for stage in STAGES:
            self.times[stage].append(times[stage])

    @property
    def fps(self) -> float:
        return self.frames / max(time.perf_counter() - self.started, 1e-9)

    def percentiles_ms(self, stage: str) -> tuple[float, float]:
        values = np.asarray(self.times[stage]) * 1000
        return (float(np.percentile(values, 50)), float(np.percentile(values, 90))) if len(values) else (float("nan"),) * 2

    def bound_fps(self) -> float:
        """1 / (mean capture + preprocess + inference time): the rate the stages allow with nothing else in the loop."""
        return 1 / max(sum(float(np.mean(self.times[s])) for s in STAGES if self.times[s]), 1e-9)

    def lines(self, source: str, model: str, benchmark: bool) -> list[str]:
        elapsed = time.perf_counter() - self.started
        stages = ", ".join(f"{stage} {p50:.2f}/{p90:.2f}" for stage in STAGES for p50, p90 in [self.percentiles_ms(stage)])
        lines = [f"{source}: {self.frames + self.unreadable} frames ({self.frames} classified, {self.unreadable} unreadable, "
                 f"{self.reconnects} reconnects), {self.defective} defective, {self.alerts} alerts, {elapsed:.1f} s, {self.fps:.1f} FPS",
                 f"latency ms p50/p90: {stages} (last {min(self.frames, TIMING_WINDOW)} frames)",
                 f"{model}, {self.tiles} tiles per frame; peak RSS {peak_rss_mb():.0f} MB; "
                 f"torch imported: {sys.modules.get('torch') is not None}"]
        if benchmark and self.frames:
            bound = self.bound_fps()
            lines.append(f"benchmark: {self.fps:.1f} FPS end to end = {self.fps / bound:.0%} of 1 / (capture + preprocess + inference, "
                         f"means) = {bound:.1f} FPS")
        return lines


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alert_file(index: int) -> str:
    """The file name of an alerted frame saved by --save-defects."""
    return f"frame_{index:06d}.jpg"


class Collecting(Protocol):
    """``deploy.collect.Collector`` (--collect): keeps the tiles worth labelling; a protocol, so stream needs no collect import."""

    def add(self, frame: Frame, verdict: Verdict, threshold: float | None) -> int: ...


class Viewing(Protocol):
    """``deploy.serve.LiveView`` (--serve): takes each frame's verdict without waiting for any viewer; a protocol, so
    stream needs no serve import."""

    def publish(self, frame: Frame, verdict: Verdict, line: str, summary: Summary, times: dict[str, float]) -> None: ...


@dataclass
class Outputs:
    """Where results go: JSON lines (a stream or None), alerted frames, a window, collected tiles, the browser view."""

    jsonl: IO[str] | None = None
    save_defects: Path | None = None
    show: bool = False
    status: IO[str] | None = None  # the status line every few seconds (None: not shown)
    collect: Collecting | None = None
    view: Viewing | None = None


def open_window() -> None:
    """The --show window; refused in one line where OpenCV has no GUI (opencv-python-headless)."""
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error:
        raise UserError("--show needs OpenCV with GUI support: pip install opencv-python (not -headless) "
                        "and run it on a desktop") from None


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise its KeyboardInterrupt when the block is done,
    so a line being written is written whole. Only the main thread can set signal handlers; elsewhere it holds nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def write_line(handle: IO[str], line: str) -> None:
    """One JSON line, flushed, never cut by Ctrl-C; a closed pipe (``| head``) goes up as it is, any other refusal (a
    full disk) becomes one error line, after the summary of the frames inspected so far."""
    try:
        with ctrl_c_held():
            handle.write(line + "\n")
            handle.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise WriteError.of(getattr(handle, "name", "the JSON lines"), error) from None


class StopRequest:
    """A signal handler that asks ``run`` to stop after the frame in hand, so no JSON line is cut in half."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum


def run(frames: Iterable[Frame], inspector: Inspector, settings: Settings, outputs: Outputs, summary: Summary,
        stop: StopRequest | None = None) -> None:
    """Inspect every frame until the source ends, the window is closed (q/Esc), Ctrl-C or a ``stop`` request; every
    output is flushed."""
    debouncer = Debouncer(settings.consecutive)
    next_status = time.perf_counter() + STATUS_EVERY_S
    try:
        for frame in frames:
            if stop is not None and stop.signal is not None:
                log.warning("stopped by signal %d: summary of the frames so far", stop.signal)
                break
            if frame.image is None:
                summary.unreadable += 1
                log.warning("frame %d is unreadable: skipped", frame.index)
                continue
            times = {"capture": frame.capture_s}
            try:
                verdict = inspector.inspect(frame.index, frame.image, times)
            except GeometryError as error:
                if not summary.frames:  # the first frame: the ROI or tiles are wrong, not the frame
                    raise
                summary.unreadable += 1  # one odd frame (another size) must not stop the line's inspection
                log.warning("frame %d skipped: %s", frame.index, error)
                continue
            verdict.alert = debouncer.update(verdict.defect)
            summary.add(verdict, times)
            line = json.dumps(verdict.to_json()) if outputs.jsonl is not None or outputs.view is not None else ""
            if outputs.jsonl is not None:
                write_line(outputs.jsonl, line)
            if verdict.alert and outputs.save_defects is not None:
                save_frame(draw_overlay(frame.image, verdict.boxes, verdict.labels), outputs.save_defects / alert_file(frame.index))
            if outputs.collect is not None:
                outputs.collect.add(frame, verdict, settings.threshold)
            if outputs.view is not None:  # after the alert's picture is saved: the gallery can show it at once
                outputs.view.publish(frame, verdict, line, summary, times)
            if outputs.show:
                cv2.imshow(WINDOW, draw_overlay(frame.image, verdict.boxes, verdict.labels, summary.fps))
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            if outputs.status is not None and time.perf_counter() >= next_status:
                next_status += STATUS_EVERY_S
                print(f"frame {frame.index}: {summary.fps:.1f} FPS, {summary.defective} defective, {summary.alerts} alerts, "
                      f"{summary.unreadable} unreadable", file=outputs.status, flush=True)
    except KeyboardInterrupt:
        log.warning("interrupted: summary of the frames so far")
    finally:
        if outputs.jsonl is not None:
            with contextlib.suppress(OSError):  # the write that failed has said why
                outputs.jsonl.flush()
        if outputs.show:
            cv2.destroyAllWindows()
