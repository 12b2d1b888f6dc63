"""stream.py --serve: the operator's view in a browser, served by the inspection process itself.

One self-contained page (no CDN, works offline) shows the live annotated frames (MJPEG), the counters and stage
times, and the latest alerts with their saved pictures; an operator marks an alert "not a defect" or "confirmed"
with one click and the mark is appended to ``marks.csv`` beside the saved alerts (and in the --collect folder).
Other tools read ``api/status`` (JSON) and ``api/events`` (the per-frame JSON lines as server-sent events).

Python's standard library only: torch-free and light on a Raspberry Pi. The inspection loop never waits for a
viewer: it leaves its newest frame in a one-frame slot and goes on; viewer threads draw, encode and send whatever
is there when they are ready, so a slow viewer skips frames and memory stays bounded.
"""
from __future__ import annotations

import csv
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import cv2

from deploy.overlay import draw_verdict
from deploy.sources import Frame
from deploy.stream import STAGES, Summary, Verdict, alert_file
from deploy.tiling import Box
from utils.errors import UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TOKEN_ENV = "STITCHDEFECT_TOKEN"
TOKEN_MIN_CHARS = 16
TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 unreserved: safe as they are in a query and a cookie
COOKIE = "stitchdefect_token"
COOKIE_MAX_AGE_S = 30 * 24 * 3600  # a tablet that opened the printed URL once stays let in for a month
PAGE = Path(__file__).with_name("view.html")
VIEW_FPS = 10  # live pictures sent to each viewer per second, whatever the inspection's rate
JPEG_QUALITY = 80
EVENTS_EVERY_S = 0.1  # an event-stream client gets the new JSON lines in batches, ten times a second
KEEPALIVE_S = 15.0  # an idle stream sends a comment this often, so proxies and browsers keep it open
LINES_KEPT = 512  # JSON lines held for the event stream; a client further behind skips the oldest
ALERTS_KEPT = 24  # alerts in the gallery, newest first
MAX_STREAMS = 8  # live pictures and event streams open at once; one more gets 503
SOCKET_TIMEOUT_S = 10.0  # a viewer that takes nothing for this long is dropped
STAGE_SMOOTHING = 0.05  # weight of the newest frame in the stage times shown (an exponential mean)
FPS_WINDOW = 64  # frames over which the shown FPS is measured
MAX_BODY = 1024
MARKS = ("not a defect", "confirmed")
MARKS_CSV = "marks.csv"
MARK_COLUMNS = ("time", "source", "frame", "file", "class", "score", "threshold", "mark")


class ServeError(UserError):
    """The view cannot be served: a taken port, a host this machine does not have, a token too short."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"


def parse_address(text: str) -> Address:
    """--serve's [HOST:]PORT: '8080' (loopback), '0.0.0.0:8080' (every interface), '[::1]:8080'; port 0 takes a free one."""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon:
        host = LOOPBACK
    if not port.isdigit() or int(port) > 65535 or not host or (":" in host and not text.startswith("[")):
        raise ValueError(f"expected [HOST:]PORT with PORT in 0..65535 (8080, 0.0.0.0:8080, [::]:8080), got {text!r}")
    return Address(host, int(port))


