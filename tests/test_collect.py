"""stream.py --collect: alerted defective tiles and tiles near the threshold saved, lossless at source resolution, as a
<class>/<image> dataset that data/scan.py reads, with collected.csv; --collect-max caps a run; bad flags are one line.

The stub ONNX model of test_stream.py scores a tile by its mean brightness: dark tiles are clearly normal, bright ones
clearly defective ('Broken stitch'), mid-grey ones near 0.4 (uncertain at --threshold 0.5).
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_script
from test_stream import BRIGHT, DARK, json_lines, stub_model

from data.scan import scan_dataset
from deploy.collect import COLUMNS, CollectError, Collector, source_stem
from deploy.sources import Frame
from deploy.stream import Verdict
from deploy.tiling import Box

GREY = 128  # mean ~125 after mp4v: defect score ~0.43
TILE, FRAMES, BRIGHT_FRAMES = 40, 10, {3, 4, 5}
BAND = ("--threshold", "0.5", "--collect-band", "0.25")


def seam(index: int) -> np.ndarray:
    """160x40 BGR: tiles 0 and 3 dark, tile 1 grey (uncertain), tile 2 bright on BRIGHT_FRAMES."""
    image = np.full((TILE, 4 * TILE, 3), DARK, np.uint8)
    image[:, TILE:2 * TILE] = GREY
    if index in BRIGHT_FRAMES:
        image[:, 2 * TILE:3 * TILE] = BRIGHT
    image[:, 0:4] = 10 + index  # a per-frame mark: a saved crop is this frame's pixels
    return image


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stub_model(tmp_path_factory.mktemp("stub") / "stub.onnx")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "line 3.mp4"  # a space: the file-name prefix is sanitised
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (4 * TILE, TILE))
    for i in range(FRAMES):
        writer.write(seam(i))
    writer.release()
    return path


def rows_of(folder: Path) -> list[dict[str, str]]:
    with open(folder / "collected.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_collect_saves_alerted_and_uncertain_tiles_as_a_dataset(stub: Path, video: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "collected"
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--tile", TILE, "--consecutive", "2", *BAND,
                      "--collect", out) == 0
    captured = capsys.readouterr()
    assert [r["alert"] for r in json_lines(captured.out)] == [i == 4 for i in range(FRAMES)]  # stdout: JSON lines only
    assert "collected 11 tiles" in captured.err

    expected = {f"Normal/line_3_f{i:06d}_t01.png" for i in range(FRAMES)} | {"Broken stitch/line_3_f000004_t02.png"}
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert files == expected
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"Normal", "Broken stitch"}  # every class has its folder
    for name in files:
        tile = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert tile.shape == (TILE, TILE, 3)  # source resolution, not the model's 32 px
    bright = cv2.imread(str(out / "Broken stitch/line_3_f000004_t02.png"))
    assert bright.mean() > 200

    rows = rows_of(out)
    assert tuple(rows[0]) == COLUMNS and sorted(r["file"] for r in rows) == sorted(files)
    for row in rows:
        score = float(row["score"])
        assert row["source"] == str(video) and row["source_file"] == "" and row["threshold"] == "0.500000"
        assert row["predicted"] == row["file"].split("/")[0] and row["time"].endswith("+00:00")
        if row["reason"] == "uncertain":
            assert abs(score - 0.5) <= 0.25 + 1e-6 and row["tile"] == "1" and row["predicted"] == "Normal"
        else:
            assert (row["reason"], row["frame"], row["tile"], row["predicted"]) == ("alert", "4", "2", "Broken stitch")
            assert score >= 0.5

    dataset = scan_dataset(out)
    assert len(dataset.samples) == 11
    assert {(s.path, dataset.class_names[s.label]) for s in dataset.samples} == {(f, f.split("/")[0]) for f in files}

    # the same video again: its tiles are already there (perhaps labelled since) and are not saved twice
    (out / "Normal" / "line_3_f000000_t01.png").rename(out / "Broken stitch" / "line_3_f000000_t01.png")
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--tile", TILE, "--consecutive", "2", *BAND,
                      "--collect", out, "--jsonl", tmp_path / "v.jsonl") == 0
    assert "collected 0 tiles" in capsys.readouterr().out and len(rows_of(out)) == 11
    assert len(list(out.rglob("*.png"))) == 11


def test_folder_source_names_the_image_and_collect_max_caps_the_run(stub: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        cv2.imwrite(str(frames / f"shot{i}.png"), seam(i))
    out = tmp_path / "collected"
    assert run_script("stream.py", "--onnx", stub, "--source", frames, "--tile", TILE, *BAND, "--collect", out,
                      "--collect-max", "3", "--jsonl", tmp_path / "v.jsonl") == 0
    captured = capsys.readouterr()
    assert captured.err.count("--collect-max 3") == 1  # one warning, however many tiles follow
    assert len(json_lines((tmp_path / "v.jsonl").read_text())) == 4  # the inspection went on
    rows = rows_of(out)
    assert [(r["frame"], r["tile"], r["source_file"]) for r in rows] == [(str(i), "1", str(frames / f"shot{i}.png")) for i in range(3)]
    assert len(list(out.rglob("*.png"))) == 3
    saved = cv2.imread(str(out / rows[2]["file"]))
    assert np.array_equal(saved, seam(2)[:, TILE:2 * TILE])  # lossless, the very pixels of that frame's tile


@pytest.mark.parametrize("flags, message", [
    (["--collect-band", "0"], "argument --collect-band: must be in (0, 1), got 0"),
    (["--collect-band", "1"], "argument --collect-band: must be in (0, 1), got 1"),
    (["--collect-max", "0"], "argument --collect-max: must be a positive integer, got 0"),
])
def test_bad_collect_flags_are_one_error_line(stub: Path, video: Path, tmp_path: Path, flags: list[str], message: str,
                                              capsys: pytest.CaptureFixture) -> None:
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--collect", tmp_path / "c", *flags) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error:" in line] == [f"stream.py: error: {message}"]
    assert not (tmp_path / "c").exists()


def test_a_collect_path_that_is_a_file_is_one_error_line(stub: Path, video: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").write_text("not a folder")
    assert run_script("stream.py", "--onnx", stub, "--source", video, "--threshold", "0.5", "--collect", tmp_path / "taken") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --collect") and "is a file" in err[0]


def verdict(scores: list[float], defect_tiles: list[int], alert: bool) -> Verdict:
    boxes = [Box(10 * i, 0, 10, 8) for i in range(len(scores))]
    predicted = ["Skipped stitch" if i in defect_tiles else "Normal" for i in range(len(scores))]
    return Verdict(7, bool(defect_tiles), "Normal", 0.9, max(scores), 0, boxes, defect_tiles, [None] * len(scores), alert,
                   scores, predicted)


def test_collector_keeps_the_band_edges_and_the_alerted_tiles_only(tmp_path: Path) -> None:
    names = ["Normal", "Skipped stitch"]
    collector = Collector(tmp_path / "c", 0.25, 100, names, "rtsp://cam.local:554/seam 1", live=True)
    scores = [0.25, 0.75, 0.2499, 0.7501, 0.9, 0.1]
    assert collector.picks(verdict(scores, [1, 3, 4], alert=False), 0.5) == [(0, "uncertain"), (1, "uncertain")]
    assert collector.picks(verdict(scores, [1, 3, 4], alert=True), 0.5) == [
        (0, "uncertain"), (1, "alert"), (3, "alert"), (4, "alert")]
    assert collector.picks(verdict([0.2, 0.45, 0.55, 0.8], [], alert=False), None) == [(1, "uncertain"), (2, "uncertain")]

    image = np.arange(8 * 60 * 3, dtype=np.uint8).reshape(8, 60, 3)
    assert collector.add(Frame(7, image, 0.0), verdict(scores, [1, 3, 4], alert=True), 0.5) == 4
    collector.close()
    assert collector.stem.startswith("cam.local_554_seam_1_2")  # a live source: the run's start time keeps names apart
    rows = rows_of(tmp_path / "c")
    assert [(r["tile"], r["reason"], r["predicted"], r["score"], r["threshold"]) for r in rows] == [
        ("0", "uncertain", "Normal", "0.250000", "0.500000"), ("1", "alert", "Skipped stitch", "0.750000", "0.500000"),
        ("3", "alert", "Skipped stitch", "0.750100", "0.500000"), ("4", "alert", "Skipped stitch", "0.900000", "0.500000")]
    for row in rows:
        tile = int(row["tile"])
        assert np.array_equal(cv2.imread(str(tmp_path / "c" / row["file"])), image[:, 10 * tile:10 * tile + 10])

    capped = Collector(tmp_path / "d", 0.25, 2, names, "clip.mp4", live=False)
    assert capped.add(Frame(0, image, 0.0), verdict(scores, [1, 3, 4], alert=True), 0.5) == 2
    assert capped.add(Frame(1, image, 0.0), verdict(scores, [1, 3, 4], alert=True), 0.5) == 0 and capped.stopped
    capped.close()
    assert len(list((tmp_path / "d").rglob("*.png"))) == 2 and capped.saved == 2

    with pytest.raises(CollectError, match="is a file"):
        Collector(tmp_path / "c" / "collected.csv", 0.25, 10, names, "clip.mp4", live=False)
    assert source_stem("clips/line 3.mp4", False, None) == "line_3"  # type: ignore[arg-type]
