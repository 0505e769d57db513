"""Where the code runs: the device a command uses, this process's share of a multi-process run, and the
bundled corpus of this checkout.

The one module every layer may import: data splits its batches by `rank`, evaluation picks a device, the loop
does both, and none of them reaches up into train/ for it. train/distributed.py starts the process group and
wraps models; when it puts processes into tensor-parallel groups it says so here (`set_tensor_parallel`), since
the processes of one group share one batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

CHECKOUT = Path(__file__).resolve().parents[1]  # the bundled corpus/ sits beside scratchllm/ in a checkout


def bundled(path: str | Path) -> Path:
    """`path`, or, for a default like `corpus/pretrain` that does not exist from the working directory, the
    bundled corpus of this checkout: stage defaults then work from any folder. Other paths are left as given."""
    path = Path(path)
    if path.is_absolute() or path.exists() or path.parts[:1] != ("corpus",):
        return path
    candidate = CHECKOUT / path
    return candidate if candidate.exists() else path


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA, else Apple's MPS, else the CPU; any other name as given ("cpu", "cuda:1")."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_tensor_parallel = 1  # processes per tensor-parallel group; set by train/distributed.py's `wrap`


def set_tensor_parallel(n: int) -> None:
    global _tensor_parallel
    _tensor_parallel = n


def rank() -> int:
    """Which share of the data this process takes: its data-parallel rank (the process rank without TP)."""
    return dist.get_rank() // _tensor_parallel if is_distributed() else 0


def world_size() -> int:
    """How many shares the data is split into: the number of data-parallel replicas (processes without TP)."""
    return dist.get_world_size() // _tensor_parallel if is_distributed() else 1


def is_main() -> bool:
    """Process 0, the one that logs and writes files."""
    return not is_distributed() or dist.get_rank() == 0
