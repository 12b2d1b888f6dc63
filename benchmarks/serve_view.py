"""What stream.py --serve costs the inspection: end-to-end FPS with viewers connected against the same run without
--serve, and the process's memory over a long run with a viewer connected.

    python benchmarks/serve_view.py --onnx model224.onnx --out /tmp/serve-bench --rounds 3 --viewers 2
    python benchmarks/serve_view.py --onnx model224.onnx --out /tmp/serve-bench --rounds 0 --rss-minutes 10

Source: a generated 1280x720 MPEG-4 video of a textured seam moving past the camera (--frames frames, written once
into --out). FPS: ``stream.py --benchmark --threads 1 --save-defects`` on the video, alternately without --serve and with --serve
and --viewers clients; each client is a separate process that reads the MJPEG stream and polls api/status twice a second,
as the page does. Memory: ``stream.py --serve`` on a folder of links to the video's frames (a source that lasts as
long as needed), one client, the process's VmRSS every 10 s; the run is ended by SIGTERM after --rss-minutes.
"""
from __future__ import annotations

import argparse
import multiprocessing
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import non_negative_int, positive_int, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, LINKED_FPS, DISTINCT = 1280, 720, 200, 300
SAMPLE_EVERY_S = 10


def seam_video(out: Path, frames: int) -> Path:
    """The 1280x720 video (written once): blurred noise as fabric, a row of stitches, both moving 3 px per frame."""
    path = out / f"seam_{WIDTH}x{HEIGHT}_{frames}.mp4"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH + 400, 3), dtype=np.uint8), (0, 0), 2)
    fabric = (noise * 0.3 + np.array([140, 120, 100]) * 0.7).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (WIDTH, HEIGHT))
    for index in range(frames):
        shift = index * 3 % 400
        frame = fabric[:, shift:shift + WIDTH].copy()
        for x in range(-(shift % 24), WIDTH, 24):
            cv2.line(frame, (x, HEIGHT // 2 - 8), (x + 14, HEIGHT // 2 + 8), (40, 40, 200), 3)
        writer.write(frame)
    writer.release()
    return path


def linked_frames(out: Path, video: Path, minutes: int) -> Path:
    """A folder of links to the video's first frames (as JPEG), repeated: enough for ``minutes`` at LINKED_FPS."""
    distinct, folder = out / "distinct", out / f"linked_{minutes}min"
    if folder.exists():
        return folder
    distinct.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(video))
    for index in range(DISTINCT):
        ok, frame = capture.read()
        if not ok:
            break
        cv2.imwrite(str(distinct / f"{index:04d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    capture.release()
    sources = sorted(distinct.iterdir())
    folder.mkdir()
    for index in range(minutes * 60 * LINKED_FPS):
        (folder / f"f{index:07d}.jpg").symlink_to(sources[index % len(sources)])
    return folder


def viewer(urls: multiprocessing.Queue, received: multiprocessing.Queue) -> None:
    """One browser's load: the MJPEG stream read as it comes and api/status twice a second, until the server closes;
    puts the number of pictures it got on ``received``."""
    url = urls.get()
    pictures = 0

    def poll() -> None:
        while True:
            try:
                urllib.request.urlopen(url + "api/status", timeout=10).read()
            except OSError:
                return
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    try:
        with urllib.request.urlopen(url + "stream.mjpg", timeout=10) as stream:
            while line := stream.readline():
                pictures += line == b"--frame\r\n"
    except OSError:  # the server closed at the end of the run
        pass
    received.put(pictures)


def stream_run(flags: list[str], viewers: int, minutes: float | None = None) -> tuple[str, list[float], list[int]]:
    """Run stream.py with ``flags`` (and --serve with ``viewers`` clients when > 0); its stdout, the RSS samples (MB)
    and the pictures each client received."""
    context = multiprocessing.get_context("spawn")
    urls, received = context.Queue(), context.Queue()
    clients = [context.Process(target=viewer, args=(urls, received)) for _ in range(viewers)]
    for client in clients:
        client.start()  # started before the inspection, so they connect at once
    serve = ["--serve", "127.0.0.1:0"] if viewers else []
    process = subprocess.Popen([sys.executable, "stream.py", *flags, *serve], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if viewers:
        line = next(line for line in process.stderr if line.startswith("live view: "))
        for _ in clients:
            urls.put(line.split()[2])
    threading.Thread(target=process.stderr.read, daemon=True).start()  # status lines: never let the pipe fill
    samples = []
    if minutes is not None:
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end and process.poll() is None:
            time.sleep(SAMPLE_EVERY_S)
            samples.append(rss_mb(process.pid))
        process.send_signal(signal.SIGTERM)
    out = process.stdout.read()
    process.wait()
    for client in clients:
        client.join(timeout=30)
    if process.returncode != 0:
        raise SystemExit(f"stream.py failed ({process.returncode}): {out[-2000:]}")
    return out, samples, [received.get(timeout=30) for _ in clients]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def fps_of(summary: str) -> float:
    return float(re.search(r"([\d.]+) FPS\n", summary).group(1))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", required=True, help="the exported model (docs/benchmarks.md: mobilenetv3_small_050, 224 px)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the generated video, frames and saved alerts")
    parser.add_argument("--frames", type=positive_int, default=3000, help="frames of the generated video (default: %(default)s)")
    parser.add_argument("--rounds", type=non_negative_int, default=3,
                        help="pairs of FPS runs, without and with --serve, interleaved (default: %(default)s)")
    parser.add_argument("--viewers", type=positive_int, default=2, help="clients during the --serve runs (default: %(default)s)")
    parser.add_argument("--rss-minutes", type=non_negative_int, default=0,
                        help="then a memory run this long with one client (default: %(default)s, none)")
    return parser


def main(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    video = seam_video(args.out, args.frames)
    common = ["--onnx", args.onnx, "--threads", "1", "-q", "--save-defects", str(args.out / "alerts")]
    for round_ in range(args.rounds):
        plain = fps_of(stream_run([*common, "--source", str(video), "--benchmark"], 0)[0])
        out, _, pictures = stream_run([*common, "--source", str(video), "--benchmark"], args.viewers)
        served = fps_of(out)
        print(f"round {round_ + 1}: {plain:.1f} FPS without --serve, {served:.1f} FPS with --serve and {args.viewers} viewers "
              f"({served / plain:.1%}; pictures received: {', '.join(map(str, pictures))})", flush=True)
    if args.rss_minutes:
        folder = linked_frames(args.out, video, args.rss_minutes)
        out, samples, pictures = stream_run([*common, "--source", str(folder), "--jsonl", str(args.out / "rss.jsonl")], 1,
                                            args.rss_minutes)
        minute = samples[min(len(samples), 60 // SAMPLE_EVERY_S) - 1]
        print(f"RSS MB every {SAMPLE_EVERY_S} s: {' '.join(f'{mb:.1f}' for mb in samples)}")
        print(f"RSS growth from minute 1 to minute {args.rss_minutes}: {samples[-1] - minute:+.1f} MB "
              f"(first sample {samples[0]:.1f}, max {max(samples):.1f}); the viewer got {pictures[0]} pictures; "
              f"{out.strip().splitlines()[0]}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
