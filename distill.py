"""Knowledge distillation: train a small student on a fine-tuned teacher's soft labels, and record it.

The teacher is a checkpoint of this toolkit; its data, split, class list and image size are the
defaults, so student and teacher are scored on the same test images.

Single process:  python distill.py --teacher runs/main/<run>/best.pt --student mobilenetv3_small --alpha 0.5 --baseline
Distributed:     torchrun --nproc_per_node 2 distill.py --teacher runs/main/<run>/best.pt ...
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from data.loading import DataBundle
from engine.config import RunConfig, resolve
from engine.distillation import DistillationError, check_compatible, distillation_loss_fn, prepare_teacher
from engine.flags import add_data_args, add_model_args, add_run_args, add_training_args
from engine.run import Variant, finetune, prepare_data, test_predictions
from models.factory import ModelSpec, create_model, data_config, model_from_checkpoint, resolve_model
from utils.checkpoint import load_checkpoint
from utils.cli import fraction, positive_float, run_cli
from utils.description import RunDescription
from utils.distributed import Runtime, broadcast, cleanup, setup_runtime
from utils.results import print_table

DEFAULT_STUDENT = "mobilenetv3_small_050"

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Distil a fine-tuned teacher checkpoint into a small student (Hinton KD) and record the student "
                    "like a main.py model (results method=kd; with --baseline also the student alone, method=fp32).",
        epilog="Example: python distill.py --teacher runs/main/<run>/best.pt --student mobilenetv3_small --alpha 0.5 "
               "--temperature 4 --kd-weight 0.9 --epochs 30 --baseline",
    )
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, metavar="CHECKPOINT",
                       help="teacher checkpoint of this toolkit (e.g. runs/main/<run>/best.pt); its data root, split, "
                            "class list and image size are the defaults")
    group.add_argument("--student-checkpoint", metavar="CHECKPOINT",
                       help="start the student from this checkpoint (fine-tuned or pruned) instead of --student/--alpha")
    group.add_argument("--temperature", type=positive_float, default=4.0,
                       help="softmax temperature T of the soft labels (default: %(default)s)")
    group.add_argument("--kd-weight", type=fraction, default=0.9,
                       help="weight of the distillation term; 1 - it weighs the cross-entropy with the labels (default: %(default)s)")
    group.add_argument("--baseline", action="store_true",
                       help="also train the same student with the same seed and schedule without the teacher, "
                            "so the KD gain is measured (results method=fp32)")
    add_model_args(parser, default=DEFAULT_STUDENT, flag="--student")
    add_data_args(parser)
    add_training_args(parser)
    add_run_args(parser)
    return parser


STUDENT_FLAGS = {"model": "--student", "alpha": "--alpha", "pretrained": "--pretrained", "weights": "--weights"}


def check_flags(args: argparse.Namespace) -> None:
    given = [flag for name, flag in STUDENT_FLAGS.items() if name in args.explicit]
    if args.student_checkpoint and given:
        raise DistillationError(f"{', '.join(given)}: --student-checkpoint replaces --student/--alpha/--pretrained/"
                                "--weights: give one or the other")


def student_starts(args: argparse.Namespace, teacher: RunDescription) -> list[tuple[ModelSpec, dict | None]]:
    """(spec, student checkpoint or None) for each student to distil."""
    if args.student_checkpoint:
        payload = load_checkpoint(args.student_checkpoint)
        stored = payload["description"]
        check_compatible(teacher, stored, args.img_size)
        return [(ModelSpec.of(stored), payload)]
    check_compatible(teacher, None, args.img_size)
    return [(resolve_model(name.strip(), args.alpha), None) for name in args.model.split(",") if name.strip()]


@dataclass(frozen=True)
class Teacher:
    model: torch.nn.Module
    description: RunDescription
    info: dict  # what the students' checkpoints record of it


def distil_student(spec: ModelSpec, payload: dict | None, teacher: Teacher, bundle: DataBundle, args: argparse.Namespace,
                   config: RunConfig, runtime: Runtime) -> list[dict]:
    """The KD run, then (with --baseline) the student alone from the same start; returns the rows (rank 0)."""
    num_classes = len(bundle.class_names)
    if payload is None:
        norm = data_config(create_model(spec, num_classes, pretrained=False)[0])
        carried = {}
    else:
        stored = payload["description"]
        norm = {"mean": stored.mean, "std": stored.std}
        carried = {"pruned": stored.pruned, "extra": stored.extra}  # a pruned student keeps its architecture
    loss_fn = distillation_loss_fn(teacher.model, args.temperature, args.kd_weight, (norm["mean"], norm["std"]),
                                   (teacher.description.mean, teacher.description.std))
    runs = [("kd", loss_fn, {**carried, "teacher": teacher.info})] + ([("fp32", None, carried)] if args.baseline else [])
    rows = []
    for method, run_loss_fn, sections in runs:
        start = (model_from_checkpoint(payload), True) if payload is not None else None
        log.info("--- %s: %s", spec.name, "with the teacher (kd)" if run_loss_fn else "alone (baseline, fp32)")
        _, row = finetune(spec, bundle, config, runtime, Variant("distill", method, run_loss_fn, start, sections))
        rows.append(row)
    if runtime.is_main:
        kd_acc = rows[0]["test_acc"]
        line = f"{spec.name}: test acc with KD {kd_acc:.4f}, teacher {teacher.info['model']} {teacher.info['test_acc']:.4f}"
        if args.baseline:
            alone = rows[1]["test_acc"]
            line += f", student alone {alone:.4f} (KD gain {100 * (kd_acc - alone):+.2f} points)"
        log.info("%s", line)
    return rows


def main(args: argparse.Namespace) -> None:
    check_flags(args)
    teacher_checkpoint = load_checkpoint(args.teacher)
    teacher_description = teacher_checkpoint["description"]
    students = student_starts(args, teacher_description)
    config = resolve(vars(args), pinned=teacher_description, fixed=("img_size",))
    runtime = setup_runtime(config.device, config.amp)
    try:
        bundle = prepare_data(config, runtime)
        teacher = prepare_teacher(model_from_checkpoint(teacher_checkpoint), runtime)
        teacher_acc = None
        if runtime.is_main:
            local = Runtime(runtime.device, amp_dtype=runtime.amp_dtype)
            teacher_acc = test_predictions(teacher, bundle, teacher_description, config, local).acc
            log.info("teacher %s: test acc %.4f (%s)", teacher_description.model, teacher_acc, args.teacher)
        teacher_info = {"checkpoint": str(args.teacher), "model": teacher_description.model,
                        "test_acc": broadcast(teacher_acc, runtime), "temperature": args.temperature, "kd_weight": args.kd_weight}
        rows = []
        for spec, payload in students:
            rows += distil_student(spec, payload, Teacher(teacher, teacher_description, teacher_info), bundle, args, config,
                                   runtime)
        if runtime.is_main:
            print_table(rows)
    finally:
        cleanup(runtime)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
