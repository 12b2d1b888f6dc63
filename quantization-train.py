"""INT8 quantisation of a fine-tuned model: post-training (PTQ) and quantisation-aware training (QAT).

From a checkpoint:  python quantization-train.py --checkpoint runs/main/<run>/best.pt --mode both
From scratch:       python quantization-train.py --model mobilenetv3_small   (fine-tunes FP32 with main.py's engine first)
Better PTQ:         ... --mode ptq --observer percentile --equalize --bias-correction --max-drop 1.0
PT2E:               ... --api pt2e --backend x86   (torch.export + torchao quantizer; writes int8_<mode>.pt2 instead of TorchScript)

INT8 runs on the CPU. Outputs go to <output-dir>/quantization/<timestamp>_<model>/: int8_<mode>.pt
(weights_only checkpoint, FX or PT2E: load with models.quantize_pt2e.load_int8), int8_<mode>.torchscript.pt
(torch.jit.load), <mode>/ test reports, qat/ training log; rows method=ptq/qat go to results.csv.
"""
from __future__ import annotations

import argparse
import logging
import types
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.loading import DataBundle
from engine.config import RunConfig, refuse, resolve
from engine.distillation import check_compatible, distillation_loss_fn, prepare_teacher
from engine.flags import add_data_args, add_model_args, add_run_args, add_training_args
from engine.loop import EvalOutput, Hooks, evaluate
from engine.run import (
    Result,
    Variant,
    choose_threshold_on_val,
    create_run_dir,
    finetune,
    loaders,
    prepare_data,
    prepare_model,
    record,
    train,
)
from models.factory import model_from_checkpoint, resolve_model
from models.int8 import BACKENDS, DEFAULT_OBSERVER, OBSERVERS, calibrate, fx, observers_paused, qat_schedule, set_backend
from models.stats import measure_latency, model_stats
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.cli import non_negative_float, non_negative_int, positive_float, positive_int, run_cli
from utils.description import RunDescription
from utils.distributed import Runtime, cleanup, setup_runtime
from utils.errors import UserError
from utils.io import save_json
from utils.results import print_table

