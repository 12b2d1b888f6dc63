"""The feedback loop end to end on synthetic seams: a detector of fabrics A and B meets fabric J on the line.

Per seed: train on A and B (the quick start's recipe); stream half of J's images (shuffled) through
``stream.py --collect``, which keeps the frames it alarms on or is unsure of (at most --collect-max); label them
from their known classes, as a reviewer moving files between class folders would; retrain with
``main.py --init <base> --add-data <collect folder>``; score both models on J's other half (held out, never
streamed) and on the A/B test split (the same split: same data, same seed). Synthetic data: the figures test the
loop, not a real line.

    python benchmarks/feedback_loop.py --out /tmp/loop --seeds 0 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.scan import scan_dataset  # noqa: E402
from data.stitchingnet import CLASSES, FABRICS  # noqa: E402
from data.synthetic import SyntheticSet, ensure_synthetic  # noqa: E402
from deploy.artifacts import decision_threshold  # noqa: E402
from deploy.classify import TorchClassifier  # noqa: E402
from deploy.files import classify_files  # noqa: E402
from engine.metrics import classification_metrics  # noqa: E402
from engine.run import SYNTHETIC_SEED, cache_root  # noqa: E402
from utils.cli import positive_float, positive_int, random_seed, run_cli  # noqa: E402
from utils.results import read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOOM, PER_CLASS, IMG_SIZE = 4, 240, 112
RECIPE = ("--synthetic", "--synthetic-zoom", str(ZOOM), "--synthetic-per-class", str(PER_CLASS), "--fabrics", "A,B",
          "--img-size", str(IMG_SIZE), "--batch-size", "64", "--label-smoothing", "0.1", "--clip-grad-norm", "1", "--augment", "0",
          "-q")
BASE = ("--lr", "1.2e-2", "--warmup-epochs", "2", "--epochs", "11", "--patience", "11")
NAME = re.compile(r"J_(\d\d)_\d+\.jpg$")  # the synthetic set's file names carry the class


def run(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def fabric_j_halves(out: Path) -> tuple[Path, Path]:
    """Fabric J of the quick start's synthetic set, split per class by index: even images streamed (as one folder in
    a shuffled order, like seams coming past the camera), odd ones held out as a <class>/<image> tree."""
    spec = SyntheticSet(PER_CLASS, SYNTHETIC_SEED, IMG_SIZE, zoom=ZOOM, fabrics="ABJ")
    source = ensure_synthetic(cache_root(), spec) / FABRICS["J"]
    stream, held_out = out / "fabric-J-stream", out / "fabric-J-held-out"
    if stream.exists():
        return stream, held_out
    images = sorted(source.rglob("J_*.jpg"))
    order = np.random.default_rng(0).permutation(len(images))
    stream.mkdir(parents=True)
    for rank, index in enumerate(order):
        image = images[index]
        if int(image.stem.rsplit("_", 1)[1]) % 2 == 0:
            (stream / f"{rank:05d}_{image.name}").symlink_to(image)
        else:
            target = held_out / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image)
    return stream, held_out


def score(checkpoint: Path, held_out: Path) -> dict:
    """On a <class>/<image> tree: accuracy, defect recall and false alarms at the checkpoint's stored threshold (as
    the device decides), the same by argmax, and the defect-vs-Normal AUROC (the separation, whatever the threshold)."""
    dataset = scan_dataset(held_out)
    classifier = TorchClassifier.from_checkpoint(checkpoint)
    names = classifier.info["class_names"]
    files = [dataset.root / sample.path for sample in dataset.samples]
    targets = np.array([names.index(dataset.class_names[sample.label]) for sample in dataset.samples])
    figures = {}
    for rule, threshold in (("", decision_threshold(classifier, None)), ("argmax_", None)):
        predictions = list(classify_files(classifier, classifier.info, files, threshold=threshold))
        metrics = classification_metrics(targets, np.array([names.index(p.label) for p in predictions]), names)
        figures.update({rule + key: round(metrics[key], 4) for key in ("acc", "defect_recall", "false_alarm_rate")})
    scores = np.array([p.score for p in predictions])
    figures["auroc"] = round(float(roc_auc_score(targets != classifier.normal, scores)), 4)
    return figures


def label_collected(folder: Path) -> dict[str, int]:
    """Move every collected file into the folder of its true class (a reviewer's job); returns files per true class."""
    with open(folder / "collected.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts: dict[str, int] = {}
    for row in rows:
        true_class = CLASSES[int(NAME.search(row["source_file"]).group(1))]
        source = folder / row["file"]
        target = folder / true_class / source.name
        if not target.exists():  # labelled by an earlier call otherwise
            target.parent.mkdir(exist_ok=True)
            source.replace(target)
        counts[true_class] = counts.get(true_class, 0) + 1
    return counts


def test_row(output_dir: Path) -> dict:
    (row,) = read_rows(output_dir / "results.csv")
    return {"acc": float(row["test_acc"]), "defect_recall": float(row["op_defect_recall"]),
            "false_alarm_rate": float(row["op_false_alarm_rate"])}


def one_seed(seed: int, args: argparse.Namespace, stream: Path, held_out: Path) -> dict:
    out = args.out / f"seed{seed}"
    base_dir, loop_dir, collect = out / "base", out / "loop", out / "collect"
    if not (base_dir / "results.csv").exists():
        run("main.py", *RECIPE, *BASE, "--seed", str(seed), "--output-dir", str(base_dir))
    (base,) = (base_dir / "main").glob("*/best.pt")
    if not (collect / "collected.csv").exists():
        run("stream.py", "--checkpoint", str(base), "--source", str(stream), "--collect", str(collect),
            "--collect-max", str(args.collect_max), "--jsonl", str(out / "stream.jsonl"), "--threads", "2", "-q")
    labelled = label_collected(collect)
    if not (loop_dir / "results.csv").exists():
        run("main.py", *RECIPE, "--init", str(base), "--add-data", str(collect), "--lr", str(args.lr), "--lr-backbone",
            str(args.lr), "--epochs", str(args.epochs), "--patience", str(args.epochs), "--seed", str(seed), "--output-dir",
            str(loop_dir))
    (retrained,) = (loop_dir / "main").glob("*/best.pt")
    return {"seed": seed, "collected": sum(labelled.values()), "collected_per_class": labelled,
            "fabric_J": {"before": score(base, held_out), "after": score(retrained, held_out)},
            "fabrics_AB_test": {"before": test_row(base_dir), "after": test_row(loop_dir)}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (runs, collect folders, fabric J halves)")
    parser.add_argument("--seeds", type=random_seed, nargs="+", default=[0, 1], help="training seeds (default: %(default)s)")
    parser.add_argument("--collect-max", type=positive_int, default=200, help="frames collected per seed (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=6, help="epochs of the --init run (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=2e-3,
                        help="learning rate of the --init run, head and backbone: a new fabric needs the backbone to "
                             "adapt (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> None:
    stream, held_out = fabric_j_halves(args.out)
    for seed in args.seeds:
        print(json.dumps(one_seed(seed, args, stream, held_out)), flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
