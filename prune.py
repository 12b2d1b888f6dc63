"""Structured channel pruning of a trained checkpoint (Torch-Pruning DepGraph), then fine-tuning.

Whole channels leave every coupled layer group, so the dense model really gets smaller and faster:
    python prune.py --checkpoint runs/main/<run>/best.pt --target-flops 50% --importance l1
    python prune.py --checkpoint runs/main/<run>/best.pt --ratio 0.3 --global --iterative-steps 3
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data.loading import DataBundle
from engine.config import RunConfig, resolve
from engine.flags import add_data_args, add_run_args, add_training_args
from engine.loop import evaluate
from engine.run import (
    Result,
    choose_threshold_on_val,
    create_run_dir,
    describe,
    loaders,
    prepare_data,
    prepare_model,
    record,
    seed_everything,
    stamp_metrics,
    train,
)
from models.factory import ModelSpec, model_from_checkpoint
from models.pruning import IMPORTANCES, ChannelPruner, PruneConfig, PruningError, architecture, parse_flops
from models.stats import count_flops, measure_latency, model_stats
from utils.checkpoint import load_checkpoint
from utils.cli import positive_int, run_cli
from utils.description import RunDescription
from utils.distributed import Runtime, setup_runtime
from utils.io import save_json
from utils.results import print_table

log = logging.getLogger(__name__)

TAYLOR_BATCHES = 4  # training batches whose loss gradients score channels for --importance taylor


def pruning_ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Remove whole channels from a trained model (Torch-Pruning dependency graph), fine-tune it, "
                    "and record its accuracy, FLOPs, params and latency next to the unpruned model.",
        epilog="Example: python prune.py --checkpoint runs/main/<run>/best.pt --target-flops 50%% --epochs 10",
    )
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint (main.py's best.pt, or an already pruned one)")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=pruning_ratio,
                        help="fraction of the channels removed from each prunable layer group (Torch-Pruning's "
                             "pruning_ratio); FLOPs fall faster, e.g. 0.3 leaves about half")
    amount.add_argument("--target-flops", metavar="FLOPS",
                        help="prune until the model's fvcore FLOPs reach this: 30M, 1.5G, 800k, or a share of the "
                             "current FLOPs such as 50%%")
    parser.add_argument("--importance", choices=list(IMPORTANCES), default="l1",
                        help="channel score: l1/l2 weight norm, taylor (first-order loss change, from "
                             f"{TAYLOR_BATCHES} training batches), bn-scale (BatchNorm gamma), random (default: %(default)s)")
    parser.add_argument("--global", dest="global_pruning", action="store_true",
                        help="rank channels across all layers (some layers shrink more than others, none by more than "
                             "90%%) instead of the same ratio in every layer")
    parser.add_argument("--iterative-steps", type=positive_int, default=1, metavar="K",
                        help="prune in K rounds, fine-tuning after each (default: %(default)s, one shot)")
    parser.add_argument("--round-to", type=positive_int, metavar="N",
                        help="keep channel counts multiples of N (e.g. 8 for SIMD-friendly layers)")
    add_data_args(parser)
    add_training_args(parser, epochs=30)
    parser.add_argument("--finetune-epochs", dest="epochs", type=positive_int, default=argparse.SUPPRESS, metavar="E",
                        help="same as --epochs: fine-tuning epochs after each pruning round, early stopping with --patience")
    add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    checkpoint = load_checkpoint(args.checkpoint)
    stored = checkpoint["description"]
    config = resolve(vars(args), pinned=stored)
    runtime = setup_runtime(config.device, config.amp)
    if runtime.distributed:
        raise PruningError("prune.py runs in one process: start it with python, not torchrun")
    seed_everything(config.seed)
    model = model_from_checkpoint(checkpoint).to(runtime.device)  # pruned, evaluated and fine-tuned where it trains
    unpruned = copy.deepcopy(model)
    img_size = config.data.img_size
    base_flops = count_flops(model, img_size)
    pruning = PruneConfig(
        args.importance, args.global_pruning, args.iterative_steps, args.round_to, args.ratio,
        parse_flops(args.target_flops, base_flops) if args.target_flops else None,
    )
    bundle = prepare_data(config, runtime)
    description = describe("prune", "prune", ModelSpec.of(stored), bundle, config, {"mean": stored.mean, "std": stored.std},
                           pretrained=stored.pretrained)
    data = loaders(bundle, description, config, runtime)
    batches = [batch for batch, _ in zip(data["train"], range(TAYLOR_BATCHES))] if args.importance == "taylor" else []
    pruner = ChannelPruner(model, img_size, pruning, batches)  # checks --target-flops before any training
    run_dir = create_run_dir(config, "prune", stored.model, runtime)
    save_json(bundle.split, run_dir / "split.json")
    base_val = evaluate(model, data["val"], runtime, desc="val")
    log.info("%s: %s FLOPs, val acc %.4f before pruning; run folder %s", stored.model, f"{base_flops:,}", base_val.acc, run_dir)
    job = PruneJob(model, pruner, pruning, base_flops, bundle, description, config, runtime, run_dir, data)
    rounds, epochs_run, test_before, description = prune_and_finetune(job)

    best_path = run_dir / "best.pt"
    point = choose_threshold_on_val(evaluate(model, data["val"], runtime, desc="val"), bundle, config, "the pruned model")
    output = evaluate(model, data["test"], runtime, desc="test")
    stamp_metrics(best_path, output, point)
    unpruned_ms = measure_latency(prepare_model(unpruned, runtime), img_size)  # same process, same memory format
    pruned_ms = measure_latency(model, img_size)
    row = record(Result("prune", "prune", output, point, best_path, epochs_run, latency_ms=pruned_ms), bundle, description,
                 run_dir, config.output_dir, model)
    save_json({
        "unpruned": {**model_stats(unpruned, img_size, len(bundle.class_names)), "latency_ms_1t": unpruned_ms,
                     "val_acc": base_val.acc, "checkpoint": str(args.checkpoint)},
        "pruned": {key: row[key] for key in ("params", "flops", "size_mb", "latency_ms_1t", "test_acc", "defect_recall")}
                  | {"test_acc_before_finetuning": test_before},
        "config": pruning.describe(), "rounds": rounds,
    }, run_dir / "pruning.json")
    log.info("test acc %.4f after fine-tuning (%.4f before); %s FLOPs (%.1f%%), %s params; 1-thread latency %.2f ms vs %.2f ms "
             "unpruned", row["test_acc"], test_before, f"{row['flops']:,}", 100 * row["flops"] / base_flops, f"{row['params']:,}",
             pruned_ms, unpruned_ms)
    print_table([row])


@dataclass(frozen=True)
class PruneJob:
    """The model being pruned in place, its pruner and what fine-tuning each round needs."""

    model: torch.nn.Module
    pruner: ChannelPruner
    pruning: PruneConfig
    base_flops: int
    bundle: DataBundle
    description: RunDescription
    config: RunConfig
    runtime: Runtime
    run_dir: Path
    data: dict


def prune_and_finetune(job: PruneJob) -> tuple[list[dict], int, float, RunDescription]:
    """Each round: prune, fine-tune (the last round in the run folder, earlier ones in round<k>/), reload the best
    weights. Returns the rounds' figures, the epochs run, the test accuracy before the last fine-tuning and the
    pruned model's description."""
    model, runtime, steps = job.model, job.runtime, job.pruning.steps
    rounds, epochs_run, description = [], 0, job.description
    for index in range(1, steps + 1):
        flops = job.pruner.step(index)
        pruned_val = evaluate(model, job.data["val"], runtime, desc="val")
        rounds.append({"round": index, "flops": flops, "flops_share": round(flops / job.base_flops, 4),
                       "val_acc_pruned": pruned_val.acc})
        log.info("round %d/%d: %s FLOPs (%.1f%% of the unpruned), val acc %.4f before fine-tuning", index, steps,
                 f"{flops:,}", 100 * flops / job.base_flops, pruned_val.acc)
        if index == steps:
            test_before = evaluate(model, job.data["test"], runtime, desc="test").acc
            log.info("test acc %.4f before fine-tuning", test_before)
        round_dir = job.run_dir if index == steps else job.run_dir / f"round{index}"
        round_dir.mkdir(exist_ok=True)
        description = description.replace(pruned={**job.pruning.describe(), "base_flops": job.base_flops,
                                                  "architecture": architecture(model)})
        epochs_run += train(prepare_model(model, runtime), job.bundle, description, job.config, runtime, round_dir).epochs_run
        model.load_state_dict(load_checkpoint(round_dir / "best.pt")["model"])
        rounds[-1]["val_acc_finetuned"] = evaluate(model, job.data["val"], runtime, desc="val").acc
    return rounds, epochs_run, test_before, description


if __name__ == "__main__":
    run_cli(main, get_args_parser())
