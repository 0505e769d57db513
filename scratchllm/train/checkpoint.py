"""Training checkpoints: a model directory (model/io.py) plus the optimizer state, the step, RNG states and the
stage's data position, so `--resume` continues bit for bit; never unpickles.

A checkpoint (`checkpoints/step_XXXXXX/`) is written to a temporary directory that is renamed into place
(minimind's pattern), so a killed run leaves the last checkpoint loadable. Sharded checkpoints (one file per
saving process, torch.distributed.checkpoint) are read back by any number of processes. A checkpoint's
`manifest.json` (written last, before the rename) records every file's size and SHA-256: resume takes the newest
checkpoint that still matches it and says which it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from scratchllm.model.gpt import GPT
from scratchllm.model.io import (
    CHECKPOINT_VERSION,
    CheckpointError,
    atomic_dir,
    commit_dir,
    model_tensors,
    read_tensors,
    tied_names,
    unwrap,
    write_config,
    write_model_files,
)
from scratchllm.tokenizer.bpe import Tokenizer


# ---- training checkpoints --------------------------------------------------------------------------
def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    loop_state: dict[str, Any],
    tokenizer: Tokenizer | None,
    config_sections: dict[str, Any],
    keep: int = 2,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write `step_XXXXXX/` atomically, point `latest` at it, keep the newest `keep` checkpoints.

    `optimizer` may be given as its state dict (FSDP2 gathers one). `rng` is an earlier `rng_state()` to record
    instead of the current one (the loop's state at the start of an unfinished step).
    """
    final = checkpoints_dir / f"step_{step:06d}"
    tmp = atomic_dir(final)
    inner = unwrap(model)
    if isinstance(inner, GPT):
        write_model_files(tmp, inner, tokenizer, config_sections)
    else:  # wrapped models (reward/value heads) save their full state dict
        save_file(model_tensors(inner), str(tmp / "model.safetensors"))
        write_config(tmp, None, config_sections)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    return _commit_checkpoint(tmp, final, {"step": step, "optimizer": opt_meta, **loop_state}, rng, keep)


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    """Size and SHA-256 of every file below `directory` (about a second per GB), so a checkpoint truncated or
    altered after its commit is recognised instead of resumed from."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)
    listing = {f.relative_to(directory).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}
    (directory / MANIFEST).write_text(json.dumps({"files": listing}, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (missing, unfinished, a file changed since its commit), or None."""
    if not path.is_dir():
        return "missing"
    if not (path / "state.json").is_file():
        return "no state.json (not a finished checkpoint)"
    if not (path / MANIFEST).is_file():  # written before manifests existed: the files' presence is all we know
        weights = path / SHARDS_DIR if (path / SHARDS_DIR).is_dir() else path / "model.safetensors"
        missing = [p.name for p in (weights, path / "rng.safetensors") if not p.exists()]
        return f"missing {', '.join(missing)}" if missing else None
    try:
        listing = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name, expected in listing.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} when written (truncated?)"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum (changed after it was written)"
    return None


def _step_dirs(checkpoints_dir: Path) -> list[Path]:
    """Committed `step_XXXXXX` folders, newest first (not the `.tmp` / `.old` of an unfinished write)."""
    if not checkpoints_dir.is_dir():
        return []
    dirs = [p for p in checkpoints_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def find_resumable(checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that verifies, or None; one note per newer checkpoint skipped and why).

    The step number orders them, not the `latest` pointer: a pointer to a folder deleted by hand (or not yet
    updated when a save was killed) must neither hide good checkpoints nor make resume start over."""
    notes = []
    pointer = checkpoints_dir / "latest"
    if pointer.is_file() and not (checkpoints_dir / pointer.read_text().strip()).is_dir():
        notes.append(f"{pointer} names {pointer.read_text().strip()}, which does not exist")
    for path in _step_dirs(checkpoints_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        notes.append(f"skipped {path.name}: {problem}")
    return None, notes


def _point_latest(checkpoints_dir: Path, name: str) -> None:
    pointer_tmp = checkpoints_dir / "latest.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, checkpoints_dir / "latest")


def reject_checkpoint(checkpoints_dir: Path, step: int) -> Path | None:
    """Move the checkpoint of `step` (weights the run has just found unsound) to `rejected/`, so resume never
    picks it; point `latest` at the newest one left. Returns where it went, or None if there was none."""
    path = checkpoints_dir / f"step_{step:06d}"
    if not path.is_dir():
        return None
    target = checkpoints_dir / "rejected" / path.name
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    newest, _ = find_resumable(checkpoints_dir)
    if newest is not None:
        _point_latest(checkpoints_dir, newest.name)
    else:
        (checkpoints_dir / "latest").unlink(missing_ok=True)
    return target


def _commit_checkpoint(tmp: Path, final: Path, state: dict[str, Any], rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
                       keep: int) -> Path:
    """Add the RNG and state.json to a filled `tmp`, rename it to `final`, point `latest` at it, prune old ones."""
    checkpoints_dir = final.parent
    rng_tensors, rng_meta = rng or rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"version": CHECKPOINT_VERSION, **state, "rng": rng_meta}
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    _write_manifest(tmp)
    commit_dir(tmp, final)
    _point_latest(checkpoints_dir, final.name)
    for old in _step_dirs(checkpoints_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# What a training run writes into its stage folder; a run that starts over moves these aside (caches stay).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "final", "summary.json")


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs in `run_dir` to `run_dir/earlier-N/` before a run that starts over, so its
    checkpoints and metrics are never overwritten or mixed with the new ones. Returns the folder, or None."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"earlier-{n}").exists():
        n += 1
    target = run_dir / f"earlier-{n}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target


def resume_point(checkpoints_dir: Path) -> tuple[Path, list[str]]:
    """The checkpoint `--resume` continues from, with notes on newer ones it skipped; CheckpointError when there is
    none, saying what was found and how to go on (a resume that silently started over would overwrite the run)."""
    path, notes = find_resumable(checkpoints_dir)
    if path is not None:
        return path, notes
    found = "; ".join(notes) if notes else ("an empty folder" if checkpoints_dir.is_dir() else "no such folder")
    raise CheckpointError(f"--resume: no checkpoint to continue from in {checkpoints_dir} (found: {found}). Check "
                          "--run-dir (and the stage), or run without --resume to start over: the earlier run's "
                          "files are then moved to earlier-N/, not overwritten")


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint in `checkpoints_dir` that verifies against its manifest (find_resumable), or None."""
    return find_resumable(checkpoints_dir)[0]


def read_training_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, optimizer state dict, loop state: step, stage data position, …); restores the RNG states."""
    state = json.loads((path / "state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} cannot be resumed by this build")
    optimizer_state = _optimizer_from_files(read_tensors(path / "optimizer.safetensors"), state["optimizer"])
    set_rng_state(read_tensors(path / "rng.safetensors"), state["rng"])
    return read_tensors(path / "model.safetensors"), optimizer_state, state


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the loop state (step, stage data position, …)."""
    weights, optimizer_state, state = read_training_checkpoint(path)
    inner = unwrap(model)
    missing, unexpected = inner.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - tied_names(inner):
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(optimizer_state)
    return state


