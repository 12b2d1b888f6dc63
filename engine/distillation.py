"""Hinton knowledge distillation: the loss on logits and the training-loop hook that runs the teacher.

The teacher only changes the loss, so distillation reuses engine.loop's loop through its
``loss_fn`` hook: the teacher sees exactly the augmented batch the student sees, in eval mode
(BatchNorm statistics frozen) and under ``torch.no_grad`` (no graph, no gradients).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.loop import LossFn
from utils.description import RunDescription
from utils.distributed import Runtime
from utils.errors import UserError


class DistillationError(UserError):
    """Teacher and student (or the flags) cannot be combined; the message says how to fix it."""


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, kd_weight: float) -> torch.Tensor:
    """``kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - kd_weight) * CE(s, y)``.

    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones when T
    changes (Hinton et al., 2015); the KL is averaged over the batch, like the cross-entropy.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, targets)
    return kd_weight * temperature**2 * soft + (1 - kd_weight) * hard


def prepare_teacher(teacher: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """On the device, in eval mode, without gradients; never DDP-wrapped (nothing of it trains)."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    return teacher.to(runtime.device, memory_format=memory_format).eval().requires_grad_(False)


def distillation_loss_fn(teacher: torch.nn.Module, temperature: float, kd_weight: float,
                         student_norm: tuple[list, list], teacher_norm: tuple[list, list]) -> LossFn:
    """engine.loop ``loss_fn`` hook: KD loss of the student against the frozen teacher.

    Batches are normalised with the student's (mean, std); where the teacher was trained with
    other statistics, its input is renormalised so it sees what it was trained on.
    """
    to_teacher = _renormalise(student_norm, teacher_norm)

    def loss_fn(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = teacher(to_teacher(images) if to_teacher else images)
        logits = model(images)
        return kd_loss(logits, teacher_logits, targets, temperature, kd_weight), logits

    return loss_fn


def _renormalise(source: tuple[list, list], target: tuple[list, list]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x normalised with ``source`` -> the same pixels normalised with ``target`` (None if equal)."""
    (source_mean, source_std), (target_mean, target_std) = source, target
    if list(source_mean) == list(target_mean) and list(source_std) == list(target_std):
        return None
    column = lambda values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
    scale = column(source_std) / column(target_std)
    shift = (column(source_mean) - column(target_mean)) / column(target_std)
    return lambda images: images * scale.to(images.device) + shift.to(images.device)


def check_compatible(teacher: RunDescription, student: RunDescription | None, img_size: int | None) -> None:
    """Teacher and student must share the class list and the input size (descriptions of checkpoints)."""
    if img_size is not None and img_size != teacher.img_size:
        raise DistillationError(f"--img-size {img_size} differs from the teacher's {teacher.img_size} px: "
                                "drop --img-size (the teacher's size is the default) or use a teacher trained at that size")
    if student is None:
        return
    if student.class_names != teacher.class_names:
        raise DistillationError(f"the student checkpoint has classes {student.class_names} but the teacher "
                                f"{teacher.class_names}: distil between models of the same class list")
    if student.img_size != teacher.img_size:
        raise DistillationError(f"the student checkpoint was trained at {student.img_size} px and the teacher at "
                                f"{teacher.img_size} px: use a student and a teacher of the same image size")
