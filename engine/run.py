"""The steps every script shares: data, run folder, optimiser, training, test report, results row."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.cache import cache_root
from data.loading import DataBundle, SplitRequest, load_data, make_loader
from data.synthetic import SyntheticSet, ensure_synthetic, generated_label
from data.transforms import Preprocess
from engine.config import RunConfig, TrainConfig
from engine.loop import EvalOutput, FitConfig, FitResult, Hooks, LossFn, evaluate, fit, smoothed_cross_entropy, unwrap
from engine.metrics import choose_operating_point, classification_metrics, operating_point_metrics, write_test_report
from models.factory import ModelSpec, create_model, data_config, head_parameters, load_weights
from models.stats import measure_latency, model_stats
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.description import RunDescription
from utils.distributed import Runtime, barrier, broadcast
from utils.io import make_unique_dir, save_json
from utils.operating_point import OperatingPoint
from utils.recipes import RECIPE_NAME, write_recipe
from utils.results import OPERATING_POINT_COLUMNS, append_result, check_results_file

SYNTHETIC_SEED = 0  # the synthetic set is one fixed dataset; --seed varies split and training only

log = logging.getLogger(__name__)


def prepare_data(config: RunConfig, runtime: Runtime, init: RunDescription | None = None) -> DataBundle:
    """Load (generating the synthetic set first if asked) and split; the pinning checkpoint's split is reused.

    ``init``: the checkpoint a new run starts from (main.py --init): the data must have its classes; the split is
    made anew, with a warning where it would test the checkpoint on images it trained on.
    """
    synthetic, root, stored = config.data.source, config.data.data_root, config.pinned
    if synthetic is not None:
        def make() -> Path:
            return ensure_synthetic(cache_root(), SyntheticSet(synthetic.per_class, SYNTHETIC_SEED, synthetic.img_size,
                                                               synthetic.per_class is None, synthetic.zoom, synthetic.fabrics))

        if runtime.is_main:
            make()
        barrier(runtime)
        root = make()
    request = SplitRequest(config.seed, stored.split if stored else None, config.data.test_fabrics, config.data.fabrics,
                           config.data.add_data)
    bundle = load_data(root, config.data.img_size, request, dataset=synthetic.label if synthetic else generated_label(root) or "real",
                       class_names=(stored or init).class_names if stored or init else None, progress=runtime.is_main)
    bundle.synthetic = synthetic
    if init is not None:
        check_held_out(bundle, init)
    return bundle


class HeldOutWarning(UserWarning):
    """A run tests a checkpoint it started from on images that checkpoint trained on: its figures are optimistic."""


def check_held_out(bundle: DataBundle, init: RunDescription) -> None:
    """Warn where the split tests the --init checkpoint on images it trained on (same data root, so the same paths)."""
    if Path(init.data_root).resolve() != bundle.root.resolve():
        return
    seen = set(init.split.get("train", [])) & {path for name in ("val", "test") for path in bundle.split[name]}
    if seen:
        warnings.warn(f"the --init checkpoint was trained on {len(seen)} of this run's validation and test images "
                      f"(first: {min(seen)}), so this run's figures are optimistic: split the data as its run did "
                      f"(--seed {init.split.get('seed', init.seed)}, the same --fabrics/--test-fabrics) to keep them "
                      "held out", HeldOutWarning, stacklevel=2)


def create_run_dir(config: RunConfig, script: str, model_name: str, runtime: Runtime) -> Path:
    """``<output-dir>/<script>/<timestamp>_<model>/``, unique, the same on every rank, with the run's resolved
    settings as ``config.yaml`` (``--config`` of the same script runs it again)."""
    output_dir = Path(config.output_dir)
    check_results_file(output_dir / "results.csv")  # all ranks, before training: the row must be appendable
    name = None
    if runtime.is_main:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = make_unique_dir(output_dir / script, f"{stamp}_{model_name}")
        write_recipe(config.flags, run_dir / RECIPE_NAME, RECIPE_COMMENT)
        name = run_dir.name
    return output_dir / script / broadcast(name, runtime)


RECIPE_COMMENT = ("The resolved settings of this run. Pass this file to the script that wrote it to run it again:\n"
                  "python <script>.py --config <this file>   (flags typed after it override it)")


def describe(script: str, method: str, spec: ModelSpec, bundle: DataBundle, config: RunConfig, normalisation: dict,
             pretrained: bool) -> RunDescription:
    """The self-description stored in every checkpoint; ``normalisation``: the model's mean and std."""
    return RunDescription(
        script=script, method=method, model=spec.name, family=spec.family, alpha=spec.alpha,
        num_classes=len(bundle.class_names), class_names=list(bundle.class_names),
        img_size=config.data.img_size, mean=list(normalisation["mean"]), std=list(normalisation["std"]), pretrained=pretrained,
        dataset=bundle.dataset, data_root=str(bundle.root), synthetic=bundle.synthetic,
        augment=config.data.augment, seed=config.seed, split=bundle.split, args=dict(config.flags),
    )