# ---- sharded checkpoints: torch.distributed.checkpoint (DCP) ----------------------------------------
SHARDS_DIR = "shards"  # in a sharded step_XXXXXX/: one safetensors file per saving process


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(flat tensors for DCP, model state dict, optimizer state dict), keyed by parameter name, each process
    holding its own shards (FSDP2/TP DTensors) or whole tensors. The flat dict holds the very tensors of the
    two state dicts, so DCP loading into it fills them in place. Tied weights are kept once, as safetensors requires."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # creates Adam's moments if no step was taken yet
    for name in _shared_names(model):
        model_state.pop(name, None)
    flat = {f"model/{name}": tensor for name, tensor in model_state.items()}
    for name, param_state in optim_state["state"].items():
        flat.update({f"optim/{name}/{key}": value for key, value in param_state.items() if torch.is_tensor(value)})
    return flat, model_state, optim_state


def _shared_names(model: nn.Module) -> set[str]:
    """Names of parameters that are the same object as an earlier one (tied lm_head): saved once."""
    seen: set[int] = set()
    shared = set()
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            shared.add(name)
        seen.add(id(param))
    return shared


def save_sharded_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    tokenizer: Tokenizer | None,
    config_sections: dict[str, Any],
    keep: int = 2,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """`step_XXXXXX/` through DCP: every process writes only its own shards, which any number of processes can load
    (`load_sharded_checkpoint`). Collective: every rank calls it. Same atomic rename and `latest` as the default.

    Storage is DCP's safetensors writer, whose reader rebuilds the shard layout from the files' JSON headers:
    DCP's default format keeps that layout in a pickle (`.metadata`), and a checkpoint must never be unpickled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    from scratchllm.train import distributed as dist

    final = checkpoints_dir / f"step_{step:06d}"
    tmp = atomic_dir(final) if dist.is_main() else final.with_name(final.name + ".tmp")
    dist.barrier()  # the directory exists before anyone writes into it
    flat, _, optim_state = _flat_state(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True))
    if dist.is_main():
        write_config(tmp, unwrap(model) if isinstance(unwrap(model), GPT) else None, config_sections, tokenizer)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        state = {"step": step, "sharded": True, "optimizer": {"param_groups": optim_state["param_groups"]}, **loop_state}
        _commit_checkpoint(tmp, final, state, rng, keep)
    dist.barrier()  # nobody reads `latest` or writes the next checkpoint before the rename
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDS_DIR).is_dir()


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore a `save_sharded_checkpoint` into `model` and `optimizer` as they are sharded now (on any number of
    processes: DCP reads the pieces each one needs); restore the RNG; return the loop state. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / "state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION or not state.get("sharded"):
        raise CheckpointError(f"{path}: not a sharded checkpoint of version {CHECKPOINT_VERSION} (state.json: "
                              f"version {state.get('version')}, sharded {state.get('sharded')})")
    flat, model_state, optim_state = _flat_state(model, optimizer)
    try:  # safetensors files only: no code is ever executed
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDS_DIR)))
    except (Exception, CheckpointException) as err:  # DCP's own error derives from BaseException
        raise CheckpointError(f"{path}: the sharded weights do not match this model ({type(err).__name__}: "
                              f"{str(err).strip()[:300]})") from err
    optim_state = {"state": optim_state["state"], "param_groups": state["optimizer"]["param_groups"]}
    # strict=False: the tied lm_head.weight is restored through the embedding it shares
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(strict=False))
    set_rng_state(read_tensors(path / "rng.safetensors"), state["rng"])
    return state
