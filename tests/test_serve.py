"""stream.py --serve: the page, status JSON, live JPEG frames, the alert gallery and its marks, the event stream, the
token off loopback, refused traversal, a stalled viewer that never stalls inspection, clean shutdown, and the page
in a real (headless) browser.

Loopback only, no camera: an inspection runs in a thread on generated frames (the stub model of test_stream.py
calls a bright frame defective) and the tests talk HTTP to it.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, run_script
from test_edge import NO_TORCH
from test_stream import stub_model

from deploy.edge import EdgeClassifier
from deploy.serve import (
    MARK_COLUMNS,
    MARKS_CSV,
    Address,
    LiveServer,
    LiveView,
    ServeError,
    access_token,
    parse_address,
    start_view,
)
from deploy.sources import Frame
from deploy.stream import Inspector, Outputs, Settings, Summary, run

WIDTH, HEIGHT = 160, 120
NORMAL_BGR, DEFECT_BGR = (90, 40, 20), (40, 230, 250)  # dark blue: normal; yellow: defective (mean brightness)
CYCLE, DEFECTIVE = 40, 2  # each cycle starts with 2 defective frames: one alert per cycle at --consecutive 2
TOKEN = "t0k3n-for-the-tests-only"


def seam(index: int) -> np.ndarray:
    """A textured frame (its JPEG is not tiny): yellow on the first frames of a cycle, dark blue otherwise."""
    colour = DEFECT_BGR if index % CYCLE < DEFECTIVE else NORMAL_BGR
    noise = np.random.default_rng(index).integers(-12, 13, (HEIGHT, WIDTH, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


@dataclass
class Live:
    """An inspection running in a thread with its view served on loopback."""

    view: LiveView
    server: LiveServer
    summary: Summary
    gallery: Path
    collect: Path

    @property
    def port(self) -> int:
        return self.server.address.port

    def wait_for(self, condition, what: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.view.status()
            if condition(status):
                return status
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {status}")


def paced_frames(stop: threading.Event) -> Iterator[Frame]:
    index = 0
    while not stop.is_set():
        yield Frame(index, seam(index), 0.001)
        index += 1
        time.sleep(0.003)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("serve")
    settings = Settings(threshold=0.5, consecutive=2)
    inspector = Inspector(EdgeClassifier(stub_model(folder / "stub.onnx"), 1), settings)
    gallery, collect = folder / "alerts", folder / "collect"
    view = LiveView("generated seam", "stub 32 px", 0.5, None, gallery, [gallery, collect])
    server = LiveServer(Address("127.0.0.1", 0), view, None)
    summary, stop = Summary(), threading.Event()
    worker = threading.Thread(target=run, args=(paced_frames(stop), inspector, settings, Outputs(save_defects=gallery, view=view),
                                                summary))
    worker.start()
    yield Live(view, server, summary, gallery, collect)
    stop.set()
    worker.join(timeout=30)
    server.close()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})  # sent as is: no client-side normalisation of '..'
    answer = connection.getresponse()
    body = answer.read()
    connection.close()
    return answer.status, dict(answer.getheaders()), body


def post_mark(port: int, payload: object, content_type: str = "application/json") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/api/mark", body=json.dumps(payload), headers={"Content-Type": content_type})
    answer = connection.getresponse()
    status, body = answer.status, answer.read()
    connection.close()
    return status, body


def first_mjpeg_picture(port: int) -> np.ndarray:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/stream.mjpg")
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=frame"
    assert answer.fp.readline() == b"--frame\r\n"
    headers = dict(line.decode().strip().split(": ", 1) for line in iter(answer.fp.readline, b"\r\n"))
    assert headers["Content-Type"] == "image/jpeg"
    picture = cv2.imdecode(np.frombuffer(answer.fp.read(int(headers["Content-Length"])), np.uint8), cv2.IMREAD_COLOR)
    connection.close()
    return picture


def test_page_status_and_live_frames_of_the_source_size(live: Live) -> None:
    status, headers, page = get(live.port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = page.decode()
    assert 'src="stream.mjpg"' in text and "api/status" in text and "api/mark" in text
    assert not re.search(r"https?://|[\"'(]//", text)  # no CDN: everything it needs comes from this server
    live.wait_for(lambda s: s["frames"] > 5, "frames")
    status, headers, body = get(live.port, "/api/status")
    data = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert data["source"] == "generated seam" and data["threshold"] == 0.5 and data["running"]
    assert data["frames"] > 5 and data["fps"] > 0 and set(data["stages_ms"]) == {"capture", "preprocess", "inference"}
    assert data["last"]["verdict"] in ("normal", "defect") and data["banner"].split(":")[0] in ("normal", "DEFECT")
    status, headers, body = get(live.port, "/frame.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (HEIGHT, WIDTH, 3)
    picture = first_mjpeg_picture(live.port)
    assert picture.shape == (HEIGHT, WIDTH, 3)
    top = picture[2, WIDTH // 2].astype(int)  # the verdict banner: green (normal) or red (defect)
    assert top.max() > 150 and top.argmax() in (1, 2) and sorted(top)[1] < 90


def test_gallery_lists_alerts_and_marks_are_appended_beside_them_and_to_the_collect_folder(live: Live) -> None:
    status = live.wait_for(lambda s: len(s["alerts_kept"]) >= 2, "two alerts")
    newest, older = status["alerts_kept"][:2]
    assert newest["frame"] > older["frame"] and newest["frame"] % CYCLE == DEFECTIVE - 1  # the 2nd defective frame alerts
    assert newest["class"] == "Broken stitch" and newest["score"] > 0.5 and newest["size"] == [WIDTH, HEIGHT]
    code, headers, body = get(live.port, f"/alerts/{newest['file']}")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert body == (live.gallery / newest["file"]).read_bytes()
    assert post_mark(live.port, {"frame": older["frame"], "mark": "not a defect"})[0] == 200
    code, body = post_mark(live.port, {"frame": newest["frame"], "mark": "confirmed"})
    assert code == 200 and json.loads(body)["mark"] == "confirmed"
    for folder in (live.gallery, live.collect):
        rows = (folder / MARKS_CSV).read_text().splitlines()
        assert rows[0] == ",".join(MARK_COLUMNS)
        assert [(row.split(",")[2], row.split(",")[-1]) for row in rows[1:]] == [(str(older["frame"]), "not a defect"),
                                                                                 (str(newest["frame"]), "confirmed")]
    marked = {alert["frame"]: alert["mark"] for alert in live.view.status()["alerts_kept"]}
    assert marked[older["frame"]] == "not a defect" and marked[newest["frame"]] == "confirmed"
    assert post_mark(live.port, {"frame": newest["frame"], "mark": "maybe"})[0] == 400
    assert post_mark(live.port, {"frame": 10**9, "mark": "confirmed"})[0] == 404
    assert post_mark(live.port, {"frame": newest["frame"], "mark": "confirmed"}, "text/plain")[0] == 415  # no cross-site form posts
    assert len((live.gallery / MARKS_CSV).read_text().splitlines()) == 3


def test_an_alert_picture_replaced_by_a_link_is_not_served(live: Live, tmp_path: Path) -> None:
    status = live.wait_for(lambda s: len(s["alerts_kept"]) >= 2, "two alerts")
    oldest = status["alerts_kept"][-1]["file"]
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the network")
    (live.gallery / oldest).unlink()
    (live.gallery / oldest).symlink_to(secret)
    code, _, body = get(live.port, f"/alerts/{oldest}")
    assert code == 404 and b"not for the network" not in body


def test_event_stream_carries_each_frames_json_line(live: Live) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    connection.request("GET", "/api/events")
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type") == "text/event-stream"
    lines = []
    while len(lines) < 5:
        line = answer.fp.readline().decode()
        if line.startswith("data: "):
            lines.append(json.loads(line.removeprefix("data: ")))
    connection.close()
    frames = [line["frame"] for line in lines]
    assert frames == list(range(frames[0], frames[0] + 5))
    assert {"time", "frame", "verdict", "class", "defect_probability", "alert"} <= set(lines[0])


@pytest.mark.parametrize("path", ["/alerts/../stream.py", "/alerts/%2e%2e/%2e%2e/README.md", "/%2e%2e/%2e%2e/etc/passwd",
                                  "/alerts/..%2f..%2fstream.py", "/alerts/%2E%2E%5Cstream.py", "/alerts/frame_999999.jpg",
                                  "/alerts/marks.csv", "/../deploy/view.html"])
def test_no_path_reaches_the_file_system_outside_the_gallery(live: Live, path: str) -> None:
    status, _, body = get(live.port, path)
    assert status in (400, 404) and b"import" not in body and b"root:" not in body and b"<html" not in body


def test_off_loopback_every_request_needs_the_token() -> None:
    with_token = LiveServer(Address("127.0.0.1", 0), LiveView("s", "m", None, None, None, []), TOKEN)  # as beyond loopback
    try:
        port = with_token.address.port
        for path in ("/", "/api/status", "/frame.jpg", "/stream.mjpg", "/api/events", "/alerts/frame_000001.jpg"):
            status, headers, body = get(port, path)
            assert status == 401 and "Bearer" in headers["WWW-Authenticate"] and b"token" in body
            assert get(port, path, {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 403
        assert get(port, "/api/status?token=nope")[0] == 403
        assert get(port, "/api/status", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, headers, _ = get(port, f"/?token={TOKEN}")  # the printed URL: the token moves to a cookie
        assert status == 303 and headers["Location"] == "./" and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(port, "/api/status", {"Cookie": cookie})[0] == 200
        assert get(port, "/", {"Cookie": cookie})[0] == 200
    finally:
        with_token.close()


def test_a_loopback_view_refuses_other_host_names() -> None:
    """Without a token only requests addressed to this machine are answered (a page rebinding its DNS name to 127.0.0.1 is not)."""
    view = LiveView("s", "m", None, None, None, [])
    server = LiveServer(Address("127.0.0.1", 0), view, None)
    try:
        assert get(server.address.port, "/api/status", {"Host": "evil.example:8080"})[0] == 403
        assert get(server.address.port, "/api/status", {"Host": f"localhost:{server.address.port}"})[0] == 200
        assert get(server.address.port, "/frame.jpg")[0] == 503  # nothing inspected yet
    finally:
        server.close()


def test_address_and_token_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_address("8080") == Address("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:0") == Address("0.0.0.0", 0)
    assert parse_address("[::1]:8080") == Address("::1", 8080)
    for bad in ("70000", "http", "::1:80", ":8080", "host:", "-1"):
        with pytest.raises(ValueError, match="HOST:"):
            parse_address(bad)
    assert access_token("127.0.0.1", {}) == (None, False) and access_token("localhost", {}) == (None, False)
    for host in ("0.0.0.0", "192.168.1.20", "seam-pi.local"):
        token, generated = access_token(host, {})
        assert generated and len(token) >= 16
    assert access_token("0.0.0.0", {"STITCHDEFECT_TOKEN": TOKEN}) == (TOKEN, False)
    for bad in ("short", "a-token-with;semicolon", "a token with spaces", "a-token-with=equals-sign", "tok%20en-of-enough-size"):
        with pytest.raises(ServeError, match="at least 16 characters of A-Z"):  # ; = % break the cookie or the URL
            access_token("0.0.0.0", {"STITCHDEFECT_TOKEN": bad})
    view = LiveView("s", "m", None, None, None, [])
    server, line = start_view(Address("127.0.0.1", 0), view, {"STITCHDEFECT_TOKEN": TOKEN})
    server.close()
    assert TOKEN not in line and "?token=<$STITCHDEFECT_TOKEN>" in line  # a token from the environment is never printed


def test_a_stalled_viewer_never_stalls_the_inspection(live: Live) -> None:
    stalled = socket.create_connection(("127.0.0.1", live.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /stream.mjpg HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")  # ... and never reads a byte
    events = socket.create_connection(("127.0.0.1", live.port))
    events.sendall(b"GET /api/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        live.wait_for(lambda s: s["viewers"] >= 2, "the two stalled viewers")
        counts = []
        for _ in range(4):
            counts.append(live.summary.frames)
            time.sleep(0.4)
        assert all(later - earlier >= 20 for earlier, later in zip(counts, counts[1:])), counts  # ~100 FPS paced
        fresh = first_mjpeg_picture(live.port)  # another viewer still gets pictures
        assert fresh.shape == (HEIGHT, WIDTH, 3)
    finally:
        stalled.close()
        events.close()


def test_closing_the_server_ends_open_streams_and_frees_the_port() -> None:
    view = LiveView("s", "m", None, None, None, [])
    server = LiveServer(Address("127.0.0.1", 0), view, None)
    port = server.address.port
    reader = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader.sendall(b"GET /api/events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    assert reader.recv(64).startswith(b"HTTP/1.0 200")
    started = time.monotonic()
    server.close()
    while reader.recv(4096):  # the stream ends (EOF), it does not hang until its keep-alive
        pass
    assert time.monotonic() - started < 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "seam.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48))
    for i in range(6000):
        writer.write(np.full((48, 64, 3), 220 if i % CYCLE < DEFECTIVE else 40, np.uint8))
    writer.release()
    return path


def test_stream_py_serves_without_torch_and_sigterm_ends_server_and_inspection_with_a_summary(long_video: Path,
                                                                                            tmp_path: Path) -> None:
    stub = stub_model(tmp_path / "stub.onnx")
    process = subprocess.Popen([sys.executable, "-c", NO_TORCH, str(ROOT / "stream.py"), "--onnx", str(stub), "--source",
                                str(long_video), "--serve", "127.0.0.1:0", "--jsonl", str(tmp_path / "seam.jsonl"),
                                "--save-defects", str(tmp_path / "alerts")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert line.startswith("live view: http://127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        deadline = time.monotonic() + 30
        while (status := json.loads(get(port, "/api/status")[2]))["frames"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status["running"] and status["frames"] >= 10
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped by signal 15" in err and "torch imported: False" in out and "Traceback" not in err
    classified = int(out.split(" classified")[0].rsplit("(", 1)[1])
    assert 0 < classified < 6000 and len((tmp_path / "seam.jsonl").read_text().splitlines()) == classified
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_bad_serve_flags_and_a_taken_port_are_one_error_line(tmp_path: Path, long_video: Path, capsys: pytest.CaptureFixture) -> None:
    stub = stub_model(tmp_path / "stub.onnx")
    for value in ("70000", "not-a-port"):
        assert run_script("stream.py", "--onnx", stub, "--source", long_video, "--serve", value) == 2
        assert "argument --serve: expected [HOST:]PORT" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert run_script("stream.py", "--onnx", stub, "--source", long_video, "--save-defects", tmp_path / "alerts",
                          "--serve", f"127.0.0.1:{taken.getsockname()[1]}") == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: cannot serve the view on 127.0.0.1:") and "choose another --serve" in line
    assert not captured.out


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def colour_share(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> float:
    """The share of the screenshot's pixels within ``tolerance`` of an RGB colour (the image is BGR)."""
    return float((np.abs(image[..., ::-1].astype(int) - np.array(rgb)).max(axis=2) <= tolerance).mean())


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_real_browser_shows_the_frame_the_verdict_and_the_gallery(live: Live, tmp_path: Path) -> None:
    live.wait_for(lambda s: s["alerts_kept"], "an alert")
    shot = tmp_path / "view.png"
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", "--virtual-time-budget=3000"]
    url = f"http://127.0.0.1:{live.port}/"
    subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=90, check=True)
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True).stdout
    assert 'class="alert"' in dom and ('id="verdict" class="normal">normal<' in dom or 'class="defect">DEFECT: Broken stitch<' in dom)
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (1000, 1280)
    frame_colours = colour_share(image, NORMAL_BGR[::-1]) + colour_share(image, DEFECT_BGR[::-1])
    assert frame_colours > 0.2  # the live frame fills most of the page's left side
    assert colour_share(image, (46, 125, 50), 8) + colour_share(image, (198, 40, 40), 8) > 0.005  # the verdict's badge
    gallery = image[800:]  # below the live frame (160x120 shown 933 px wide: 700 px tall from y=52) ...
    assert colour_share(gallery, DEFECT_BGR[::-1]) > 0.01  # ... the alert's saved (yellow) frame
