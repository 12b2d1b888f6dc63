"""Frame sources for stream.py: camera index, video file, RTSP/HTTP URL, image folder, Picamera2.

Every source yields ``Frame``s of BGR pixels (OpenCV's order, also Picamera2's RGB888) with the time spent
capturing and decoding them. An unreadable frame is yielded with ``image=None`` so it is counted and skipped;
a file ends cleanly; a live source that drops is reopened with bounded back-off, one that never opens is
given up after a few seconds.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np
from PIL import Image

from data.images import read_rgb
from deploy.files import find_images
from utils.errors import UserError

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1, 2, 4, 8, 16, 30, 30)  # waits before each reopen of a dropped live source; then it is given up
OPEN_RETRY_S = (1, 2)  # waits before the retries of a live source that never opened (a camera still starting up)
FILE_READ_RETRIES = 3  # failed reads in a row after which a video file has ended (fewer, then a good frame: unreadable frames)


class SourceError(UserError):
    """A source cannot be opened, or a live source stayed unreachable through every reconnect attempt."""


@dataclass
class Frame:
    index: int  # position in the source (unreadable frames keep their index)
    image: np.ndarray | None  # BGR uint8 [H, W, 3]; None: unreadable, skipped
    capture_s: float  # time spent reading and decoding it
    path: str | None = None  # the image file it came from (a folder source); None for a video or camera


class Capture(Protocol):
    """What a source needs of cv2.VideoCapture (also implemented by PicameraCapture and test fakes)."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...


def _usable(image: np.ndarray | None) -> bool:
    return image is not None and image.ndim == 3 and image.shape[2] == 3 and image.size > 0 and image.dtype == np.uint8


class CaptureSource:
    """A source read through a Capture; ``live`` sources (camera, URL) are reopened when they drop, files end."""

    def __init__(self, name: str, open_capture: Callable[[], Capture], live: bool, sleep: Callable[[float], None] = time.sleep):
        self.name, self.live = name, live
        self._open_capture, self._sleep = open_capture, sleep
        self.reconnects = 0

    def _open(self) -> Capture | None:
        capture = self._open_capture()
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _reopen(self) -> Capture:
        for attempt, wait in enumerate(BACKOFF_S, 1):
            log.warning("source '%s' dropped: reopening in %g s (attempt %d of %d)", self.name, wait, attempt, len(BACKOFF_S))
            self._sleep(wait)
            capture = self._open()
            if capture is not None:
                self.reconnects += 1
                log.warning("source '%s' reopened", self.name)
                return capture
        raise SourceError(f"source '{self.name}' stayed unreachable for {len(BACKOFF_S)} reconnect attempts "
                          f"({sum(BACKOFF_S):g} s): check the camera or the stream URL")

    def _first_open(self) -> Capture:
        """The first opening: a file opens or is refused; a live source gets a few quick retries, not the reconnects of
        one that did open and then dropped (an address that is wrong stays wrong)."""
        capture = self._open()
        if capture is None and not self.live:
            raise SourceError(f"cannot open '{self.name}' as a video: is it a video file OpenCV can decode?")
        for attempt, wait in enumerate(OPEN_RETRY_S, 1):
            if capture is not None:
                return capture
            log.warning("source '%s' could not be opened: retrying in %g s (retry %d of %d)", self.name, wait, attempt,
                        len(OPEN_RETRY_S))
            self._sleep(wait)
            capture = self._open()
        if capture is None:
            raise SourceError(f"cannot open source '{self.name}' ({len(OPEN_RETRY_S) + 1} attempts over "
                              f"{sum(OPEN_RETRY_S):g} s): check the camera index and cable, or the stream URL and the network")
        return capture

    def frames(self) -> Iterator[Frame]:
        capture = self._first_open()
        index, failed = 0, 0
        try:
            while True:
                started = time.perf_counter()
                ok, image = capture.read()
                elapsed = time.perf_counter() - started
                if ok and _usable(image):
                    for _ in range(failed):  # reads that failed before a good frame: unreadable frames
                        yield Frame(index, None, 0.0)
                        index += 1
                    failed = 0
                    yield Frame(index, image, elapsed)
                    index += 1
                elif ok:  # decoded, but not an 8-bit colour picture
                    yield Frame(index, None, elapsed)
                    index += 1
                elif not self.live:
                    failed += 1
                    if failed > FILE_READ_RETRIES:
                        return  # the end of the file; the trailing failed reads were no frames
                else:
                    capture.release()
                    capture = self._reopen()
        finally:
            capture.release()


class FolderSource:
    """Image files of a folder (recursively) played in name order, decoded as predict.py decodes them."""

    live = False
    reconnects = 0

    def __init__(self, folder: Path):
        self.name = str(folder)
        self.files = find_images([str(folder)])

    def frames(self) -> Iterator[Frame]:
        for index, path in enumerate(self.files):
            started = time.perf_counter()
            try:
                image = read_rgb(path)[..., ::-1]  # RGB -> BGR like every other source
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                log.warning("skipping '%s': not a readable image (%s)", path, error)
                image = None
            yield Frame(index, image, time.perf_counter() - started, str(path))


class PicameraCapture:
    """A Raspberry Pi camera module through Picamera2, behind VideoCapture's calls (its default 1280x720 video mode)."""

    def __init__(self):
        try:
            from picamera2 import Picamera2  # only on a Pi: apt's python3-picamera2
        except ImportError:
            raise SourceError("--source picamera needs Picamera2: 'sudo apt install python3-picamera2' and a virtual "
                              "environment made with --system-site-packages (docs/raspberry-pi.md)") from None
        self.camera = Picamera2()
        self.camera.configure(self.camera.create_video_configuration(main={"format": "RGB888"}))  # RGB888 is [B, G, R] in memory
        self.camera.start()

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        try:
            return True, self.camera.capture_array()
        except RuntimeError as error:  # libcamera reports a lost camera as RuntimeError
            log.warning("Picamera2: %s", error)
            return False, None

    def release(self) -> None:
        self.camera.close()


def _video_capture(target: int | str, live: bool) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(target)
    if live:
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # classify the newest frame, not a queue of old ones
    return capture


def redact(url: str) -> str:
    """The URL as logs, JSON lines, summaries and collected file names may show it: a password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def open_source(text: str) -> CaptureSource | FolderSource:
    """``--source``: a camera index (0), 'picamera', an rtsp:// or http(s):// URL, a folder of images or a video file."""
    if text.isdigit():
        return CaptureSource(f"camera {text}", lambda: _video_capture(int(text), live=True), live=True)
    if text == "picamera":
        return CaptureSource("picamera", PicameraCapture, live=True)
    if "://" in text:
        return CaptureSource(redact(text), lambda: _video_capture(text, live=True), live=True)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return CaptureSource(text, lambda: _video_capture(text, live=False), live=False)
    raise SourceError(f"--source '{text}' is neither a camera index, 'picamera', a URL, a folder nor a file")
