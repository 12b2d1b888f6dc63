"""Fine-tune timm models on StitchingNet (or the embedded synthetic set) and record the results.

Single process:  python main.py --model mobilenetv3_small --alpha 0.75 --augment 1 --epochs 100
Distributed:     torchrun --nproc_per_node 2 main.py --model lcnet_050 ...
From the line:   python main.py --init runs/main/<run>/best.pt --add-data reviewed/ <the run's data flags>
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.config import refuse, resolve
from engine.flags import add_data_args, add_model_args, add_run_args, add_training_args
from engine.run import Variant, finetune, prepare_data
from models.factory import ModelSpec, create_model, model_from_checkpoint, resolve_model
from models.stats import model_stats
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.cli import run_cli
from utils.distributed import cleanup, setup_runtime
from utils.errors import UserError
from utils.results import print_table

# Kept from the command line on resume; everything else (workers too: they shape the augmentation streams) comes from
# the checkpoint, and a flag that would change it is refused.
KEPT_ON_RESUME = ("resume", "device", "verbosity")
RESUMED = "--resume continues the run with the settings it started with: drop it (a new run from its weights: --init)"
USED_BY_STATS = ("stats_only", "model", "alpha", "img_size", "verbosity")
STATS_ONLY = "--stats-only measures --model/--alpha at --img-size without data or training: drop it"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune lightweight timm CNNs to classify sewing-stitch images (Normal + 10 defect types).",
        epilog="Example: python main.py --synthetic --synthetic-per-class 8 --model lcnet_050 --img-size 96 --epochs 5",
    )
    add_model_args(parser)
    parser.add_argument("--stats-only", action="store_true",
                        help="no training: print one JSON line per model with params, size_mb and fvcore FLOPs")
    parser.add_argument("--resume", metavar="LAST_PT", help="continue a stopped run from its last.pt, exactly where it stopped")
    parser.add_argument("--init", metavar="BEST_PT",
                        help="start a new run from a trained checkpoint (best.pt of main.py, prune.py or distill.py): "
                             "its architecture (a pruned one too) and weights, the backbone learning rate of trained "
                             "weights, its image size unless --img-size is given; the data must have its classes, and "
                             "its run's --seed (and --fabrics) keep its training images out of validation and test. "
                             "With --add-data: retrain the line's model on its reviewed frames")
    add_data_args(parser, add_data=True)
    add_training_args(parser)
    add_run_args(parser)
    return parser


def print_stats(specs: list[ModelSpec], img_size: int, num_classes: int = 11) -> None:
    for spec in specs:
        model, _ = create_model(spec, num_classes, pretrained=False)
        stats = model_stats(model, img_size, num_classes)
        print(json.dumps({"model": spec.name, "alpha": spec.alpha, "img_size": img_size, **stats}))


def load_init(args: argparse.Namespace) -> dict:
    """The --init checkpoint, refused in one line where it cannot start a new run."""
    init = load_checkpoint(args.init)
    stored = init["description"]
    if stored.quantization is not None:
        raise CheckpointError(f"--init '{args.init}' is an INT8 checkpoint: start from the FP32 best.pt it was made from")
    if {"model", "alpha"} & args.explicit and resolve_model(args.model, args.alpha).name != stored.model:
        raise UserError(f"--model {args.model}: --init '{args.init}' is a {stored.model}; the architecture comes from "
                        "the checkpoint, drop --model/--alpha")
    if args.pretrained:
        refuse(args.explicit, {"pretrained": "--init starts from the checkpoint's trained weights, not ImageNet's: drop it"})
    return init


def start_from(payload: dict) -> tuple[tuple[torch.nn.Module, bool], dict]:
    """(the checkpoint's model, trained weights) and the description sections that rebuild its architecture."""
    stored = payload["description"]
    return (model_from_checkpoint(payload), True), {"pruned": stored.pruned, "extra": stored.extra}


def main(args: argparse.Namespace) -> None:
    if args.init and (args.resume or args.weights):
        raise UserError("--init starts a new run from a checkpoint's weights: drop --resume and --weights")
    start = sections = init = checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        if "resume" not in checkpoint:
            raise CheckpointError(f"'{args.resume}' has no training state: resume from a run's last.pt, not best.pt")
        stored = checkpoint["description"]
        if stored.script != "main":  # e.g. a pruned architecture and its own steps, which main.py would not rebuild
            raise CheckpointError(f"'{args.resume}' is the last.pt of a {stored.script}.py run: main.py --resume continues "
                                  f"main.py runs only; train its best.pt further with main.py --init, or run "
                                  f"{stored.script}.py again")
        refuse(args.explicit, {name: RESUMED for name in args.explicit if name not in KEPT_ON_RESUME})
        config = resolve({**stored.args, **{key: vars(args)[key] for key in KEPT_ON_RESUME}}, pinned=stored)
        specs = [ModelSpec.of(stored)]
        if stored.args.get("init"):  # an --init run goes on in its checkpoint's architecture, from trained weights
            start, sections = start_from(checkpoint)
    elif args.init:
        init = load_init(args)
        config = resolve(vars(args), start=init["description"])
        specs = [ModelSpec.of(init["description"])]
        start, sections = start_from(init)
    else:
        config = resolve(vars(args))
        specs = [resolve_model(name.strip(), args.alpha) for name in args.model.split(",") if name.strip()]
    if args.stats_only:
        refuse(args.explicit, {name: STATS_ONLY for name in args.explicit if name not in USED_BY_STATS})
        print_stats(specs, config.data.img_size)
        return
    runtime = setup_runtime(config.device, config.amp)
    try:
        bundle = prepare_data(config, runtime, init=init["description"] if init else None)
        rows = []
        for spec in specs:
            resume_dir = Path(args.resume).parent if checkpoint else None
            _, row = finetune(spec, bundle, config, runtime, Variant(start=start, sections=sections), checkpoint, resume_dir)
            rows.append(row)
        if runtime.is_main:
            print_table(rows)
    finally:
        cleanup(runtime)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