SCRIPT = "quantization"
log = logging.getLogger(__name__)
CPU = Runtime(torch.device("cpu"))  # quantised kernels are CPU-only


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Quantise a fine-tuned StitchingNet classifier to INT8 (torch.ao FX graph mode) by post-training "
                    "calibration (PTQ) and/or quantisation-aware fine-tuning (QAT), and record both in results.csv.",
        epilog="Example: python quantization-train.py --checkpoint runs/main/<run>/best.pt --mode both --backend qnnpack",
    )
    parser.add_argument("--checkpoint", metavar="BEST_PT",
                        help="FP32 checkpoint to quantise (its model, classes, image size and split are used); "
                             "without it, --model is first fine-tuned exactly as main.py would")
    add_model_args(parser)
    group = parser.add_argument_group("quantisation")
    group.add_argument("--api", choices=("fx", "pt2e"), default="fx",
                       help="quantisation workflow: fx = torch.ao FX graph mode (PTQ methods below, QAT, TorchScript file); "
                            "pt2e = torch.export + torchao quantizer (X86InductorQuantizer for x86/fbgemm, ArmInductorQuantizer "
                            "for qnnpack), PTQ and QAT, writes int8_<mode>.pt2 for torch.export.load (default: %(default)s)")
    group.add_argument("--mode", choices=("ptq", "qat", "both"), default="both",
                       help="post-training quantisation, quantisation-aware training, or both (default: %(default)s)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="--api pt2e: time the INT8 model compiled by torch.compile (inductor, freezing: fused int8 "
                            "kernels; about a minute to compile); --no-compile times the eager quantize/dequantize graph, "
                            "which is slower than FP32 (default: on)")
    group.add_argument("--backend", default="x86",
                       help=f"quantised kernel set: {', '.join(BACKENDS)} (qnnpack = ARM, e.g. Raspberry Pi, 8-bit activations; "
                            "x86/fbgemm quantise activations to 7 bits; default: %(default)s)")
    group.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                       help="per-output-channel weight scales (default: on; off = one scale per tensor)")
    group.add_argument("--calib-batches", type=positive_int, default=10,
                       help="PTQ calibration batches of --batch-size training images, no augmentation; also the data of "
                            "--bias-correction (default: %(default)s)")
    group.add_argument("--observer", choices=OBSERVERS, default=DEFAULT_OBSERVER,
                       help="PTQ activation range: min-max, moving-average min-max, histogram (L2-optimal range search, the "
                            "backends' default) or percentile (histogram clipped at the 0.01st/99.99th percentiles); weights "
                            "stay min-max (default: %(default)s)")
    group.add_argument("--equalize", action="store_true",
                       help="PTQ: cross-layer equalisation of conv -> (ReLU) -> conv pairs after BatchNorm folding "
                            "(hardswish, ReLU6, SE and residual links are skipped)")
    group.add_argument("--bias-correction", action="store_true",
                       help="PTQ: subtract from each INT8 conv/linear bias the mean output shift its weight rounding causes "
                            "on the calibration images")
    group.add_argument("--max-drop", type=non_negative_float, metavar="POINTS",
                       help="PTQ: keep the fewest blocks (stem, each network block, head) in float, chosen greedily by validation "
                            "accuracy, so that it drops by at most POINTS percentage points vs FP32; costs up to one "
                            "validation pass per block for each block floated (default: everything INT8)")
    group.add_argument("--qat-epochs", type=positive_int, default=5,
                       help="QAT fine-tuning epochs (--epochs/--lr are the FP32 fine-tune's; default: %(default)s)")
    group.add_argument("--qat-lr", type=positive_float, default=5e-4,
                       help="QAT learning rate, all layers, cosine to 0 (default: %(default)s)")
    group.add_argument("--observer-epochs", type=positive_int, default=3,
                       help="QAT: freeze activation/weight ranges from this epoch on; at least 1, the ranges must see data "
                            "(default: %(default)s)")
    group.add_argument("--bn-freeze-epochs", type=non_negative_int, default=2,
                       help="QAT: freeze BatchNorm statistics from this epoch on (default: %(default)s)")
    group.add_argument("--qat-teacher", metavar="CHECKPOINT|none", default="self",
                       help="QAT: distil from this FP32 checkpoint of the same classes (Hinton KD, --qat-temperature); "
                            "default: the FP32 model being quantised; 'none': labels only")
    group.add_argument("--qat-temperature", type=positive_float, default=1.0,
                       help="QAT: softmax temperature of the teacher's soft labels (default: %(default)s)")
    add_data_args(parser)
    add_training_args(parser)
    add_run_args(parser)
    return parser


def load_fp32(path: str) -> dict:
    payload = load_checkpoint(path)
    if payload["description"].quantization is not None:
        raise CheckpointError(f"'{path}' is already INT8: pass the FP32 best.pt it was made from")
    return payload


def fp32_source(args: argparse.Namespace, payload: dict | None, config: RunConfig,
                runtime: Runtime) -> tuple[Path, dict, DataBundle, Path]:
    """The FP32 checkpoint (given, or fine-tuned now), its data and the run folder."""
    if payload is not None:
        bundle = prepare_data(config, runtime)
        run_dir = create_run_dir(config, SCRIPT, payload["description"].model, runtime)
        return Path(args.checkpoint), payload, bundle, run_dir
    spec = resolve_model(args.model, args.alpha)
    bundle = prepare_data(config, runtime)
    run_dir, _ = finetune(spec, bundle, config, runtime, Variant(script=SCRIPT))
    return run_dir / "best.pt", load_checkpoint(run_dir / "best.pt"), bundle, run_dir


PTQ_METHODS = {"equalize": "--equalize", "bias_correction": "--bias-correction", "max_drop": "--max-drop"}  # FX PTQ only


FP32_TRAINING = ("model", "alpha", "pretrained", "weights", "epochs", "lr", "lr_backbone", "warmup_epochs")
QAT_FLAGS = ("qat_epochs", "qat_lr", "observer_epochs", "bn_freeze_epochs", "qat_teacher", "qat_temperature")
QAT_ONLY = QAT_FLAGS + ("patience", "weight_decay", "label_smoothing", "clip_grad_norm", "augment")


