"""The one loop: learns, accumulates exactly, skips non-finite steps, resumes bit for bit, saves atomically."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from scratchllm.config import ConfigError, LoopConfig, OptimConfig, model_preset
from scratchllm.data.batches import LMWindows
from scratchllm.data.shards import ShardError, load_shard, write_shard
from scratchllm.model.gpt import GPT
from scratchllm.model.io import load_model
from scratchllm.train.checkpoint import latest_checkpoint
from scratchllm.train.loop import Stage, TrainingDiverged, train
from scratchllm.train.losses import cross_entropy_loss
from tests.train.two_process import run_two_processes

VOCAB = 48


def _tokens(n: int = 4000) -> np.ndarray:
    # A learnable stream: a repeating pattern with noise, so loss can fall within a few steps.
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(12), n // 12 + 1)[:n]
    noise = rng.integers(0, VOCAB, n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


class ToyLM(Stage):
    name = "toy"
    supports_fsdp = True

    def __init__(self, batch_size: int, seq_len: int = 16, seed: int = 0, poison_steps: set[int] | None = None) -> None:
        self.windows = LMWindows(_tokens(), seq_len, batch_size, seed)
        self.val = LMWindows(_tokens(), seq_len, 8, seed=99).batch(0)
        self.poison_steps, self.calls = poison_steps or set(), 0

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        return iter(self.windows)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self.calls += 1
        loss = cross_entropy_loss(model(batch["ids"]), batch["targets"])
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        return loss, {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(cross_entropy_loss(model(self.val["ids"]), self.val["targets"]))}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.windows.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.windows.position = state["position"]


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_preset("tiny", vocab_size=VOCAB))


LOOP = LoopConfig(max_steps=20, batch_size=8, seq_len=16, eval_every=0, checkpoint_every=0, log_every=5, device="cpu")
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)


def test_loss_falls_and_parameters_change(tmp_path: Path) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = ToyLM(8)
    start = stage.evaluate(model)["val_loss"]
    metrics = train(model, stage, OPTIM, dataclasses.replace(LOOP, max_steps=40), tmp_path)
    assert metrics["val_loss"] < start - 0.5
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "weight" in k)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "final" / "model.safetensors").exists()


def test_grad_accumulation_1x8_equals_8x1(tmp_path: Path) -> None:
    a, b = _model(), _model()
    # One micro-batch of 8 vs eight micro-batches of 1 drawn from the same windows.
    stage_a = ToyLM(8)
    stage_b = ToyLM(1)
    stage_b.windows.batch = lambda k: {key: v[k % 8 : k % 8 + 1] for key, v in stage_a.windows.batch(k // 8).items()}
    train(a, stage_a, OPTIM, dataclasses.replace(LOOP, max_steps=3), tmp_path / "a")
    train(b, stage_b, OPTIM, dataclasses.replace(LOOP, max_steps=3, batch_size=1, grad_accum_steps=8), tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    model = _model()
    stage = ToyLM(8, poison_steps={3})
    metrics = train(model, stage, OPTIM, dataclasses.replace(LOOP, max_steps=6), tmp_path / "a")
    assert metrics["skipped_steps"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    stage = ToyLM(8, poison_steps=set(range(2, 100)))
    with pytest.raises(TrainingDiverged, match="lower --optim.lr"):
        train(_model(), stage, OPTIM, dataclasses.replace(LOOP, max_steps=20, max_bad_steps=3), tmp_path / "b")


class Interrupt(Exception):
    """Stands for a crash: raised inside a step, after the checkpoint of the step before."""


class StopAfter(ToyLM):
    """ToyLM that crashes once its data position passes `after` steps."""

    def __init__(self, batch_size: int, after: int) -> None:
        super().__init__(batch_size)
        self.after = after

    def loss(self, model, batch):
        if self.windows.position > self.after:
            raise Interrupt
        return super().loss(model, batch)


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    loop = dataclasses.replace(LOOP, max_steps=20, checkpoint_every=10)
    straight = _model()
    train(straight, ToyLM(8), OPTIM, loop, tmp_path / "straight")
    interrupted = _model()
    with pytest.raises(Interrupt):
        train(interrupted, StopAfter(8, after=10), OPTIM, loop, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_000010"
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    train(resumed, ToyLM(8), OPTIM, loop, tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_after_ctrl_c_mid_step_is_bitwise_identical(tmp_path: Path) -> None:
    loop = dataclasses.replace(LOOP, max_steps=20, batch_size=4, grad_accum_steps=2)
    straight = _model()
    train(straight, ToyLM(4), OPTIM, loop, tmp_path / "straight")

    class CtrlCInStep12(ToyLM):
        def loss(self, model, batch):
            if self.windows.position == 2 * 11 + 2:  # both micro-batches of step 12 drawn, the step not taken
                raise KeyboardInterrupt
            return super().loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(_model(), CtrlCInStep12(4), OPTIM, loop, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_000011"
    resumed = _model(seed=123)
    train(resumed, ToyLM(4), OPTIM, loop, tmp_path / "resumed", resume=True)  # must redraw step 12's batches
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_compile_error_at_the_first_step_falls_back_to_eager(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_compiler(graph, example_inputs):  # a backend failing as a missing C++ compiler or Triton would
        raise RuntimeError("no C++ compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=no_compiler))
    eager, compiled = _model(), _model()
    train(eager, ToyLM(8), OPTIM, dataclasses.replace(LOOP, max_steps=3), tmp_path / "eager")
    try:
        train(compiled, ToyLM(8), OPTIM, dataclasses.replace(LOOP, max_steps=3, compile=True), tmp_path / "compiled")
    finally:
        torch._dynamo.reset()
    assert "torch.compile failed at the first step" in capsys.readouterr().out
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(a, b), name


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    model = GPT(model_preset("tiny", vocab_size=260))  # the vocabulary of the tokenizer saved beside it below
    train(model, ToyLM(8), OPTIM, dataclasses.replace(LOOP, max_steps=2), tmp_path)
    final = tmp_path / "final"
    from scratchllm.tokenizer.bpe import Tokenizer

    Tokenizer.train(["abc"], 256 + 4, progress=False).save(final / "tokenizer.json")
    script = textwrap.dedent(f"""
        import os, torch
        import safetensors.torch as st
        from scratchllm.model.io import save_model, load_model
        model, tok, cfg = load_model({str(final)!r})
        real = st.save_file
        def dying_save(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            os._exit(1)  # killed after writing the new weights, before the directory swap
        st.save_file = dying_save
        import scratchllm.model.io as c
        c.save_file = dying_save
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        save_model({str(final)!r}, model, tok, {{}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    loaded, _, _ = load_model(final)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)  # the old weights, intact


def test_bad_shard_header_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    with pytest.raises(ShardError, match="unreadable shard header"):
        load_shard(bad)
    wrong = tmp_path / "wrong.bin"
    write_shard(wrong, np.arange(10, dtype=np.uint16), {"magic": "something-else", "version": 1})
    with pytest.raises(ShardError, match="bad magic"):
        load_shard(wrong)


DDP_SCRIPT = """
import os, sys, dataclasses, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_loop import ToyLM, _model, LOOP, OPTIM
from scratchllm.train.loop import train
from safetensors.torch import save_file
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
model = _model()
train(model, ToyLM(4), OPTIM, dataclasses.replace(LOOP, max_steps=4, batch_size=4), {out!r} + f"/r{{rank}}")
if rank == 0:
    save_file({{k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}}, {out!r} + "/ddp.safetensors")
dist.barrier()  # no rank tears gloo down while another is still talking to it ("terminate called" at exit)
dist.destroy_process_group()
"""


def test_two_process_ddp_equals_one_process_with_double_accumulation(tmp_path: Path) -> None:
    run_two_processes(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)), timeout=180)
    single = _model()
    train(single, ToyLM(4), OPTIM, dataclasses.replace(LOOP, max_steps=4, batch_size=4, grad_accum_steps=2), tmp_path / "single")
    from safetensors.torch import load_file

    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    for name, param in single.state_dict().items():
        if name in ddp:
            assert torch.allclose(param, ddp[name], atol=1e-5), name
    # the logged loss is the mean over both ranks' batches, as the single process's over its two micro-batches
    logged = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("r0", "single")]
    assert logged[0] and logged[0] == pytest.approx(logged[1], abs=1e-5)