def build_optimizer(model: torch.nn.Module, training: TrainConfig,
                    pretrained: bool) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW, higher LR for the new head than for a pretrained backbone, optional linear warm-up, then cosine."""
    lr_backbone = training.lr_backbone if training.lr_backbone is not None else (1e-4 if pretrained else training.lr)
    head = head_parameters(unwrap(model))
    groups = [
        {"params": [p for p in model.parameters() if id(p) in head], "lr": training.lr},
        {"params": [p for p in model.parameters() if id(p) not in head], "lr": lr_backbone},
    ]
    # The fused kernel steps all tensors at once: 0.8 ms against 4.6 ms per step for mobilenetv3_small_050 on 2 CPU threads.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=training.weight_decay, fused=fused)
    warmup = training.warmup_epochs
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=training.epochs - warmup)
    if not warmup:
        return optimizer, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def loaders(bundle: DataBundle, description: RunDescription, config: RunConfig, runtime: Runtime) -> dict:
    mean, std = description.mean, description.std
    plain = Preprocess(mean, std, augment=0)
    common = dict(batch_size=config.data.batch_size, workers=config.data.workers, seed=config.seed,
                  world_size=runtime.world_size, rank=runtime.rank)
    return {
        "train": make_loader(bundle.parts["train"], Preprocess(mean, std, config.data.augment), train=True, **common),
        "val": make_loader(bundle.parts["val"], plain, train=False, **common),
        "test": make_loader(bundle.parts["test"], plain, train=False, **{**common, "world_size": 1, "rank": 0}),
    }


def prepare_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Move to the device in channels_last (about 1.5x faster on CPU too); wrap in DDP under torchrun."""
    model = model.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else torch.contiguous_format)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


PLAIN = Hooks()  # the plain loop: the run's (label-smoothed) cross-entropy, validation loss, no schedule


def train(model: torch.nn.Module, bundle: DataBundle, description: RunDescription, config: RunConfig, runtime: Runtime,
          run_dir: Path, hooks: Hooks = PLAIN, resume: dict | None = None) -> FitResult:
    """Fit ``model`` (already on the device) on the bundle's train split with early stopping; a hook without a loss
    trains with the run's (label-smoothed) cross-entropy."""
    data = loaders(bundle, description, config, runtime)
    training = config.training
    if hooks.loss_fn is None:
        hooks = dataclasses.replace(hooks, loss_fn=smoothed_cross_entropy(training.label_smoothing))
    fit_config = FitConfig(training.epochs, training.patience, config.seed, run_dir, description, training.clip_grad_norm)
    return fit(model, data["train"], data["val"], build_optimizer(model, training, description.pretrained), runtime,
               fit_config, hooks, resume)


def test_predictions(model: torch.nn.Module, bundle: DataBundle, description: RunDescription, config: RunConfig,
                     runtime: Runtime, split: str = "test") -> EvalOutput:
    """Predictions on a whole split in this process (``runtime`` must not shard: run it on rank 0 with a local one)."""
    return evaluate(model, loaders(bundle, description, config, runtime)[split], runtime, desc=split)


