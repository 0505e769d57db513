"""Tensor (model) parallelism through PyTorch's own `torch.distributed.tensor.parallel` (the Megatron-LM layout).

Within a tensor-parallel group of N processes, every block's q/k/v/gate/up projections are split by output
features (`ColwiseParallel`) and o/down by input features (`RowwiseParallel`), so each process holds 1/N of each
block's matrices and computes 1/N of the attention heads and of the MLP width; one all-reduce after `o_proj` and
one after `down_proj` rebuild the full activations (Shoeybi et al. 2019, arXiv:1909.08053 §3, Fig. 3).
Deliberate simplification: embeddings, norms and `lm_head` stay replicated (whole on every process), so the
loss code sees ordinary full logits; sharding the vocabulary as well pays only when it is a large share of the model.
`distributed.wrap` applies this on the "tp" dimension of a 2-D mesh and FSDP2 on the "dp" one.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scratchllm.config import ConfigError, ModelConfig

# Module names inside one Block (model/layers.py) -> how their weight is split across the group.
BLOCK_PLAN = {
    "self_attn.q_proj": ColwiseParallel(),  # (B, T, H/N·D): the process's own query heads
    "self_attn.k_proj": ColwiseParallel(),  # (B, T, K/N·D): the K/V heads those query heads read
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.o_proj": RowwiseParallel(),  # partial sums of the full width, all-reduced
    "mlp.gate_proj": ColwiseParallel(),
    "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(),
}


def check_tensor_parallel(config: ModelConfig, tensor_parallel: int) -> None:
    """Refuse shapes that cannot be split evenly, naming the flag to change."""
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ("d_ff", config.resolved_d_ff)):
        if value % tensor_parallel:
            raise ConfigError(f"--loop.tensor_parallel={tensor_parallel} must divide --model.{name}={value}: each "
                              "process takes an equal share of the heads and of the MLP width")
    if config.n_experts:
        raise ConfigError("--loop.tensor_parallel > 1 splits the dense SwiGLU MLP; Mixture-of-Experts models "
                          "(--model.n_experts > 0) are not supported by it, use --loop.parallel=fsdp alone")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard every block of `model` (a GPT) over the 1-D `mesh` in place; attention then runs on local heads."""
    n = mesh.size()
    check_tensor_parallel(model.config, n)
    for block in model.layers:
        for name in BLOCK_PLAN:
            if type(block.get_submodule(name)) is not nn.Linear:  # LoRA wrappers, quantised layers: no plan for them
                raise ConfigError(f"--loop.tensor_parallel: {name} is a {type(block.get_submodule(name)).__name__}, "
                                  "not an nn.Linear; tensor parallelism needs plain linear layers (no LoRA)")
        parallelize_module(block, mesh, BLOCK_PLAN)
        # subtle: Attention.forward reshapes its projections with these counts, so after sharding they must be
        # the local ones: the columns this process holds are heads [r·H/N, (r+1)·H/N), and GQA's head -> K/V-head
        # map (h // (H/K)) stays inside the process because H/N and K/N heads keep the same group size H/K.
        block.self_attn.n_heads //= n
        block.self_attn.n_kv_heads //= n