def check_modes(args: argparse.Namespace) -> None:
    """One error line, before any work, for a flag the run would ignore: a PTQ method with --mode qat or --api pt2e,
    a QAT or fine-tuning flag where there is no such training."""
    if args.checkpoint:
        refuse(args.explicit, dict.fromkeys(FP32_TRAINING, "the FP32 model comes from --checkpoint, so there is no FP32 "
                                                           "fine-tune to set up: drop it (QAT: --qat-epochs, --qat-lr)"))
    if args.mode == "ptq":
        refuse(args.explicit, dict.fromkeys(QAT_ONLY if args.checkpoint else QAT_FLAGS,
                                            "sets up QAT, which --mode ptq does not run: drop it or use --mode both"))
    if args.mode == "qat":
        refuse(args.explicit, {"calib_batches": "PTQ calibration, which --mode qat does not run: drop it"})
    if args.qat_teacher == "none":
        refuse(args.explicit, {"qat_temperature": "softens a teacher's labels, and --qat-teacher none has none: drop one"})
    if args.api == "fx":
        refuse(args.explicit, {"compile": "times the --api pt2e model: drop it, or add --api pt2e"})
    used = [flag for name, flag in PTQ_METHODS.items() if getattr(args, name) not in (None, False)]
    used += [f"--observer {args.observer}"] if args.observer != DEFAULT_OBSERVER else []
    if used and args.mode == "qat":
        raise UserError(f"{', '.join(used)}: PTQ method(s), unused by --mode qat (QAT learns its ranges); use --mode ptq or both")
    if args.api != "pt2e":
        return
    if used:
        raise UserError(f"{', '.join(used)}: FX-only PTQ method(s), not available with --api pt2e (its quantizer fixes the "
                        "observers); drop them or use --api fx")


def main(args: argparse.Namespace) -> None:
    check_modes(args)
    set_backend(args.backend)
    (pt2e if args.api == "pt2e" else fx)()  # a torch without FX graph mode: one line now, before any work
    payload = load_fp32(args.checkpoint) if args.checkpoint else None
    config = resolve(vars(args), pinned=payload["description"] if payload else None)
    runtime = setup_runtime(config.device, config.amp)
    try:
        if runtime.distributed:
            raise UserError("quantization-train.py runs in one process: fine-tune with torchrun main.py, then pass --checkpoint")
        quantize(args, payload, config, runtime)
    finally:
        cleanup(runtime)


def pt2e() -> types.ModuleType:
    """models.quantize_pt2e, imported on first use: importing torchao costs ~2.5 s that FX runs need not pay (the FX
    path comes through ``models.int8.fx``, which also says what to use where torch has removed it)."""
    from models import quantize_pt2e
    return quantize_pt2e