def choose_threshold_on_val(output: EvalOutput, bundle: DataBundle, config: RunConfig, what: str) -> OperatingPoint | None:
    """The operating point for ``config.false_alarm_budget`` chosen on a model's validation predictions."""
    return choose_operating_point(output.targets, output.probs, bundle.class_names, config.false_alarm_budget, what)


def test_metrics(output: EvalOutput, class_names: list[str], point: OperatingPoint | None = None) -> dict:
    """Argmax metrics and loss, plus the recall and false alarms at ``point``'s threshold where there is one."""
    metrics = {**classification_metrics(output.targets, output.preds, class_names), "loss": output.loss}
    if point is not None:
        metrics.update(operating_point_metrics(output.targets, output.probs, class_names, point))
    return metrics


def stamp_metrics(checkpoint: Path, output: EvalOutput, point: OperatingPoint | None) -> None:
    """Re-save a best.pt with its test metrics and operating point, so the checkpoint describes itself completely."""
    best = load_checkpoint(checkpoint)
    description = best["description"]
    save_checkpoint(checkpoint, best["model"], description.replace(
        metrics=test_metrics(output, description.class_names, point), operating_point=point.to_dict() if point else None))


@dataclass(frozen=True)
class Result:
    """One model's test predictions, to be written as a test report and a results row."""

    script: str
    method: str
    output: EvalOutput
    point: OperatingPoint | None  # chosen on the same model's validation predictions (None: argmax only)
    checkpoint: Path  # the file the row names
    epochs: int | str = ""
    report_dir: Path | None = None  # default: the run folder; e.g. <run>/ptq keeps several methods of a run apart
    file_bytes: int | None = None  # default: the checkpoint's size (an OpenVINO IR is two files)
    stats: dict | None = None  # params/FLOPs/size; default: measured on the model given to ``record``
    latency_ms: float | None = None  # default: measured likewise (quantised or exported artifacts time themselves)


def record(result: Result, bundle: DataBundle, description: RunDescription, run_dir: Path, output_dir: str | Path,
           model_for_cost: torch.nn.Module | None = None) -> dict:
    """Write the test report into ``run_dir`` (or the result's report folder) and append the results row; returns it."""
    output = result.output
    metrics = test_metrics(output, bundle.class_names, result.point)
    fabrics = write_test_report(result.report_dir or run_dir, output.targets, output.preds, output.probs,
                                bundle.parts["test"].paths, bundle.class_names, metrics, result.point)
    if fabrics:
        log.info("test acc per fabric: %s", "  ".join(f"{fabric} {row['acc']:.3f}" for fabric, row in fabrics.items()))
    img_size = description.img_size
    stats = result.stats if result.stats is not None else model_stats(model_for_cost, img_size, len(bundle.class_names))
    latency_ms = result.latency_ms if result.latency_ms is not None else measure_latency(model_for_cost, img_size, threads=1)
    file_bytes = result.file_bytes or result.checkpoint.stat().st_size
    row = {
        "run_id": run_dir.name, "date": dt.datetime.now().isoformat(timespec="seconds"), "script": result.script,
        "method": result.method, "model": description.model, "alpha": description.alpha or "", "pretrained": description.pretrained,
        "dataset": bundle.dataset, "augment": description.augment, "img_size": img_size, "epochs": result.epochs,
        "seed": description.seed, **stats, "file_mb": round(file_bytes / 2**20, 4),
        "test_acc": round(metrics["acc"], 6), "test_loss": round(output.loss, 6), "macro_f1": round(metrics["macro_f1"], 6),
        "defect_recall": round(metrics["defect_recall"], 6), "false_alarm_rate": round(metrics["false_alarm_rate"], 6),
        "latency_ms_1t": round(latency_ms, 4), "checkpoint": str(result.checkpoint),
        **({key: round(metrics[key], 6) for key in OPERATING_POINT_COLUMNS} if result.point else {}),
    }
    append_result(Path(output_dir) / "results.csv", row)
    return row