def is_loopback(host: str) -> bool:
    """Only this machine can connect; a host name counts as beyond loopback, whatever it resolves to today."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, environ: dict[str, str]) -> tuple[str | None, bool]:
    """The token every request must carry and whether it was generated here (to be printed): $STITCHDEFECT_TOKEN if
    set, else a new random one when bound beyond loopback, else none."""
    given = environ.get(TOKEN_ENV)
    if given is not None:
        if len(given) < TOKEN_MIN_CHARS or not TOKEN_CHARACTERS.fullmatch(given):
            raise ServeError(f"${TOKEN_ENV} must be at least {TOKEN_MIN_CHARS} characters of A-Z a-z 0-9 - . _ ~ (it travels "
                             "in URLs and a cookie, where ; , = % and spaces break it): make one with "
                             "python -c 'import secrets; print(secrets.token_urlsafe(16))'")
        return given, False
    return (None, False) if is_loopback(host) else (secrets.token_urlsafe(16), True)


def append_row(path: Path, columns: tuple[str, ...], row: tuple) -> None:
    """One CSV row (after the header if the file is new) in a single write to a file opened for appending: readers
    and a crash see whole rows only, and earlier rows are never rewritten."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size == 0:
            writer.writerow(columns)
        writer.writerow(row)
        os.write(fd, buffer.getvalue().encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def request_host(header: str) -> str:
    """The host of a Host header, without its port: 'localhost:8080' -> 'localhost', '[::1]:8080' -> '::1'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def verdict_banner(verdict: Verdict, threshold: float | None) -> str:
    """The verdict as the view prints it over the frame: class, and the defect score against the threshold."""
    if threshold is None:
        return f"{'DEFECT' if verdict.defect else 'normal'}: {verdict.label} {verdict.confidence:.2f} (most likely class)"
    sign = ">=" if verdict.defect_probability >= threshold else "<"
    return f"{'DEFECT' if verdict.defect else 'normal'}: {verdict.label}, score {verdict.defect_probability:.2f} {sign} {threshold:.2f}"


class LiveView:
    """What the inspection loop publishes and the viewers read: the newest frame, counters, recent JSON lines, alerts.

    ``publish`` (the inspection thread) only swaps references under a lock held for microseconds; drawing and JPEG
    encoding happen in the viewer threads, at most once per frame however many viewers there are.
    """

    def __init__(self, source: str, model: str, threshold: float | None, roi: Box | None, gallery: Path | None,
                 marks_folders: list[Path]):
        self.source, self.model, self.threshold, self.roi = source, model, threshold, roi
        self.gallery, self.marks_folders = gallery, marks_folders
        self.started = datetime.now(UTC)
        self.seq = 0  # frames published so far
        self.closed = False
        self._changed = threading.Condition()
        self._encoding = threading.Lock()
        self._marking = threading.Lock()
        self._image = None
        self._verdict: Verdict | None = None
        self._line = ""
        self._jpeg: tuple[int, bytes] = (0, b"")
        self._lines: deque[tuple[int, str]] = deque(maxlen=LINES_KEPT)
        self._alerts: deque[dict] = deque(maxlen=ALERTS_KEPT)
        self._stamps: deque[float] = deque(maxlen=FPS_WINDOW)
        self._stage_ms = dict.fromkeys(STAGES, 0.0)
        self._counts = {"frames": 0, "defective": 0, "alerts": 0, "unreadable": 0, "fps_mean": 0.0}
        self.viewers = 0

    def publish(self, frame: Frame, verdict: Verdict, line: str, summary: Summary, times: dict[str, float]) -> None:
        alert = self._alert_entry(frame, verdict) if verdict.alert else None
        counts = {"frames": summary.frames, "defective": summary.defective, "alerts": summary.alerts,
                  "unreadable": summary.unreadable, "fps_mean": summary.fps}
        with self._changed:
            self.seq += 1
            self._image, self._verdict, self._line, self._counts = frame.image, verdict, line, counts
            self._lines.append((self.seq, line))
            if alert is not None:
                self._alerts.appendleft(alert)
            for stage in STAGES:
                self._stage_ms[stage] += STAGE_SMOOTHING * (times[stage] * 1000 - self._stage_ms[stage])
            self._stamps.append(time.perf_counter())
            self._changed.notify_all()

    def _alert_entry(self, frame: Frame, verdict: Verdict) -> dict:
        height, width = frame.image.shape[:2]
        return {"frame": frame.index, "time": datetime.now(UTC).isoformat(timespec="seconds"), "class": verdict.label,
                "score": round(verdict.defect_probability, 4), "file": alert_file(frame.index) if self.gallery else None,
                "size": [width, height], "box": verdict.boxes[verdict.tile].to_list(), "mark": None}

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Count a viewer (the status shows how many) for as long as its stream is open."""
        with self._changed:
            self.viewers += 1
        try:
            yield
        finally:
            with self._changed:
                self.viewers -= 1

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def _wait_past(self, seen: int, timeout: float) -> bool:
        """Wait (holding the lock) for a frame after ``seen``; False on timeout or when closed."""
        return self._changed.wait_for(lambda: self.seq > seen or self.closed, timeout) and not self.closed

    def jpeg(self) -> tuple[int, bytes]:
        """The newest frame, drawn and encoded (once per frame, whoever asks first); (0, b'') before the first frame."""
        with self._encoding:
            with self._changed:
                seq, image, verdict = self.seq, self._image, self._verdict
            if seq and seq != self._jpeg[0]:
                picture = draw_verdict(image, verdict.boxes, verdict.labels, self.roi, verdict_banner(verdict, self.threshold),
                                       verdict.defect)
                ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if ok:
                    self._jpeg = (seq, encoded.tobytes())
            return self._jpeg

    def next_jpeg(self, seen: int, timeout: float) -> tuple[int, bytes] | None:
        """The first frame after ``seen`` (the newest when several came), or None on timeout or close."""
        with self._changed:
            if not self._wait_past(seen, timeout):
                return None
        return self.jpeg()

    def lines_after(self, seen: int, timeout: float) -> tuple[int, list[tuple[int, str]], int]:
        """(newest frame, its JSON lines after ``seen``, how many were dropped because the client fell behind)."""
        with self._changed:
            if not self._wait_past(seen, timeout):
                return seen, [], 0
            new = [(seq, line) for seq, line in self._lines if seq > seen]
            return self.seq, new, new[0][0] - seen - 1

    def status(self) -> dict:
        """Counters, stage times, the last verdict and the gallery; only copies are taken under the inspection's lock."""
        with self._changed:
            stamps, line, verdict = list(self._stamps), self._line, self._verdict
            status = {"source": self.source, "model": self.model, "threshold": self.threshold, "running": not self.closed,
                      **self._counts, "stages_ms": dict(self._stage_ms), "viewers": self.viewers,
                      "alerts_kept": [dict(alert) for alert in self._alerts], "marks": bool(self.marks_folders)}
        status["started"] = self.started.isoformat(timespec="seconds")
        status["stages_ms"] = {stage: round(ms, 3) for stage, ms in status["stages_ms"].items()}
        status["last"] = json.loads(line) if line else None
        status["banner"] = verdict_banner(verdict, self.threshold) if verdict else None
        status["fps"] = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
        status["last_frame_age_s"] = time.perf_counter() - stamps[-1] if stamps else None
        return status

    def gallery_file(self, name: str) -> Path | None:
        """A saved picture of an alert the gallery lists, a regular file in the gallery folder; nothing else is ever
        served from disk."""
        with self._changed:
            listed = any(alert["file"] == name for alert in self._alerts)
        if not listed or self.gallery is None:
            return None
        path = self.gallery / name  # only the regular file itself: a link put in its place may point anywhere
        return path if not path.is_symlink() and path.is_file() and path.resolve().parent == self.gallery.resolve() else None

    def mark(self, frame: int, mark: str) -> dict:
        """Append the operator's mark of an alert to marks.csv in every marks folder; the latest row of a frame wins."""
        with self._changed:
            alert = next((alert for alert in self._alerts if alert["frame"] == frame), None)
        if alert is None:
            raise LookupError(f"frame {frame} is not an alert in the gallery")
        row = (datetime.now(UTC).isoformat(timespec="milliseconds"), self.source, frame, alert["file"] or "", alert["class"],
               f"{alert['score']:.4f}", "" if self.threshold is None else f"{self.threshold:.6f}", mark)
        with self._marking:
            for folder in self.marks_folders:
                folder.mkdir(parents=True, exist_ok=True)
                append_row(folder / MARKS_CSV, MARK_COLUMNS, row)
            with self._changed:
                alert["mark"] = mark
                return dict(alert)


class ViewServer(ThreadingHTTPServer):
    """The HTTP server of one LiveView; each request gets a daemon thread (none can keep the process alive)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: Address, view: LiveView, token: str | None):
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.view, self.token = view, token
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((address.host, address.port), ViewHandler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its reverse DNS lookup of the host can hang offline
        self.server_name, self.server_port = self.server_address[:2]

    def close_connections(self) -> None:
        """End every open response (a stalled viewer's too), so no thread writes on after the server is closed."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ViewHandler(BaseHTTPRequestHandler):
    server: ViewServer
    timeout = SOCKET_TIMEOUT_S
    server_version = "stitchdefect"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the viewer went away mid-response
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s %s", self.client_address[0], self.command, urlsplit(self.path).path, code)  # no query: no token

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.answer("GET")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.answer("POST")

    def answer(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if not path.startswith("/") or ".." in path.split("/") or "\\" in path or "\0" in path:
            return self.send_text(HTTPStatus.BAD_REQUEST, "bad path")
        query = parse_qs(url.query)
        if not self.authorised(query):
            return None
        try:
            if method == "POST":
                return self.post_mark() if path == "/api/mark" else self.send_text(HTTPStatus.NOT_FOUND, "not found")
            if path == "/":
                return self.send_page(query)
            if path == "/stream.mjpg":
                return self.send_stream()
            if path == "/frame.jpg":
                return self.send_frame()
            if path == "/api/status":
                return self.send_json(HTTPStatus.OK, self.server.view.status())
            if path == "/api/events":
                return self.send_events()
            if path.startswith("/alerts/"):
                return self.send_alert_picture(path.removeprefix("/alerts/"))
            return self.send_text(HTTPStatus.NOT_FOUND, "not found")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the viewer went away or stalled: drop it
            self.close_connection = True
            return None

    def authorised(self, query: dict[str, list[str]]) -> bool:
        """Loopback without a token: only requests naming this machine (a web page that rebinds its DNS name to
        127.0.0.1 is refused). With a token: a request without one gets 401, with a wrong one 403."""
        token = self.server.token
        if token is None:
            host = request_host(self.headers.get("Host", ""))
            if host and not is_loopback(host):
                self.send_text(HTTPStatus.FORBIDDEN, "this view answers requests to localhost only")
                return False
            return True
        given = self.given_token(query)
        if given is None:
            self.send_text(HTTPStatus.UNAUTHORIZED, "open the URL stream.py printed at start: it carries ?token=...",
                           {"WWW-Authenticate": 'Bearer realm="stitchdefect"'})
            return False
        if not hmac.compare_digest(given.encode(), token.encode()):
            self.send_text(HTTPStatus.FORBIDDEN, "wrong token")
            return False
        return True

    def given_token(self, query: dict[str, list[str]]) -> str | None:
        """From ?token= (the printed URL), the cookie the page then keeps, or an Authorization: Bearer header (tools)."""
        if "token" in query:
            return query["token"][-1]
        bearer = self.headers.get("Authorization", "")
        if bearer.startswith("Bearer "):
            return bearer.removeprefix("Bearer ").strip()
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def send_headers(self, status: HTTPStatus, content_type: str, length: int | None = None,
                     headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the page's URL may carry the token
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def send_body(self, status: HTTPStatus, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_headers(status, content_type, len(body), headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_text(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, "text/plain; charset=utf-8", (text + "\n").encode(), headers)

    def send_json(self, status: HTTPStatus, data: object) -> None:
        self.send_body(status, "application/json", json.dumps(data).encode())

    def send_page(self, query: dict[str, list[str]]) -> None:
        if self.server.token is not None and "token" in query:  # keep the token in a cookie, out of the address bar
            cookie = f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={COOKIE_MAX_AGE_S}"
            return self.send_body(HTTPStatus.SEE_OTHER, "text/plain", b"", {"Location": "./", "Set-Cookie": cookie})
        return self.send_body(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.read_bytes(),
                              {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                          "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"})

    def send_frame(self) -> None:
        seq, jpeg = self.server.view.jpeg()
        if not seq:
            return self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, "no frame inspected yet")
        return self.send_body(HTTPStatus.OK, "image/jpeg", jpeg)

    def send_alert_picture(self, name: str) -> None:
        path = self.server.view.gallery_file(name)
        try:
            picture = path.read_bytes() if path is not None else None
        except OSError:
            picture = None
        if picture is None:
            return self.send_text(HTTPStatus.NOT_FOUND, "no such alert picture")
        return self.send_body(HTTPStatus.OK, "image/jpeg", picture)

    @contextmanager
    def stream_slot(self) -> Iterator[bool]:
        """One of MAX_STREAMS places for a long response; False (after a 503) when all are taken."""
        if not self.server.streams.acquire(blocking=False):
            self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"{MAX_STREAMS} live streams are open already")
            yield False
            return
        try:
            with self.server.view.watching():
                yield True
        finally:
            self.server.streams.release()

    def send_stream(self) -> None:
        """MJPEG: at most VIEW_FPS pictures a second, each the newest frame when the viewer is ready for one."""
        with self.stream_slot() as opened:
            if not opened:
                return
            self.send_headers(HTTPStatus.OK, "multipart/x-mixed-replace; boundary=frame")
            seen = 0
            while True:
                due = time.perf_counter() + 1 / VIEW_FPS
                picture = self.server.view.next_jpeg(seen, KEEPALIVE_S)
                if self.server.view.closed:
                    return
                if picture is None:
                    continue
                seen, jpeg = picture
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%b\r\n" % (len(jpeg), jpeg))
                time.sleep(max(0.0, due - time.perf_counter()))

    def send_events(self) -> None:
        """Server-sent events: each frame's JSON line as one event (id: the frame's place in the run)."""
        with self.stream_slot() as opened:
            if not opened:
                return
            self.send_headers(HTTPStatus.OK, "text/event-stream")
            seen = self.server.view.seq
            while True:
                seen, lines, dropped = self.server.view.lines_after(seen, KEEPALIVE_S)
                if self.server.view.closed:
                    return
                chunk = f": {dropped} lines dropped (a slow client)\n\n" if dropped > 0 else ""
                chunk += "".join(f"id: {seq}\ndata: {line}\n\n" for seq, line in lines) or ": keep-alive\n\n"
                self.wfile.write(chunk.encode())
                time.sleep(EVENTS_EVERY_S)

    def post_mark(self) -> None:
        if self.headers.get_content_type() != "application/json":  # a cross-site form cannot send JSON without CORS
            return self.send_text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON: {\"frame\": N, \"mark\": \"confirmed\"}")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self.send_text(HTTPStatus.BAD_REQUEST, f"a mark is a JSON object of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length))
            frame, mark = body["frame"], body["mark"]
        except (ValueError, KeyError, TypeError):
            return self.send_text(HTTPStatus.BAD_REQUEST, "expected {\"frame\": N, \"mark\": \"not a defect\" | \"confirmed\"}")
        if not isinstance(frame, int) or mark not in MARKS:
            return self.send_text(HTTPStatus.BAD_REQUEST, f"mark must be one of {list(MARKS)} for an integer frame")
        if not self.server.view.marks_folders:
            return self.send_text(HTTPStatus.CONFLICT, "start stream.py with --save-defects DIR (or --collect DIR) to keep marks")
        try:
            return self.send_json(HTTPStatus.OK, self.server.view.mark(frame, mark))
        except LookupError as error:
            return self.send_text(HTTPStatus.NOT_FOUND, str(error))
        except OSError as error:
            log.warning("a mark of frame %d was not written: %s", frame, error)
            return self.send_text(HTTPStatus.INTERNAL_SERVER_ERROR, f"the mark was not written: {error.strerror or error}")


class LiveServer:
    """The view served from a background thread; ``close`` stops it and ends every open response."""

    def __init__(self, address: Address, view: LiveView, token: str | None):
        try:
            self.server = ViewServer(address, view, token)
        except OSError as error:
            raise ServeError(f"cannot serve the view on {address.host}:{address.port}: {error.strerror or error}; "
                             "choose another --serve [HOST:]PORT") from None
        self.view = view
        self.address = Address(address.host, self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="serve",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.view.close()
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()


def start_view(address: Address, view: LiveView, environ: dict[str, str]) -> tuple[LiveServer, str]:
    """Serve ``view``; returns the server and the line to print (the URL, with the token when it was generated)."""
    token, generated = access_token(address.host, environ)
    live = LiveServer(address, view, token)
    url = live.address.url()
    if token is None:
        return live, f"live view: {url} (this machine only: --serve 0.0.0.0:{live.address.port} opens it to the network)"
    if generated:
        return live, f"live view: {url}?token={token} (set ${TOKEN_ENV} to keep one token across restarts)"
    return live, f"live view: {url}?token=<${TOKEN_ENV}>"