def quantize(args: argparse.Namespace, payload: dict | None, config: RunConfig, runtime: Runtime) -> None:
    checkpoint, payload, bundle, run_dir = fp32_source(args, payload, config, runtime)
    description = payload["description"].replace(img_size=config.data.img_size)
    img_size, num_classes = description.img_size, len(bundle.class_names)
    fp32 = model_from_checkpoint(payload)
    data = loaders(bundle, description, config, CPU)
    fp32_test = evaluate(fp32, data["test"], CPU, desc="test fp32")
    stats = model_stats(fp32, img_size, num_classes)
    int8_stats = {**stats, "size_mb": round(stats["params"] / 2**20, 4)}  # one byte per weight
    summary = {"fp32": fp32_summary(fp32, checkpoint, fp32_test, img_size, args), "api": args.api}
    settings = {"api": args.api, "backend": args.backend, "per_channel": args.per_channel}
    rows = []

    def finish(int8: torch.nn.Module, method: str, epochs: int | str, **extra) -> None:
        path = run_dir / f"int8_{method}.pt"
        point = choose_threshold_on_val(evaluate(int8, data["val"], CPU, desc=f"val {method}"), bundle, config, method)
        describe = {"script": SCRIPT, "method": method, "img_size": img_size, "fp32_checkpoint": str(checkpoint),
                    "operating_point": point.to_dict() if point else None}
        if args.api == "pt2e":
            pt2e().save_quantized(path, int8, payload, {**settings, "mode": method, **extra}, describe)
            pt2e().save_program(int8, run_dir / f"int8_{method}.pt2")
        else:
            fx().save_quantized(path, int8, payload, {**settings, "mode": method, **extra}, describe)
            fx().save_torchscript(int8, run_dir / f"int8_{method}.torchscript.pt", img_size)
        output = evaluate(int8, data["test"], CPU, desc=f"test {method}")
        # time the saved file as a user loads it: right after QAT training the in-memory model ran 2x slower
        # than the identical graph reloaded from its file (9.3 vs 4.7 ms, mobilenetv3_small_100, 64 px)
        if args.api == "pt2e":
            latency, timed = pt2e().program_latency(run_dir / f"int8_{method}.pt2", img_size, args.compile)
        else:
            latency, timed = measure_latency(fx().load_quantized(path), img_size), f"{path.name} (FX INT8 kernels)"
        row = record(Result(SCRIPT, method, output, point, path, epochs, report_dir=run_dir / method, stats=int8_stats,
                            latency_ms=latency), bundle, description, run_dir, config.output_dir)
        rows.append(row)
        summary[method] = {"checkpoint": str(path), "test_acc": output.acc, "test_loss": output.loss, "file_mb": row["file_mb"],
                           "latency_ms_1t": latency, "latency_timed": timed, "api": args.api, **extra}

    if args.mode in ("ptq", "both"):
        calibration = list(islice(loaders(bundle, description, config.with_data(augment=0), CPU)["train"], args.calib_batches))
        if args.api == "pt2e":
            int8, extra = pt2e().quantize_ptq(fp32, args.backend, img_size, args.per_channel, calibration, args.calib_batches,
                                              args.calib_batches * args.batch_size)
        else:
            int8, extra = post_training(fp32, args, img_size, calibration, data["val"])
        finish(int8, "ptq", "", **extra)
    if args.mode in ("qat", "both"):
        teacher = qat_teacher(args, payload, runtime)
        epochs = train_qat(fp32, teacher, bundle, description, args, config, Runtime(runtime.device), run_dir / "qat", data["val"])
        prepared = prepare_qat(fp32, args, img_size)
        prepared.load_state_dict(load_checkpoint(run_dir / "qat" / "best.pt")["model"])
        finish(convert_qat(prepared, args, img_size), "qat", epochs, observer_epochs=args.observer_epochs,
               bn_freeze_epochs=args.bn_freeze_epochs, qat_lr=args.qat_lr,
               teacher=teacher[1] if teacher else None, qat_temperature=args.qat_temperature if teacher else None)
    save_json(summary, run_dir / "summary.json")
    log.info("FP32 %s: test acc %.4f  file %.3f MB  latency %.2f ms (1 thread, same process)", checkpoint, fp32_test.acc,
             summary["fp32"]["file_mb"], summary["fp32"]["latency_ms_1t"])
    print_table(rows, ("model", "method", "test_acc", "test_loss", "macro_f1", "threshold", "op_defect_recall", "op_false_alarm_rate",
                       "file_mb", "latency_ms_1t"))
    log.info("INT8 models in %s", run_dir)


def fp32_summary(fp32: torch.nn.Module, checkpoint: Path, test: EvalOutput, img_size: int, args: argparse.Namespace) -> dict:
    summary = {"checkpoint": str(checkpoint), "test_acc": test.acc, "test_loss": test.loss,
               "file_mb": checkpoint.stat().st_size / 2**20, "latency_ms_1t": measure_latency(fp32, img_size)}
    if args.api == "pt2e" and args.compile:  # the INT8 row is timed compiled: time FP32 compiled as well
        summary["latency_ms_1t_compiled"] = measure_latency(pt2e().compile_inference(fp32, img_size), img_size)
    return summary


def post_training(fp32: torch.nn.Module, args: argparse.Namespace, img_size: int,
                  calibration: list[tuple[torch.Tensor, torch.Tensor]], val_loader: DataLoader) -> tuple[torch.nn.Module, dict]:
    """PTQ with the selected methods; returns the INT8 model and the settings its checkpoint must record."""
    prepared = fx().prepare(fp32, args.backend, img_size, args.per_channel, observer=args.observer)
    if args.equalize:
        log.info("cross-layer equalisation: %d conv pairs", fx().equalize(prepared))
    used = calibrate(prepared, calibration, args.calib_batches, args.calib_batches * args.batch_size)
    settings = {"calibration_images": used, "observer": args.observer, "equalize": args.equalize,
                "bias_correction": args.bias_correction}

    def build(float_layers: list[str]) -> torch.nn.Module:
        int8 = fx().convert(prepared, img_size, float_layers)
        if args.bias_correction:
            fx().correct_bias(int8, prepared, calibration, args.calib_batches)
        return int8

    if args.max_drop is None:
        return build([]), {**settings, "float_layers": []}
    fp32_val = evaluate(fp32, val_loader, CPU, desc="val fp32").acc
    int8, float_layers, val_acc = fx().fewest_float_units(
        prepared.meta["float_units"], build, lambda model: evaluate(model, val_loader, CPU, desc="val int8").acc,
        fp32_val - args.max_drop / 100)
    log.info("float layers (%d): %s | val acc %.4f, FP32 %.4f", len(float_layers), ", ".join(float_layers) or "none",
             val_acc, fp32_val)
    return int8, {**settings, "max_drop": args.max_drop, "float_layers": float_layers, "val_acc": val_acc,
                  "val_acc_fp32": fp32_val}