FSDP_SCRIPT = """
import contextlib, os, sys, dataclasses, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_loop import ToyLM, _model, LOOP, OPTIM
from scratchllm.train.loop import train
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
loop = dataclasses.replace(LOOP, max_steps=4, batch_size=4, checkpoint_every=2, parallel="fsdp")

class StopAfter2(ToyLM):  # both ranks stop in step 3, after the checkpoint of step 2
    def loss(self, model, batch):
        if self.windows.position > 2:
            raise InterruptedError
        return super().loss(model, batch)

with contextlib.suppress(InterruptedError):  # the simulated crash after step 2's checkpoint
    train(_model(), StopAfter2(4), OPTIM, loop, {out!r})
train(_model(seed=123), ToyLM(4), OPTIM, loop, {out!r}, resume=True)  # reads the gathered step-2 checkpoint
dist.barrier()  # no rank tears gloo down while another is still talking to it ("terminate called" at exit)
dist.destroy_process_group()
"""


def test_fsdp_two_processes_equal_one_process_and_resume_from_gathered_checkpoints(tmp_path: Path) -> None:
    run_two_processes(FSDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "fsdp")), timeout=180)
    single = _model()
    train(single, ToyLM(4), OPTIM, dataclasses.replace(LOOP, max_steps=4, batch_size=4, grad_accum_steps=2), tmp_path / "single")
    from safetensors.torch import load_file

    fsdp = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))  # written from the gathered shards
    for name, param in single.state_dict().items():
        if name in fsdp:
            assert torch.allclose(param, fsdp[name], atol=1e-5), name


def test_fsdp_is_refused_by_stages_that_do_not_support_it(tmp_path: Path) -> None:
    class NoFSDP(ToyLM):
        supports_fsdp = False

    with pytest.raises(ConfigError, match="does not support FSDP2"):
        train(_model(), NoFSDP(8), OPTIM, dataclasses.replace(LOOP, parallel="fsdp"), tmp_path)


def test_a_stage_without_its_loss_fails_when_built_not_after_its_compute() -> None:
    class NoLoss(Stage):
        name = "no-loss"

        def batches(self, split: str):
            return iter([])

        def evaluate(self, model):
            return {}

    with pytest.raises(TypeError, match="loss"):
        NoLoss()
