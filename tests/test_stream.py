"""stream.py: per-frame verdicts, debounced alerts, JSON lines, saved frames, sources that end, drop or hold bad frames, tiling.

A stub ONNX model makes the verdicts deterministic: its defect logit grows with a tile's mean brightness, so a
bright frame (or tile) is defective and a dark one normal.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import ROOT, run_script
from onnx import TensorProto, helper

from deploy import sources
from deploy.edge import CHECKSUM_KEY, METADATA_KEY, EdgeClassifier, onnx_checksum
from deploy.sources import CaptureSource, SourceError
from deploy.stream import Debouncer, Inspector, Outputs, Settings, Summary, run
from deploy.tiling import Box, GeometryError, parse_roi, tile_boxes
from utils.operating_point import OperatingPoint

SIZE = 32
DARK, BRIGHT = 40, 220
DEFECT_FRAMES = {3, 4, 5, 9, 14, 15, 16, 17}  # runs of 3, 1 and 4 defective frames
FRAMES = 20


def stub_model(path: Path, classes: tuple[str, ...] = ("Normal", "Broken stitch"), threshold: float | None = 0.5) -> Path:
    """logits = [-d, d] with d = 8 * mean(normalised input): bright tiles are 'Broken stitch', dark ones 'Normal'; the
    stored threshold 0.5 decides as argmax does (None: metadata as written before operating points)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "gain"], ["d"]),
        helper.make_node("Unsqueeze", ["d", "axis1"], ["d1"]),
        helper.make_node("Neg", ["d1"], ["minus_d1"]),
        helper.make_node("Concat", ["minus_d1", "d1"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "stub", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]), helper.make_tensor("axis1", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = {"model": "stub", "class_names": list(classes), "img_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}
    if threshold is not None:
        info["operating_point"] = OperatingPoint(threshold, 0.05, 1.0, 0.0, 20, 20).to_dict()
    helper.set_model_props(model, {METADATA_KEY: json.dumps(info), CHECKSUM_KEY: onnx_checksum(model.SerializeToString())})
    onnx.save(model, path)
    return path


def frame(value: int, width: int = 64, height: int = 48) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def save_with_checksum(model: onnx.ModelProto, path: Path) -> Path:
    """Save an edited test model with the checksum of its new weights, as export.py would have written it."""
    for prop in model.metadata_props:
        if prop.key == CHECKSUM_KEY:
            prop.value = onnx_checksum(model.SerializeToString())
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stub_model(tmp_path_factory.mktemp("stub") / "stub.onnx")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames of MPEG-4 (mp4v), bright exactly on DEFECT_FRAMES."""
    path = tmp_path_factory.mktemp("video") / "seam.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(FRAMES):
        writer.write(frame(BRIGHT if i in DEFECT_FRAMES else DARK))
    writer.release()
    return path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_video_gives_a_verdict_per_frame_and_debounced_alerts(stub: Path, video: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    code = run_script("stream.py", "--onnx", stub, "--source", video, "--consecutive", "3", "--save-defects", tmp_path / "alerts")
    assert code == 0
    captured = capsys.readouterr()
    rows = json_lines(captured.out)  # stdout holds nothing but JSON lines
    assert [r["frame"] for r in rows] == list(range(FRAMES))
    assert {r["frame"] for r in rows if r["verdict"] == "defect"} == DEFECT_FRAMES
    assert [r["frame"] for r in rows if r["alert"]] == [5, 16]  # a lone defective frame (9) never alerts
    for row in rows:
        assert set(row) == {"time", "frame", "verdict", "class", "confidence", "defect_probability", "tile", "box", "defect_tiles", "alert"}
        assert row["class"] == ("Broken stitch" if row["verdict"] == "defect" else "Normal")
        assert 0.5 <= row["confidence"] <= 1 and row["tile"] == 0 and row["box"] == [0, 0, 64, 48]
    assert "20 frames (20 classified, 0 unreadable, 0 reconnects), 8 defective, 2 alerts" in captured.err
    assert "capture" in captured.err and "preprocess" in captured.err and "inference" in captured.err
    saved = sorted(p.name for p in (tmp_path / "alerts").iterdir())
    assert saved == ["frame_000005.jpg", "frame_000016.jpg"]
    picture = cv2.imread(str(tmp_path / "alerts" / saved[0]))
    assert picture.shape == (48, 64, 3)
    blue, green, red = picture[1, 32].astype(int)  # on the thick red box of the defective tile
    assert red > 150 and green < 100 and blue < 100


def test_jsonl_file_folder_source_and_an_unreadable_frame(stub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"f{i:02d}.png"), frame(BRIGHT if i in (1, 2) else DARK))
    (folder / "f03.png").write_bytes(b"\x89PNG not really")  # a corrupt frame in the middle
    out = tmp_path / "verdicts.jsonl"
    assert run_script("stream.py", "--onnx", stub, "--source", folder, "--jsonl", out, "--consecutive", "2") == 0
    captured = capsys.readouterr()
    rows = json_lines(out.read_text())
    assert [(r["frame"], r["verdict"], r["alert"]) for r in rows] == [
        (0, "normal", False), (1, "defect", False), (2, "defect", True), (4, "normal", False), (5, "normal", False)]
    assert "6 frames (5 classified, 1 unreadable" in captured.out  # the summary is the output when JSON goes to a file
    assert "f03.png" in captured.err


def test_a_video_that_ends_inside_a_defect_run_ends_cleanly_without_an_alert(stub: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "short.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for value in (DARK, DARK, BRIGHT, BRIGHT):
        writer.write(frame(value))
    writer.release()
    assert run_script("stream.py", "--onnx", stub, "--source", path, "--consecutive", "3") == 0
    captured = capsys.readouterr()
    assert [r["verdict"] for r in json_lines(captured.out)] == ["normal", "normal", "defect", "defect"]
    assert "4 frames (4 classified, 0 unreadable, 0 reconnects), 2 defective, 0 alerts" in captured.err


class FakeCapture:
    """A VideoCapture stand-in: plays ``reads`` ((ok, image) pairs), then fails."""

    def __init__(self, reads: list[tuple[bool, np.ndarray | None]], opened: bool = True):
        self.reads, self.opened, self.released = list(reads), opened, False

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        return self.reads.pop(0) if self.reads else (False, None)

    def release(self) -> None:
        self.released = True


def test_file_source_counts_a_failed_read_between_frames_as_unreadable_and_stops_at_the_end() -> None:
    good = (True, frame(DARK))
    capture = FakeCapture([good, (False, None), good, (True, np.zeros((4, 4), np.uint8)), good])
    source = CaptureSource("clip.mp4", lambda: capture, live=False)
    frames = list(source.frames())
    assert [(f.index, f.image is None) for f in frames] == [(0, False), (1, True), (2, False), (3, True), (4, False)]
    assert capture.released


def test_live_source_is_reopened_with_bounded_backoff_then_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    captures = [FakeCapture([(True, frame(DARK))] * 2), FakeCapture([], opened=False), FakeCapture([(True, frame(BRIGHT))])]
    captures += [FakeCapture([], opened=False)] * len(sources.BACKOFF_S)
    waits: list[float] = []
    source = CaptureSource("rtsp://camera/seam", lambda: captures.pop(0), live=True, sleep=waits.append)
    seen = []
    with pytest.raises(SourceError, match="unreachable"):
        for f in source.frames():
            seen.append(f.index)
    assert seen == [0, 1, 2] and source.reconnects == 1
    assert waits == [0.5, 1, *sources.BACKOFF_S] and max(waits) == 30  # first drop: 2 tries; second: every wait, capped


def test_run_stops_on_ctrl_c_with_the_frames_so_far_written(stub: Path, tmp_path: Path) -> None:
    def frames():
        for i in range(3):
            yield sources.Frame(i, frame(BRIGHT), 0.001)
        raise KeyboardInterrupt

    summary = Summary()
    with open(tmp_path / "out.jsonl", "w") as handle:
        run(frames(), Inspector(EdgeClassifier(stub, 1), Settings()), Settings(consecutive=2), Outputs(jsonl=handle), summary)
    assert summary.frames == 3 and summary.alerts == 1
    assert len(json_lines((tmp_path / "out.jsonl").read_text())) == 3


def test_debouncer_alerts_once_per_run_of_defective_frames() -> None:
    debouncer = Debouncer(2)
    pattern = [True, False, True, True, True, True, False, True, True]
    assert [debouncer.update(d) for d in pattern] == [False, False, False, True, False, False, False, False, True]
    once = Debouncer(1)
    assert [once.update(d) for d in (True, True, False, True)] == [True, False, False, True]


def test_tile_geometry_covers_the_roi_with_the_last_tile_at_its_edge() -> None:
    boxes = tile_boxes((100, 50), Box(10, 5, 80, 40), 32, 24)
    assert [(b.x, b.y) for b in boxes] == [(10, 5), (34, 5), (58, 5), (10, 13), (34, 13), (58, 13)]
    assert all((b.w, b.h) == (32, 32) for b in boxes) and max(b.x + b.w for b in boxes) == 90
    assert tile_boxes((100, 50), None, None, None) == [Box(0, 0, 100, 50)]
    assert [b.x for b in tile_boxes((100, 50), None, 40, None)] == [0, 40, 60] * 2 and len(tile_boxes((100, 50), None, 25, None)) == 8
    with pytest.raises(GeometryError, match="does not fit"):
        tile_boxes((100, 50), Box(80, 0, 40, 10), None, None)
    with pytest.raises(GeometryError, match="larger"):
        tile_boxes((100, 50), Box(0, 0, 40, 20), 32, None)
    with pytest.raises(ValueError):
        parse_roi("1,2,3")


def test_tiles_find_the_defect_in_the_bright_half(stub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = frame(DARK, 128, 48)
    image[:, 96:] = BRIGHT
    folder = tmp_path / "one"
    folder.mkdir()
    cv2.imwrite(str(folder / "seam.png"), image)
    assert run_script("stream.py", "--onnx", stub, "--source", folder, "--roi", "0,8,128,32", "--tile", "32") == 0
    (row,) = json_lines(capsys.readouterr().out)
    assert row["verdict"] == "defect" and row["defect_tiles"] == [3] and row["tile"] == 3 and row["box"] == [96, 8, 32, 32]


def test_threshold_decides_on_the_defect_probability(stub: Path) -> None:
    names = ["Normal", "Broken stitch", "Skipped stitch"]

    class Fixed:
        info = {"class_names": names, "img_size": SIZE}
        normal = 0

    probs = np.array([[0.40, 0.35, 0.25], [0.70, 0.20, 0.10]], np.float32)
    boxes = [Box(0, 0, 8, 8), Box(8, 0, 8, 8)]
    by_top_class = Inspector(Fixed(), Settings()).judge(0, probs, boxes)
    assert not by_top_class.defect and by_top_class.label == "Normal" and by_top_class.tile == 0
    by_threshold = Inspector(Fixed(), Settings(threshold=0.5)).judge(0, probs, boxes)
    assert by_threshold.defect and by_threshold.defect_tiles == [0] and by_threshold.label == "Broken stitch"
    assert by_threshold.confidence == pytest.approx(0.35) and by_threshold.defect_probability == pytest.approx(0.6)


@pytest.mark.parametrize("args, message", [
    (["--source", "no/such/video.mp4"], "neither a camera index"),
    (["--source", "{video}", "--roi", "0,0,640,480"], "does not fit"),
    (["--source", "{video}", "--show"], "GUI"),
])
def test_bad_input_is_one_error_line(stub: Path, video: Path, args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    if "--show" in args and not re.search(r"GUI:\s+NONE", cv2.getBuildInformation()):
        pytest.skip("this OpenCV has a GUI: the test would open a window")
    assert run_script("stream.py", "--onnx", stub, *[a.format(video=video) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bad_flags_are_refused_before_any_work(stub: Path, capsys: pytest.CaptureFixture) -> None:
    for flags in (["--roi", "1,2,3"], ["--threshold", "-0.1"], ["--consecutive", "0"], ["--tile", "-4"]):
        assert run_script("stream.py", "--onnx", stub, "--source", "0", *flags) == 2
        assert "argument" in capsys.readouterr().err


def test_a_model_without_a_stored_threshold_decides_by_argmax_and_says_so_once(video: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    old = stub_model(tmp_path / "old.onnx", threshold=None)
    assert run_script("stream.py", "--onnx", old, "--source", video) == 0
    captured = capsys.readouterr()
    lines = json_lines(captured.out)
    assert [line["frame"] for line in lines if line["verdict"] == "defect"] == sorted(DEFECT_FRAMES)
    assert captured.err.count("carries no defect threshold") == 1 and "argmax verdicts" in captured.err
    assert run_script("stream.py", "--onnx", old, "--source", video, "--threshold", "1") == 0
    assert not [line for line in json_lines(capsys.readouterr().out) if line["verdict"] == "defect"]


def _long_folder(folder: Path, count: int = 400) -> Path:
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"f{i:04d}.png"), frame(BRIGHT if i % 7 == 0 else DARK))
    return folder


def test_sigterm_ends_the_inspection_with_its_summary(stub: Path, tmp_path: Path) -> None:
    """systemd stops a service with SIGTERM: the JSON lines so far are complete and the summary is printed."""
    folder = _long_folder(tmp_path / "frames", 2000)
    process = subprocess.Popen([sys.executable, str(ROOT / "stream.py"), "--onnx", str(stub), "--source", str(folder)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # inspection is running
    process.send_signal(signal.SIGTERM)
    out, err = process.stdout.read(), process.stderr.read()  # not communicate(): it would skip readline's buffer
    assert process.wait(timeout=60) == 0 and json.loads(first)["frame"] == 0
    lines = json_lines(first + out)
    assert 0 < len(lines) < 2000 and "stopped by signal 15" in err and f"{len(lines)} classified" in err and "Traceback" not in err


def test_a_closed_stdout_pipe_stops_quietly(stub: Path, tmp_path: Path) -> None:
    folder = _long_folder(tmp_path / "frames")
    done = subprocess.run(f"{sys.executable} stream.py --onnx {stub} --source {folder} | head -n 2", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert len(json_lines(done.stdout)) == 2 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_an_unwritable_jsonl_is_one_error_line(stub: Path, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for target in (tmp_path, tmp_path / "missing" / "seam.jsonl"):
        assert run_script("stream.py", "--onnx", stub, "--source", video, "--jsonl", target) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: cannot write '{target}'"), err


def test_a_full_disk_stops_the_json_lines_with_one_error_after_the_summary(stub: Path, video: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--jsonl", "/dev/full") == 2
    captured = capsys.readouterr()
    assert "frames (1 classified" in captured.out  # the summary of what was inspected
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "cannot write '/dev/full'" in line and "Traceback" not in captured.err


def test_a_model_without_its_checksum_runs_with_one_unverified_warning(stub: Path, video: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    model = onnx.load(stub)
    kept = [prop for prop in model.metadata_props if prop.key != CHECKSUM_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "unverified.onnx")
    cv2.imwrite(str(tmp_path / "seam.png"), frame(DARK))
    for script, args in (("predict.py", [tmp_path / "seam.png"]), ("stream.py", ["--source", video])):
        assert run_script(script, "--onnx", tmp_path / "unverified.onnx", *args) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if "checksum" in line]
        assert len(warnings) == 1 and "cannot be verified" in warnings[0], (script, warnings)


def _with_metadata(stub: Path, path: Path, text: str) -> Path:
    model = onnx.load(stub)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = text
    onnx.save(model, path)
    return path


GOOD_INFO = {"model": "stub", "class_names": ["Normal", "Broken stitch"], "img_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize("info, message", [
    ("{not json", "metadata is damaged"),
    (json.dumps({key: value for key, value in GOOD_INFO.items() if key != "mean"}), "lacks mean"),
    (json.dumps({**GOOD_INFO, "class_names": ["Normal", "a", "b", "c", "d"]}), "5 class names for a model with 2 outputs"),
    (json.dumps({**GOOD_INFO, "mean": [0.5]}), "mean is [0.5], not three numbers"),
    (json.dumps({**GOOD_INFO, "std": [0, 0, 0]}), "must be positive"),
    (json.dumps({**GOOD_INFO, "img_size": SIZE * 2}), f"img_size {SIZE * 2} for a model whose input is [{SIZE}, {SIZE}]"),
    (json.dumps({**GOOD_INFO, "img_size": 10**6}), "not a size in pixels"),
    (json.dumps({**GOOD_INFO, "operating_point": {"threshold": 3}}), "operating point"),
    (json.dumps([1, 2]), "not a mapping"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_damaged_metadata_is_one_error_line_before_any_prediction(stub: Path, video: Path, tmp_path: Path, info: str,
                                                                 message: str, capsys: pytest.CaptureFixture) -> None:
    model = _with_metadata(stub, tmp_path / "damaged.onnx", info)
    for script, args in (("predict.py", [video.parent]), ("stream.py", ["--source", video])):
        assert run_script(script, "--onnx", model, *args) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (script, err)
        assert not captured.out


def test_a_model_newer_than_the_devices_onnxruntime_says_to_upgrade(stub: Path, video: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A Pi whose onnxruntime is older than the exporting machine's gets the fix, not ORT's C++ signature."""
    model = onnx.load(stub)
    model.ir_version = 99
    onnx.save(model, tmp_path / "newer.onnx")
    assert run_script("predict.py", "--onnx", tmp_path / "newer.onnx", video.parent) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "IR version: 99" in err and err.endswith("pip install -r requirements-edge.txt") and "onnxruntime::" not in err


def test_a_model_giving_nan_fails_closed(stub: Path, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """NaN weights give NaN scores: every frame is a defect, never 'normal'."""
    model = onnx.load(stub)
    (gain,) = [tensor for tensor in model.graph.initializer if tensor.name == "gain"]
    gain.CopyFrom(helper.make_tensor("gain", TensorProto.FLOAT, [], [float("nan")]))
    save_with_checksum(model, tmp_path / "nan.onnx")  # a model that computes NaN as exported, not a damaged file
    assert run_script("stream.py", "--onnx", tmp_path / "nan.onnx", "--source", video) == 0
    assert {line["verdict"] for line in json_lines(capsys.readouterr().out)} == {"defect"}


def test_one_odd_frame_is_skipped_but_a_wrong_roi_on_the_first_is_an_error(stub: Path) -> None:
    settings = Settings(roi=Box(0, 0, 64, 48))
    frames = [sources.Frame(0, frame(DARK), 0.001), sources.Frame(1, frame(DARK, 32, 24), 0.001), sources.Frame(2, frame(BRIGHT), 0.001)]
    summary = Summary()
    run(iter(frames), Inspector(EdgeClassifier(stub, 1), settings), settings, Outputs(), summary)
    assert (summary.frames, summary.unreadable, summary.defective) == (2, 1, 1)
    with pytest.raises(GeometryError):
        run(iter(frames[1:]), Inspector(EdgeClassifier(stub, 1), settings), settings, Outputs(), Summary())


def test_a_stride_that_leaves_gaps_is_said_and_one_without_tiles_refused(stub: Path, video: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--tile", "16", "--stride", "24") == 0
    assert "8 px of seam between neighbouring tiles are never inspected" in capsys.readouterr().err
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--stride", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --tile too" in err[0]


def test_a_password_in_a_stream_url_never_reaches_the_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert sources.redact("rtsp://line3:s3cret@10.0.0.5:554/seam") == "rtsp://line3:***@10.0.0.5:554/seam"
    assert sources.redact("http://camera.local/stream") == "http://camera.local/stream"
    opened = []

    class Refusing:
        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return False

        def release(self) -> None:
            pass

    monkeypatch.setattr(sources, "_video_capture", lambda target, live: opened.append(target) or Refusing())
    monkeypatch.setattr(sources, "OPEN_RETRY_S", (0.0,))
    source = sources.open_source("rtsp://line3:s3cret@10.0.0.5/seam")
    with pytest.raises(SourceError) as raised:
        list(source.frames())
    assert opened and opened[0] == "rtsp://line3:s3cret@10.0.0.5/seam"  # OpenCV still gets the credentials
    assert "s3cret" not in source.name + str(raised.value) + caplog.text
