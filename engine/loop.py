"""The one training loop and evaluation every script uses (torchvision-reference style).

Scripts change behaviour through three small hooks instead of copying the loop:
``loss_fn`` (e.g. distillation), ``before_epoch`` (e.g. freezing QAT observers) and
``validate`` (e.g. scoring a converted INT8 copy).
"""
from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data.loading import seed_epoch
from utils.checkpoint import rng_state, save_checkpoint, set_rng_state
from utils.description import RunDescription
from utils.distributed import Runtime, all_reduce_sum, barrier
from utils.errors import UserError
from utils.io import atomic_open
from utils.logs import progress

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def cross_entropy_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(images)
    return F.cross_entropy(logits, targets), logits


def smoothed_cross_entropy(label_smoothing: float) -> LossFn:
    """The default training loss, with label smoothing when asked for (evaluation always scores plain CE)."""
    if not label_smoothing:
        return cross_entropy_loss

    def loss_fn(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing), logits

    return loss_fn


def _to_device(images: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(runtime.device, non_blocking=True)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(runtime.device, non_blocking=True)


def _autocast(runtime: Runtime):
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None)


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    epoch: int,
    loss_fn: LossFn = cross_entropy_loss,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
) -> dict:
    """One pass over ``loader``; returns the mean loss and accuracy over all ranks."""
    model.train()
    total_loss = correct = seen = 0.0
    bar = progress(loader, desc=f"epoch {epoch + 1} train", leave=False, disable=not runtime.is_main)
    for images, targets in bar:
        images, targets = _to_device(images, targets, runtime)
        with _autocast(runtime):
            loss, logits = loss_fn(model, images, targets)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"loss became {loss.item()} in epoch {epoch + 1}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = targets.numel()
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == targets).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], runtime)
    return {"loss": total_loss / seen, "acc": correct / seen}


@dataclass
class EvalOutput:
    loss: float
    acc: float
    targets: np.ndarray = field(repr=False)
    preds: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, runtime: Runtime, desc: str = "eval") -> EvalOutput:
    """Loss/accuracy reduced over ranks; targets/preds/probs are this rank's shard."""
    model.eval()
    total_loss = 0.0
    targets, probs = [], []
    for images, batch_targets in progress(loader, desc=desc, leave=False, disable=not runtime.is_main):
        images, batch_targets = _to_device(images, batch_targets, runtime)
        with _autocast(runtime):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), batch_targets, reduction="sum").item()
        targets.append(batch_targets.cpu())
        probs.append(logits.float().softmax(1).cpu())
    targets_np = torch.cat(targets).numpy() if targets else np.zeros(0, np.int64)
    probs_np = torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32)
    preds_np = probs_np.argmax(1) if len(probs_np) else np.zeros(0, np.int64)
    total_loss, correct, seen = all_reduce_sum([total_loss, float((preds_np == targets_np).sum()), float(len(targets_np))], runtime)
    return EvalOutput(total_loss / max(seen, 1), correct / max(seen, 1), targets_np, preds_np, probs_np)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class FitConfig:
    """How long to fit, and where: best.pt, last.pt and log.csv go to ``run_dir``, described by ``description``."""

    epochs: int
    patience: int
    seed: int
    run_dir: Path
    description: RunDescription
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class Hooks:
    """What a training variant changes in the one loop."""

    loss_fn: LossFn | None = None  # None: cross-entropy; e.g. distillation's
    before_epoch: Callable[[int], None] | None = None  # e.g. QAT's observer and BatchNorm freezing schedule
    validate: Callable[[], EvalOutput] | None = None  # e.g. QAT's validation of the converted INT8 model


Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict]


def _write_log(history: list[dict], path: Path) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def fit(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader, optimization: Optimization,
        runtime: Runtime, config: FitConfig, hooks: Hooks = Hooks(), resume: dict | None = None) -> FitResult:
    """Train with early stopping on validation loss; rank 0 writes best.pt, last.pt and log.csv.

    ``resume`` is the "resume" entry of a last.pt: training continues at the next epoch
    with the optimiser, scheduler, early-stopping counters and RNG exactly as saved.
    """
    optimizer, scheduler = optimization
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    validate = hooks.validate or (lambda: evaluate(model, val_loader, runtime, desc="val"))
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        set_rng_state(resume["rng"])
    for epoch in range(state["epoch"], config.epochs):
        if state["bad_epochs"] >= config.patience:
            break
        started = time.perf_counter()
        seed_epoch(train_loader, config.seed, epoch)
        if hooks.before_epoch is not None:
            hooks.before_epoch(epoch)
        lrs = [group["lr"] for group in optimizer.param_groups]
        train = train_one_epoch(model, train_loader, optimizer, runtime, epoch, hooks.loss_fn or cross_entropy_loss, scaler,
                                config.clip_grad_norm)
        val = validate()
        scheduler.step()
        improved = val.loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=val.loss, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({
            "epoch": epoch + 1, **{f"lr{i}": lr for i, lr in enumerate(lrs)},
            "train_loss": round(train["loss"], 6), "train_acc": round(train["acc"], 6),
            "val_loss": round(val.loss, 6), "val_acc": round(val.acc, 6), "seconds": round(time.perf_counter() - started, 2),
        })
        if runtime.is_main:
            resume_state = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state()}
            _save_epoch(unwrap(model).state_dict(), val if improved else None, resume_state, config)
        barrier(runtime)
    if state["bad_epochs"] >= config.patience and state["epoch"] < config.epochs:
        log.info("early stop: no val-loss improvement for %d epochs (best epoch %d)", config.patience, state["best_epoch"] + 1)
    return FitResult(state["best_epoch"], state["best_val_loss"], state["epoch"], state["history"])


def _save_epoch(weights: dict, improved: EvalOutput | None, resume_state: dict, config: FitConfig) -> None:
    """best.pt where validation improved (``improved``: its figures), last.pt with the training state, log.csv."""
    epoch, history = resume_state["epoch"], resume_state["history"]
    if improved is not None:
        save_checkpoint(config.run_dir / "best.pt", weights,
                        config.description.replace(epoch=epoch, val_loss=improved.loss, val_acc=improved.acc))
    save_checkpoint(config.run_dir / "last.pt", weights, config.description, resume_state)
    _write_log(history, config.run_dir / "log.csv")
    last = history[-1]
    log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.1fs%s", epoch, config.epochs,
             last["train_loss"], last["train_acc"], last["val_loss"], last["val_acc"], last["seconds"],
             " *" if improved is not None else "")
