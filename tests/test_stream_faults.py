"""stream.py faults: a source that never opens is given up soon in one clear line; Ctrl-C never tears a JSON line."""
from __future__ import annotations

import io
import signal

import pytest
from test_stream import BRIGHT, FakeCapture, frame

from deploy import sources
from deploy.sources import CaptureSource, SourceError
from deploy.stream import write_line


def test_a_live_source_that_never_opens_is_given_up_in_seconds_without_talk_of_reconnects(caplog):
    opened, waits = [], []
    source = CaptureSource("rtsp://10.0.0.5/seam", lambda: opened.append(1) or FakeCapture([], opened=False), live=True,
                           sleep=waits.append)
    with pytest.raises(SourceError, match="cannot open source 'rtsp://10.0.0.5/seam'") as raised:
        list(source.frames())
    assert len(opened) == len(sources.OPEN_RETRY_S) + 1 and waits == list(sources.OPEN_RETRY_S) and sum(waits) <= 5
    assert "URL" in str(raised.value) and source.reconnects == 0
    assert "could not be opened" in caplog.text and "dropped" not in caplog.text


def test_a_camera_that_opens_on_a_retry_is_inspected():
    captures = [FakeCapture([], opened=False), FakeCapture([(True, frame(BRIGHT))])]
    waits: list[float] = []
    source = CaptureSource("camera 0", lambda: captures.pop(0), live=True, sleep=waits.append)
    frames = source.frames()
    assert next(frames).image is not None and waits == [sources.OPEN_RETRY_S[0]]
    frames.close()


class InterruptedMidLine(io.StringIO):
    """A JSON lines file whose writer is hit by Ctrl-C halfway through a line."""

    def write(self, text: str) -> int:
        half = len(text) // 2
        super().write(text[:half])
        signal.raise_signal(signal.SIGINT)
        return half + super().write(text[half:])


def test_ctrl_c_while_a_json_line_is_written_leaves_it_whole():
    handle = InterruptedMidLine()
    with pytest.raises(KeyboardInterrupt):
        write_line(handle, '{"frame": 7, "verdict": "defect"}')
    assert handle.getvalue() == '{"frame": 7, "verdict": "defect"}\n'
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
