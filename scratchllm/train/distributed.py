"""Multi-process training through PyTorch's own engines: torchrun env -> process group -> DDP (or FSDP2).

Launch: `torchrun --nproc_per_node N -m scratchllm pretrain ...` (`--loop.parallel=fsdp` for FSDP2). Single-process
runs never touch torch.distributed. Data is split by global batch index (see data/batches.py), so N processes with
accumulation A see exactly the batches one process sees with accumulation N·A. Under FSDP2, checkpoints gather the
full state to rank 0 first (`full_state`), so they are the same files DDP writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

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


def wrap(model: nn.Module, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """DDP, or FSDP2 (`parallel="fsdp"`, which replaces the parameters by shards in place); as is in one process."""
    if not is_distributed():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # FSDP2: shards parameters per block, then the root

        for block in getattr(model, "layers", []):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """FSDP2: the unsharded model and optimizer state dicts on rank 0's CPU ({} on the other ranks), keyed as
    `state_dict()` keys them without sharding. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if not is_main():
        return {}, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}  # names -> optimizer.state_dict() ids
    return model_state, {"state": {index[n]: s for n, s in optim_state["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]]}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any]) -> None:
    """FSDP2, the inverse of `full_state`: every rank passes the full dicts (read from a checkpoint), keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = _param_names(model, optimizer)
    optim_state = {"state": {names[i]: s for i, s in optim_state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    # strict=False: a tied lm_head.weight is saved once, under the embedding's name
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order optimizer.state_dict() numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


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
