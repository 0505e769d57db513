"""Multi-process training through PyTorch's own engines: torchrun env -> process group -> DDP (or FSDP2).

Launch: `torchrun --nproc_per_node N -m scratchllm pretrain ...` (`--loop.parallel=fsdp` for FSDP2). Single-process
runs never touch torch.distributed. Data is split by global batch index (see data/batches.py), so N processes with
accumulation A see exactly the batches one process sees with accumulation N·A. Under FSDP2 and tensor parallelism,
checkpoints gather the full state to rank 0 first (`full_state`), so they are the same files DDP writes.

Tensor parallelism (`--loop.tensor_parallel=N`, train/tensor_parallel.py) puts the processes on a 2-D device mesh
(data-parallel × tensor-parallel): the N processes of a tensor-parallel group share one batch, so `rank` and
`world_size` (scratchllm/runtime.py) count data-parallel replicas, not processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scratchllm.config import ConfigError, LoopConfig
from scratchllm.runtime import is_distributed, is_main, set_tensor_parallel, world_size


def init_from_env(device_type: str) -> bool:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); returns whether it did."""
    if "RANK" not in os.environ or is_distributed():
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def check_layout(loop: LoopConfig, stage: Any) -> None:
    """Refuse parallel layouts the stage or the world size cannot run, naming the flag to change."""
    if (loop.parallel == "fsdp" or loop.tensor_parallel > 1) and not getattr(stage, "supports_fsdp", False):
        flag = "--loop.parallel=fsdp" if loop.parallel == "fsdp" else f"--loop.tensor_parallel={loop.tensor_parallel}"
        raise ConfigError(f"{flag}: the {stage.name} stage does not support FSDP2 or tensor parallelism (it calls "
                          "parts of its model directly, or samples differently on each process); use --loop.parallel=ddp")
    if loop.tensor_parallel > 1 and is_distributed():
        n = dist.get_world_size()
        if n % loop.tensor_parallel:
            raise ConfigError(f"--loop.tensor_parallel={loop.tensor_parallel} must divide the {n} processes")
        if n > loop.tensor_parallel and loop.parallel != "fsdp":  # DDP over DTensor parameters is not supported
            raise ConfigError(f"{n} processes in groups of --loop.tensor_parallel={loop.tensor_parallel} make "
                              f"{n // loop.tensor_parallel} data-parallel replicas: add --loop.parallel=fsdp (FSDP2 "
                              "composes with tensor parallelism on a 2-D mesh; DDP does not)")


def wrap(model: nn.Module, device: torch.device, parallel: str = "ddp", tensor_parallel: int = 1) -> nn.Module:
    """DDP, or FSDP2 (`parallel="fsdp"`, which replaces the parameters by shards in place), optionally over
    tensor-parallel groups of `tensor_parallel` processes; as is in one process."""
    if not is_distributed():
        return model
    mesh = None
    set_tensor_parallel(1)
    if tensor_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from scratchllm.train.tensor_parallel import apply_tensor_parallel

        # rows = data-parallel replicas, columns = tensor-parallel groups: TP's per-block all-reduces stay among
        # neighbouring ranks, which torchrun places on the same node (the fast links)
        mesh = init_device_mesh(device.type, (dist.get_world_size() // tensor_parallel, tensor_parallel),
                                mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        set_tensor_parallel(tensor_parallel)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # FSDP2: shards parameters per block, then the root

        dp_mesh = mesh["dp"] if mesh is not None else None  # FSDP2 shards along the data-parallel dimension only
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=dp_mesh)
        return fully_shard(model, mesh=dp_mesh)
    if mesh is not None:
        assert mesh["dp"].size() == 1, "TP with several data-parallel replicas needs FSDP2 (checked by the loop)"
        return model
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


def rescale_position(stage_state: dict[str, Any], saved_world_size: int) -> dict[str, Any]:
    """A stage's data `position` written by `saved_world_size` data-parallel replicas, for this run's count.

    By the convention of data/batches.py, `position` counts each replica's draws from one stream split by
    global index, so p draws by each of N replicas consumed global batches 0 … p·N - 1; M replicas continue at
    p·N / M each. When M does not divide p·N, the few batches of the unfinished round are skipped, not repeated."""
    if "position" not in stage_state or saved_world_size == world_size():
        return stage_state
    consumed = stage_state["position"] * saved_world_size
    position = -(-consumed // world_size())
    if position * world_size() != consumed:
        print(f"[resume] {saved_world_size} -> {world_size()} data-parallel replicas: skipping "
              f"{position * world_size() - consumed} batches to keep the stream aligned")
    return {**stage_state, "position": position}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` for parameters that mix plain tensors and DTensors of different meshes or
    placements (tensor parallelism: sharded projections beside replicated norms), which PyTorch's own refuses.

    PyTorch takes the norm of each group of alike gradients (a DTensor's comes back partial and `full_tensor`
    completes it across its mesh); the groups' norms combine as √Σ‖g‖², and every gradient is scaled by one factor."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            mesh = getattr(p.grad, "device_mesh", None)
            groups.setdefault(None if mesh is None else (mesh, tuple(p.grad.placements)), []).append(p)
    if len(groups) <= 1:  # one kind of tensor (every run without TP): PyTorch's own does it all
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = float(torch.stack([n.float().cpu() for n in norms]).norm())
    scale = max_norm / (total + 1e-6)  # the same epsilon as PyTorch's clip_grad_norm_
    if scale < 1.0:
        for group in groups.values():
            for p in group:
                p.grad.mul_(scale)
    return total
