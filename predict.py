"""Classify sewing-stitch images with a trained checkpoint or an exported ONNX, OpenVINO or NCNN model.

    python predict.py --onnx model.onnx photos/ line3/frame_0012.png
    python predict.py --openvino model.xml photos/
    python predict.py --ncnn model.ncnn.param photos/
    python predict.py --checkpoint runs/main/<run>/best.pt photos/ --json > predictions.json

Folders are searched recursively for .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp files; any size or mode is
converted and resized exactly as in evaluation. Unreadable files are skipped with a warning.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter

from deploy.artifacts import add_model_args, add_threshold_arg, decision_rule, decision_threshold, open_classifier
from deploy.edge import all_threads
from deploy.files import Prediction, Throughput, classify_files, find_images
from utils.cli import positive_int, run_cli
from utils.io import atomic_open


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Classify image files and folders (recursively) as Normal or one of the stitch defects.",
        epilog="Example: python predict.py --onnx runs/export/<run>/model.onnx ../shared/stitchingnet-samples --top-k 3",
    )
    add_model_args(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    add_threshold_arg(parser)
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON array of {path, class, confidence, defect, defect_score} on stdout "
                             "(messages go to stderr)")
    parser.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV")
    parser.add_argument("--top-k", type=positive_int, default=1, metavar="K",
                        help="also list the K most likely classes (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=all_threads(), help="CPU threads (default: all, %(default)s)")
    return parser


def write_csv(predictions: list[Prediction], path: str, top_k: int) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "confidence", "defect", "defect_score"] + (["top_k"] if top_k > 1 else []))
        for p in predictions:
            extra = [";".join(f"{name}:{value:.4f}" for name, value in p.top_k)] if top_k > 1 else []
            score = "" if p.score is None else f"{p.score:.6f}"
            writer.writerow([p.path, p.label, f"{p.confidence:.6f}", p.defect, score, *extra])


def main(args: argparse.Namespace) -> None:
    classifier = open_classifier(args.checkpoint, args.onnx, args.openvino, args.ncnn, args.threads)
    info = classifier.info
    threshold = decision_threshold(classifier, args.threshold)
    files = find_images(args.paths)
    clock = Throughput()
    report = sys.stderr if args.json else sys.stdout
    predictions = []
    for p in classify_files(classifier, info, files, args.top_k, args.batch_size, threshold):
        predictions.append(p)
        if not args.json:
            alternatives = "  (" + ", ".join(f"{n} {v:.3f}" for n, v in p.top_k[1:]) + ")" if args.top_k > 1 else ""
            score = "" if p.score is None else f"  defect score {p.score:.3f}"
            print(f"{p.path}  {p.label}  {p.confidence:.3f}{score}  {p.verdict}{alternatives}")
    rate = clock.per_second(len(predictions))
    if args.json:
        json.dump([p.to_dict(args.top_k > 1) for p in predictions], sys.stdout, indent=1)
        print()
    if args.csv:
        write_csv(predictions, args.csv, args.top_k)
    counts = Counter(p.label for p in predictions)
    defects = sum(p.defect is True for p in predictions)
    print(f"\n{len(predictions)} images classified ({len(files) - len(predictions)} skipped), {defects} defective "
          f"({decision_rule(threshold)}), "
          f"{rate:.1f} images/s ({info['model']}, {info['img_size']} px)", file=report)
    for name in info["class_names"]:
        if counts[name]:
            print(f"  {name}: {counts[name]}", file=report)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
