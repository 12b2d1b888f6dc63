"""Device choice and torchrun DDP set-up (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = full FP32
    channels_last: bool = True  # NHWC activations: ~1.5x faster convs on CPU (docs/benchmarks.md)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(text: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` as a torch device: cpu, cuda or cuda:N (None: cuda when present, else cpu; a bare cuda under torchrun
    is this process's GPU). UserError, one line, for a device this machine does not have."""
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {text}: this toolkit trains on cpu or cuda; use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {text}: no CUDA GPU is usable on this machine (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    index = local_rank if device.index is None else device.index
    if index >= count:
        raise UserError(f"--device {text}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def setup_runtime(device: str | None = None, amp: bool | None = None) -> Runtime:
    """Pick the device (CUDA when present) and join the torchrun process group if launched by it.

    ``amp=None`` means bf16/fp16 autocast on CUDA and FP32 on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    use_amp = torch_device.type == "cuda" if amp is None else amp
    amp_dtype = None
    if use_amp:
        cuda_bf16 = torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if torch_device.type == "cpu" or cuda_bf16 else torch.float16
    return Runtime(torch_device, rank, world_size, amp_dtype)


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    backend_device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(value: object, runtime: Runtime) -> object:
    """Rank 0's value on every rank (e.g. the run folder name)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def cleanup(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
