"""Multi-process training through PyTorch's own engines: torchrun env -> process group -> DDP (or FSDP2).

Launch: `torchrun --nproc_per_node N -m scratchllm pretrain ...`. Single-process runs never touch
torch.distributed. Data is split by global batch index (see data/batches.py), so N processes with
accumulation A see exactly the batches one process sees with accumulation N·A.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); returns whether it did."""
    if "RANK" not in os.environ or is_distributed():
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def wrap(model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module:
    if not is_distributed():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # FSDP2: shards parameters per block, then the root

        for block in getattr(model, "layers", []):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def no_sync_unless(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulation."""
    if sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()
