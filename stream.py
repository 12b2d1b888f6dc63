"""Inspect a camera, a video, a network stream or a folder of frames for stitch defects, in real time.

    python stream.py --onnx model.onnx --source 0                                   # USB camera, JSON lines on stdout
    python stream.py --onnx model.onnx --source picamera --roi 40,248,1200,224 --tile 224 --consecutive 3 --jsonl seam.jsonl
    python stream.py --onnx model.onnx --source line3.mp4 --benchmark               # how fast is this machine?
    python stream.py --onnx model.onnx --source picamera --save-defects alerts/ --serve 0.0.0.0:8080   # view it in a browser

With --onnx (or --openvino, --ncnn) it needs neither PyTorch nor timm (requirements-edge.txt). Every frame gets one JSON line (time,
frame index, verdict, class, confidence, defect score, tile); a tile is defective when its defect score 1 - P(Normal) reaches
the threshold stored in the model (--threshold overrides it); an alert fires after --consecutive defective frames in a row.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from deploy.artifacts import add_model_args, add_threshold_arg, decision_rule, decision_threshold, open_classifier
from deploy.collect import DEFAULT_BAND, DEFAULT_MAX, Collector
from deploy.serve import Address, LiveView, parse_address, start_view
from deploy.sources import open_source
from deploy.stream import Inspector, Outputs, Settings, StopRequest, Summary, open_window, run
from deploy.tiling import Box, parse_roi
from utils.cli import open_fraction, positive_int, run_cli
from utils.errors import UserError
from utils.io import WriteError

log = logging.getLogger(__name__)


def roi(text: str) -> Box:
    try:
        return parse_roi(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Inspect a live or recorded source for stitch defects: one JSON line per frame, debounced alerts, "
                    "a latency summary at the end (also on Ctrl-C).",
        epilog="Example: python stream.py --onnx runs/export/<run>/model.onnx --source seam.mp4 --roi 40,248,1200,224 --tile 224 "
               "--consecutive 3 --save-defects alerts/",
    )
    add_model_args(parser)
    parser.add_argument("--source", required=True, metavar="SOURCE",
                        help="camera index (0), 'picamera' (Raspberry Pi camera, Picamera2), rtsp:// or http(s):// URL, "
                             "a video file, or a folder of images played in name order")
    where = parser.add_argument_group("where to look")
    where.add_argument("--roi", type=roi, metavar="X,Y,W,H", help="the seam region in pixels (default: the whole frame)")
    where.add_argument("--tile", type=positive_int, metavar="PX",
                       help="cut the region into PX x PX tiles, each resized to the model's input and classified in one batch "
                            "(default: the region is one tile, resized as predict.py resizes an image)")
    where.add_argument("--stride", type=positive_int, metavar="PX", help="step between tiles (default: --tile, no overlap; "
                                                                          "the last tile always ends at the region's edge)")
    decide = parser.add_argument_group("verdicts")
    add_threshold_arg(decide)
    decide.add_argument("--consecutive", type=positive_int, default=1, metavar="N",
                        help="alert after N defective frames in a row, once per run of them (default: %(default)s)")
    out = parser.add_argument_group("results")
    out.add_argument("--jsonl", metavar="FILE", help="append the JSON lines to FILE instead of printing them on stdout")
    out.add_argument("--save-defects", metavar="DIR", type=Path,
                     help="save each alerted frame as DIR/frame_<index>.jpg with its defective tiles boxed and labelled")
    out.add_argument("--show", action="store_true", help="show the frames with the tiles and FPS in a window (q or Esc quits; "
                                                         "needs opencv-python with GUI, not -headless)")
    out.add_argument("--serve", type=address, metavar="[HOST:]PORT",
                     help="serve a live view to browsers: annotated frames, counters, the latest alerts (marked 'not a defect' "
                          "or 'confirmed' into marks.csv beside --save-defects and in --collect), api/status JSON and "
                          "api/events (the JSON lines); HOST defaults to 127.0.0.1 (this machine only); beyond it every "
                          "request needs the token of $STITCHDEFECT_TOKEN, else one is generated and printed")
    out.add_argument("--benchmark", action="store_true",
                     help="time the run: no JSON lines on stdout; the summary adds the share of 1 / (capture + preprocess + "
                          "inference) reached end to end")
    collect = parser.add_argument_group("collecting tiles to label (feedback for retraining)")
    collect.add_argument("--collect", metavar="DIR", type=Path,
                         help="save the defective tiles of each alerted frame and every tile whose defect score is within "
                              "--collect-band of the threshold as DIR/<predicted class>/<source>_f<frame>_t<tile>.png (the "
                              "tile as cut from the frame, lossless), listed in DIR/collected.csv; moving a file into the right "
                              "class folder labels it, and DIR is a <class>/<image> dataset as --data-root reads")
    collect.add_argument("--collect-band", type=open_fraction, default=DEFAULT_BAND, metavar="W",
                         help="collect tiles with |defect score - threshold| <= W, W in (0, 1); with no threshold (a model "
                              "deciding by its most likely class) the band is around 0.5 (default: %(default)s)")
    collect.add_argument("--collect-max", type=positive_int, default=DEFAULT_MAX, metavar="N",
                         help="stop collecting (with one warning) after N files in a run, so the disk never fills; the "
                              "inspection goes on (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="ONNX Runtime / OpenVINO / NCNN / PyTorch threads (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    stop = StopRequest()
    for signum in (signal.SIGTERM, signal.SIGHUP):  # systemd's stop, a closed SSH session: end like Ctrl-C, summary included
        signal.signal(signum, stop)
    classifier = open_classifier(args.checkpoint, args.onnx, args.openvino, args.ncnn, args.threads)
    threshold = decision_threshold(classifier, args.threshold)
    if args.stride is not None and args.tile is None:
        raise UserError(f"--stride {args.stride} is the step between tiles: give --tile too")
    if args.stride is not None and args.stride > args.tile:
        log.warning("--stride %d > --tile %d: %d px of seam between neighbouring tiles are never inspected", args.stride,
                    args.tile, args.stride - args.tile)
    settings = Settings(args.roi, args.tile, args.stride, threshold, args.consecutive)
    inspector = Inspector(classifier, settings)
    source = open_source(args.source)
    if args.show:
        open_window()
    collector = (Collector(args.collect, args.collect_band, args.collect_max, classifier.info["class_names"], source.name, source.live)
                 if args.collect else None)
    on_stdout = not (args.jsonl or args.benchmark)
    report = sys.stderr if on_stdout else sys.stdout  # stdout carries nothing but the JSON lines
    summary = Summary()
    try:
        jsonl = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else sys.stdout if on_stdout else None
    except OSError as error:
        raise WriteError.of(args.jsonl, error) from None
    info = classifier.info
    model = f"{info['model']} {info['img_size']} px, {decision_rule(threshold)}"
    view = server = None
    if args.serve:
        if args.save_defects is None:
            log.warning("--serve without --save-defects: the gallery lists alerts without pictures, and marks are kept "
                        "only with --collect")
        view = LiveView(source.name, model, threshold, args.roi, args.save_defects,
                        [folder for folder in (args.save_defects, args.collect) if folder is not None])
        server, line = start_view(args.serve, view, dict(os.environ))
        print(line, file=sys.stderr, flush=True)
    frames = source.frames()
    try:
        status = sys.stderr if log.isEnabledFor(logging.INFO) else None
        run(frames, inspector, settings, Outputs(jsonl, args.save_defects, args.show, status, collector, view), summary, stop)
    finally:
        frames.close()
        if server is not None:
            server.close()
        if jsonl is not None and jsonl is not sys.stdout:
            with contextlib.suppress(OSError):  # a refused write has raised its own error line
                jsonl.close()
        summary.reconnects = source.reconnects
        if summary.frames + summary.unreadable:  # a source that never opened is one error line, not a summary
            for line in summary.lines(source.name, model, args.benchmark):
                print(line, file=report, flush=True)
        if collector is not None:
            collector.close()
            if summary.frames:
                print(collector.report(), file=report, flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
