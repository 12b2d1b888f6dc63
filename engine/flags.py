"""Argument groups shared by the training scripts (data, model, training, run) and their cross-flag checks."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from data.stitchingnet import fabric_letters
from data.synthetic import MAX_ZOOM
from data.transforms import AUGMENT_VERSIONS
from utils.cli import (
    loader_workers,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    random_seed,
    training_batch_size,
    unit_fraction,
)
from utils.operating_point import DEFAULT_BUDGET

# On 2 cores a worker process steals the cores the train step needs: 85% vs 68% of the step
# rate end to end (docs/benchmarks.md), so load in the main process there.
DEFAULT_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 1) // 2)


def zoom_factor(text: str) -> float:
    value = float(text)
    if not 1 <= value <= MAX_ZOOM:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_ZOOM:g}], got {text}")
    return value


def _adder(group: argparse._ArgumentGroup, omit: tuple[str, ...]) -> Callable[..., None]:
    """``group.add_argument`` that leaves out the flags a script does not honour: they do not exist there, so argparse
    refuses them in one line instead of the script ignoring them."""
    def add(*flags: str, **options) -> None:
        if flags[0].lstrip("-").replace("-", "_") not in omit:
            group.add_argument(*flags, **options)
    return add


def add_data_args(parser: argparse.ArgumentParser, add_data: bool = False, omit: tuple[str, ...] = ()) -> None:
    """``add_data``: also --add-data, for scripts that make a new split (main.py); the others reuse a checkpoint's."""
    add = _adder(parser.add_argument_group("data"), omit)
    add("--data-root",
                       help="StitchingNet folder (<root>/<fabric>/<class>/<image>), a <root>/<class>/<image> tree, "
                            "or flat {fabric}_{class:02d}_{index}.jpg files (default: a given checkpoint's data, "
                            "else dataset/StitchingNet)")
    add("--synthetic", action="store_true",
                       help="use the embedded procedural synthetic StitchingNet (generated once into ~/.cache); "
                            "results are labelled dataset=synthetic")
    add("--synthetic-per-class", type=positive_int, metavar="N",
                       help="with --synthetic: N images per (fabric, class) pair instead of the real dataset's size (14,565)")
    add("--synthetic-zoom", type=zoom_factor, default=1.0, metavar="Z",
                       help="with --synthetic: a Z times closer camera, framing a 224/Z px window around each defect "
                            "(train at 224/Z px for the same defect size in pixels at Z^2 less compute); results are "
                            "labelled dataset=synthetic-zoomZ (default: %(default)s)")
    if add_data:
        add("--add-data", metavar="DIR", action="append",
                           help="a folder of labelled images in <class>/<image> (or StitchingNet) layout, e.g. a "
                                "reviewed stream.py --collect folder, added to the training split only: validation "
                                "and test stay the data's own (the same --seed gives the same split with or without "
                                "it), so the figures compare with a run without it; its class folders must be among "
                                "the data's classes; repeatable; results are labelled dataset=<data>+added")
    add("--img-size", type=positive_int, help="square input size in pixels (default: a given checkpoint's, else 224)")
    add("--augment", type=int, choices=AUGMENT_VERSIONS, default=1,
                       help="augmentation version: 0 none, 1 flips + small rotation, 2 = 1 + colour jitter, "
                            "3 = 2 + blur + noise (default: %(default)s)")
    add("--fabrics", metavar="LETTERS", type=fabric_letters,
                       help="train and test on these fabrics only, e.g. A,B,J: a detector for the fabrics one line "
                            "sews (with --synthetic only these are generated); results are labelled with them "
                            "(default: all)")
    add("--test-fabrics", metavar="LETTERS", type=fabric_letters,
                       help="hold these fabrics out as the whole test set, e.g. I,J,K (unseen-fabric generalisation)")
    add("--workers", type=loader_workers, default=DEFAULT_WORKERS,
                       help="DataLoader worker processes (default: %(default)s)")


def add_model_args(parser: argparse.ArgumentParser, default: str = "mobilenetv3_small_050", flag: str = "--model") -> None:
    """``flag`` renames the model option (distill.py's ``--student``); it always lands in ``args.model``."""
    group = parser.add_argument_group("model")
    group.add_argument(flag, dest="model", default=default,
                       help="timm model name (e.g. mobilenetv3_small_050, lcnet_075, resnet18), or a family "
                            "(mobilenetv1, mobilenetv2, mobilenetv3_small, mobilenetv3_large, lcnet, mnasnet, ghostnet, "
                            "repghostnet) with --alpha; comma-separated names train one after another on the same split "
                            "(default: %(default)s)")
    group.add_argument("--alpha", type=positive_float, help="width multiplier for a family name, timm's channel rounding (default: 1.0)")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from timm's ImageNet weights; offline, a loud warning and random init (default: on)")
    group.add_argument("--weights", metavar="FILE", help="start from local weights (a checkpoint of this toolkit or a state dict); "
                                                          "a classifier of another class count is replaced")


def add_training_args(parser: argparse.ArgumentParser, epochs: int = 100, lr: float = 1e-3) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=epochs, help="maximum epochs (default: %(default)s)")
    group.add_argument("--batch-size", type=training_batch_size, default=32, help="batch size per process, at least 2 "
                                                                               "(default: %(default)s)")
    group.add_argument("--patience", type=positive_int, default=5,
                       help="early stopping: epochs without validation-loss improvement (default: %(default)s)")
    group.add_argument("--lr", type=positive_float, default=lr, help="learning rate of the classifier head (default: %(default)s)")
    group.add_argument("--lr-backbone", type=positive_float,
                       help="learning rate of the backbone (default: 1e-4 when pretrained weights were loaded, else --lr)")
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--label-smoothing", type=unit_fraction, default=0.0,
                       help="label smoothing of the training loss, in [0, 1); 0.1 steadies from-scratch training "
                            "(default: %(default)s)")
    group.add_argument("--warmup-epochs", type=non_negative_int, default=0,
                       help="linear learning-rate warm-up before the cosine decay; 2-3 helps from random init, where "
                            "small nets can otherwise stall at predicting the class prior (default: %(default)s)")
    group.add_argument("--clip-grad-norm", type=positive_float, metavar="NORM",
                       help="clip the gradient norm to NORM before each step; 1.0 keeps high-learning-rate runs from "
                            "random init from collapsing to the class prior (default: no clipping)")


def add_run_args(parser: argparse.ArgumentParser, omit: tuple[str, ...] = ()) -> None:
    add = _adder(parser.add_argument_group("run"), omit)
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    add("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision autocast (default: on for CUDA, off for CPU where it is bf16)")
    add("--seed", type=random_seed, default=2025,
                       help="seed of the split, initialisation and augmentation (default: %(default)s)")
    add("--output-dir", default="runs", help="run folders and results.csv go here (default: %(default)s)")
    add("--false-alarm-budget", type=open_fraction, default=DEFAULT_BUDGET, metavar="F",
                       help="the share of good seams the line may flag: the defect threshold (on 1 - P(Normal)) is the "
                            "one with the highest defect recall whose false-alarm rate on the validation split is <= F; "
                            "it is stored in the checkpoint and every exported artifact (default: %(default)s)")