def qat_teacher(args: argparse.Namespace, payload: dict, runtime: Runtime) -> tuple[torch.nn.Module, str] | None:
    """The FP32 model QAT distils from, and where it came from: the checkpoint being quantised ('self'), another of the
    same classes and input, or none."""
    if args.qat_teacher == "none":
        return None
    if args.qat_teacher == "self":
        return prepare_teacher(model_from_checkpoint(payload), runtime), "self"
    teacher = load_fp32(args.qat_teacher)
    student = payload["description"]
    if teacher["description"].class_names != student.class_names:
        raise UserError(f"--qat-teacher {args.qat_teacher} knows classes {teacher['description'].class_names}, the model "
                        f"{student.class_names}: give a teacher trained on the same classes, or --qat-teacher none")
    check_compatible(teacher["description"], student, None)
    return prepare_teacher(model_from_checkpoint(teacher), runtime), args.qat_teacher


def prepare_qat(fp32: torch.nn.Module, args: argparse.Namespace, img_size: int) -> torch.nn.Module:
    """The model with fake quantisation, in training mode: FX graph mode or PT2E."""
    if args.api == "pt2e":
        return pt2e().prepare(fp32, args.backend, img_size, args.per_channel, qat=True)
    return fx().prepare(fp32, args.backend, img_size, args.per_channel, qat=True)


def convert_qat(prepared: torch.nn.Module, args: argparse.Namespace, img_size: int) -> torch.nn.Module:
    return pt2e().convert(prepared) if args.api == "pt2e" else fx().convert(prepared, img_size)


def train_qat(fp32: torch.nn.Module, teacher: tuple[torch.nn.Module, str] | None, bundle: DataBundle,
              description: RunDescription, args: argparse.Namespace, config: RunConfig, runtime: Runtime, qat_dir: Path,
              val_loader: DataLoader) -> int:
    """Fine-tune with fake quantisation through the shared loop, distilling from ``teacher`` if given; the validation
    loss of the INT8 copy (FX) or of the fake-quantised graph (PT2E) picks the best epoch."""
    img_size = description.img_size
    prepared = prepare_model(prepare_qat(fp32, args, img_size), runtime)
    qat_config = config.with_training(epochs=args.qat_epochs, lr=args.qat_lr, lr_backbone=args.qat_lr, warmup_epochs=0)

    def validate() -> EvalOutput:
        if args.api == "pt2e":  # the prepared graph computes what convert_pt2e bakes in; converting takes ~20 s
            with observers_paused(prepared):
                return evaluate(prepared, val_loader, runtime, desc="val fake-quant")
        int8 = evaluate(convert_qat(prepared, args, img_size), val_loader, CPU, desc="val int8")
        log.info("  val converted INT8 loss %.4f acc %.4f", int8.loss, int8.acc)
        return int8

    norm = (description.mean, description.std)
    loss_fn = distillation_loss_fn(teacher[0], args.qat_temperature, 1.0, norm, norm) if teacher else None
    freeze = pt2e().freeze_batchnorm if args.api == "pt2e" else fx().freeze_fx_batchnorm
    schedule = qat_schedule(prepared, args.observer_epochs, args.bn_freeze_epochs, freeze)
    qat_description = description.replace(script=SCRIPT, method="qat-fake-quant")
    result = train(prepared, bundle, qat_description, qat_config, runtime, qat_dir,
                   Hooks(loss_fn=loss_fn, before_epoch=schedule, validate=validate))
    return result.epochs_run


if __name__ == "__main__":
    run_cli(main, get_args_parser())
