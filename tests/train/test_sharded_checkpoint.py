"""Sharded checkpoints (torch.distributed.checkpoint, --loop.sharded_checkpoint): written by 2 FSDP2 processes and
read by 1, and the reverse, with the same weights and the same continuation; safetensors and JSON only."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchllm.model.gpt import GPT
from scratchllm.model.io import CheckpointError
from scratchllm.train.checkpoint import load_sharded_checkpoint
from scratchllm.train.loop import train
from scratchllm.train.optim import build_optimizer
from tests.train.test_loop import LOOP, OPTIM, ToyLM, _model
from tests.train.two_process import run_two_processes

# 4 steps, checkpoints at 2 and 4; one process accumulates 2 micro-batches where two processes take one each
SHARDED = dataclasses.replace(LOOP, max_steps=4, batch_size=4, checkpoint_every=2, sharded_checkpoint=True)
ONE_PROCESS = dataclasses.replace(SHARDED, grad_accum_steps=2)

SCRIPT = """
import os, sys, dataclasses
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_loop import ToyLM, _model, OPTIM
from test_sharded_checkpoint import SHARDED
from scratchllm.train.loop import train
os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
loop = dataclasses.replace(SHARDED, parallel="fsdp")
train(_model(), ToyLM(4), OPTIM, loop, {out!r} + "/two")  # saves shards from 2 processes
train(_model(seed=123), ToyLM(4), OPTIM, loop, {out!r} + "/one_then_two", resume=True)  # resumes 1-process shards
dist.barrier()  # no rank tears gloo down while another is still talking to it ("terminate called" at exit)
dist.destroy_process_group()
"""


def _resume_from_step_2(run: Path, copy: Path) -> Path:
    """A copy of `run` whose `latest` checkpoint is the one of step 2, as if the run had stopped there."""
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text("step_000002")
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    train(_model(), ToyLM(4), OPTIM, ONE_PROCESS, out / "one")  # the uninterrupted reference, sharded checkpoints
    _resume_from_step_2(out / "one", out / "one_then_two")
    script = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    run_two_processes(script)
    return out


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_shards_of_two_processes_load_in_one_with_equal_weights(runs: Path) -> None:
    checkpoint = runs / "two" / "checkpoints" / "step_000004"
    assert len(list((checkpoint / "shards").glob("*.safetensors"))) == 2  # one file per process
    model = GPT(_model().config)
    optimizer = build_optimizer(list(model.named_parameters()), OPTIM, torch.device("cpu"))
    state = load_sharded_checkpoint(checkpoint, model, optimizer)
    assert state["step"] == 4 and state["data_world_size"] == 2
    gathered = load_file(str(runs / "two" / "final" / "model.safetensors"))  # rank 0's gather of the same weights
    _assert_same_weights({k: v for k, v in model.state_dict().items() if k in gathered}, gathered, atol=0)
    assert optimizer.state[model.layers[0].mlp.up_proj.weight]["step"] == 4  # Adam's state came back too


def test_two_process_shards_resume_in_one_process_as_if_never_stopped(runs: Path, tmp_path: Path) -> None:
    resumed = _resume_from_step_2(runs / "two", tmp_path / "two_then_one")
    train(_model(seed=123), ToyLM(4), OPTIM, ONE_PROCESS, resumed, resume=True)
    _assert_same_weights(load_file(str(resumed / "final" / "model.safetensors")),
                         load_file(str(runs / "one" / "final" / "model.safetensors")), atol=1e-5)


def test_one_process_shards_resume_in_two_processes_as_if_never_stopped(runs: Path) -> None:
    _assert_same_weights(load_file(str(runs / "one_then_two" / "final" / "model.safetensors")),
                         load_file(str(runs / "one" / "final" / "model.safetensors")), atol=1e-5)


def test_sharded_checkpoints_hold_no_pickle(runs: Path) -> None:
    files = [p for p in (runs / "two" / "checkpoints").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ""}, files  # "" = the `latest` pointer
    assert all(p.name == "latest" for p in files if not p.suffix)


def test_a_sharded_checkpoint_of_another_shape_is_a_clear_error(runs: Path) -> None:
    other = GPT(dataclasses.replace(_model().config, d_model=64))
    optimizer = build_optimizer(list(other.named_parameters()), OPTIM, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="do not match this model"):
        load_sharded_checkpoint(runs / "two" / "checkpoints" / "step_000004", other, optimizer)