def log_test_row(row: dict, best_epoch: int | None = None) -> None:
    at_threshold = (f"; at threshold {row['threshold']:.4f}: defect recall {row['op_defect_recall']:.4f}, false alarms "
                    f"{row['op_false_alarm_rate']:.4f} ± {row['op_false_alarm_se']:.4f}" if "threshold" in row else "")
    log.info("test acc %.4f  loss %.4f  argmax: defect recall %.4f  false alarms %.4f%s%s", row["test_acc"], row["test_loss"],
             row["defect_recall"], row["false_alarm_rate"], at_threshold,
             f"  (best epoch {best_epoch + 1})" if best_epoch is not None else "")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Variant:
    """How another script reuses ``finetune``: its name and results method, a training loss (distillation), a model
    built beforehand as ``start`` = (model, starts from trained weights), description ``sections`` to carry (the
    teacher, a pruned student's architecture)."""

    script: str = "main"
    method: str = "fp32"
    loss_fn: LossFn | None = None
    start: tuple[torch.nn.Module, bool] | None = None
    sections: dict | None = None


def finetune(spec: ModelSpec, bundle: DataBundle, config: RunConfig, runtime: Runtime, variant: Variant = Variant(),
             resume: dict | None = None, resume_dir: Path | None = None) -> tuple[Path, dict | None]:
    """main.py's job for one model: build, train, test with the best weights, record.

    Returns the run folder and, on rank 0, the results row.
    """
    seed_everything(config.seed)
    model, pretrained = start_model(spec, len(bundle.class_names), config, variant.start)
    description = describe(variant.script, variant.method, spec, bundle, config, data_config(model), pretrained)
    description = description.replace(**(variant.sections or {}))
    if resume_dir is not None:
        check_results_file(Path(config.output_dir) / "results.csv")  # create_run_dir checks it for new runs
    run_dir = resume_dir or create_run_dir(config, variant.script, spec.name, runtime)
    if resume is not None:
        model.load_state_dict(resume["model"])
    if runtime.is_main:
        save_json(bundle.split, run_dir / "split.json")
    log.info("%s: %d train / %d val / %d test images (%s), run folder %s", spec.name, len(bundle.parts["train"]),
             len(bundle.parts["val"]), len(bundle.parts["test"]), bundle.dataset, run_dir)
    model = prepare_model(model, runtime)
    result = train(model, bundle, description, config, runtime, run_dir, Hooks(loss_fn=variant.loss_fn),
                   resume["resume"] if resume else None)
    barrier(runtime)
    best_path = run_dir / "best.pt"
    net = unwrap(model)
    net.load_state_dict(load_checkpoint(best_path)["model"])
    row = None
    if runtime.is_main:
        local = Runtime(runtime.device, amp_dtype=runtime.amp_dtype)
        point = choose_threshold_on_val(test_predictions(net, bundle, description, config, local, "val"), bundle, config, spec.name)
        output = test_predictions(net, bundle, description, config, local)
        stamp_metrics(best_path, output, point)
        row = record(Result(variant.script, variant.method, output, point, best_path, result.epochs_run), bundle, description,
                     run_dir, config.output_dir, net)
        log_test_row(row, result.best_epoch)
    barrier(runtime)
    return run_dir, row


def start_model(spec: ModelSpec, num_classes: int, config: RunConfig,
                start: tuple[torch.nn.Module, bool] | None) -> tuple[torch.nn.Module, bool]:
    """(the model a run trains, whether it starts from trained weights): ``start``, else timm's model with ImageNet
    weights unless --no-pretrained, with --weights loaded over it."""
    if start is not None:
        return start
    model, pretrained = create_model(spec, num_classes, config.pretrained and not config.weights)
    if config.weights:
        skipped = load_weights(model, config.weights)
        pretrained = True
        if skipped:
            log.info("--weights: new %d-class head, not loaded: %s", num_classes, ", ".join(skipped))
    return model, pretrained
