"""Images/s of the data pipeline alone, the train step alone and the two together.

Runs the real engine (engine.loop.train_one_epoch) and loaders (data.loading) on
in-RAM random images, so it needs no dataset. On a GPU the batches are copied from the loader to the device each
step, as in training:

    python benchmarks/train_throughput.py --model mobilenetv3_small_050 --img-size 224 --batch-size 32 --augment 1
    python benchmarks/train_throughput.py --device cuda --batch-size 256 --workers 0 4 8
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loading import CachedImages, make_loader  # noqa: E402
from data.transforms import AUGMENT_VERSIONS, Preprocess  # noqa: E402
from engine.loop import train_one_epoch  # noqa: E402
from models.factory import create_model, resolve_model  # noqa: E402
from utils.cli import non_negative_int, positive_int, run_cli  # noqa: E402
from utils.distributed import Runtime, resolve_device  # noqa: E402


def images_per_second(run, batches: int, batch_size: int, device: torch.device) -> float:
    run(2)  # warm-up (allocator, oneDNN/cuDNN kernels, worker start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * batch_size / (time.perf_counter() - started)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv3_small_050")
    parser.add_argument("--img-size", type=positive_int, default=224)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--augment", type=int, choices=AUGMENT_VERSIONS, default=1)
    parser.add_argument("--batches", type=positive_int, default=20, help="timed batches per measurement")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1], help="DataLoader worker counts to try")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[torch.get_num_threads()],
                        help="torch intra-op thread counts to try")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    return parser


def main(args: argparse.Namespace) -> None:
    n = args.batch_size * (args.batches + 2)
    rng = np.random.default_rng(0)
    data = CachedImages(rng.integers(0, 255, (n, args.img_size, args.img_size, 3), dtype=np.uint8), rng.integers(0, 11, n), [""] * n)
    preprocess = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), args.augment)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} {args.img_size}px batch {args.batch_size} augment {args.augment} on {where}, "
          f"{torch.get_num_threads()} default threads")
    print("| threads | workers | layout | autocast | data alone img/s | train step img/s | end to end img/s | e2e / step |")
    print("|---|---|---|---|---|---|---|---|")
    for threads, (channels_last, amp) in itertools.product(args.threads, [(False, None), (True, None), (True, torch.bfloat16)]):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model, _ = create_model(resolve_model(args.model), 11, pretrained=False)
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runtime = Runtime(device, amp_dtype=amp, channels_last=channels_last)
        batch = next(iter(make_loader(data, preprocess, args.batch_size, 0, train=True, seed=0)))
        step = images_per_second(lambda k: train_one_epoch(model, [batch] * k, optimizer, runtime, 0),  # noqa: B023 - called at once
                                 args.batches, args.batch_size, device)
        for workers in args.workers:
            loader = make_loader(data, preprocess, args.batch_size, workers, train=True, seed=0)
            alone = images_per_second(lambda k: sum(1 for _ in itertools.islice(loader, k)), args.batches, args.batch_size,  # noqa: B023
                                      device)
            e2e = images_per_second(lambda k: train_one_epoch(model, itertools.islice(loader, k), optimizer, runtime, 0),  # noqa: B023
                                    args.batches, args.batch_size, device)
            layout = "channels_last" if channels_last else "contiguous"
            print(f"| {threads} | {workers} | {layout} | {amp or 'fp32'} | {alone:.0f} | "
                  f"{step:.1f} | {e2e:.1f} | {e2e / step:.0%} |", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
