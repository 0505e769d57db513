"""Resume that never loses work, the loss-spike guard, metrics without duplicate rows (issue #29)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from scratchllm.config import OptimConfig
from scratchllm.model.io import CheckpointError, read_tensors
from scratchllm.train.checkpoint import latest_checkpoint
from scratchllm.train.loop import TrainingDiverged, train
from scratchllm.train.spike_guard import SpikeGuard
from tests.train.test_loop import LOOP, OPTIM, Interrupt, StopAfter, ToyLM, _model

CKPT_LOOP = dataclasses.replace(LOOP, max_steps=8, checkpoint_every=2, keep_checkpoints=3, log_every=1)


def _crashed_run(run_dir: Path, after: int = 6) -> Path:
    """A run killed in the step after `after`: checkpoints every 2 steps, the newest at `after` or just before."""
    with pytest.raises(Interrupt):
        train(_model(), StopAfter(8, after=after), OPTIM, CKPT_LOOP, run_dir)
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the same run, never interrupted."""
    model = _model()
    train(model, ToyLM(8), OPTIM, CKPT_LOOP, tmp_path_factory.mktemp("straight"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same(expected: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(expected[name], p), name


def test_resume_falls_back_when_latest_points_to_a_deleted_checkpoint(tmp_path: Path, straight, capsys) -> None:
    checkpoints = _crashed_run(tmp_path / "run")
    shutil.rmtree(checkpoints / "step_000006")  # the user deleted a bad newest checkpoint by hand
    resumed = _model(seed=123)
    train(resumed, ToyLM(8), OPTIM, CKPT_LOOP, tmp_path / "run", resume=True)
    out = capsys.readouterr().out
    assert "names step_000006, which does not exist" in out and "at step 4 (the newest checkpoint that verifies)" in out
    _assert_same(straight, resumed)  # from step 4, not from 0


def test_resume_skips_a_truncated_checkpoint_and_says_so(tmp_path: Path, straight, capsys) -> None:
    checkpoints = _crashed_run(tmp_path / "run")
    weights = checkpoints / "step_000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert latest_checkpoint(checkpoints).name == "step_000004"
    resumed = _model(seed=123)
    train(resumed, ToyLM(8), OPTIM, CKPT_LOOP, tmp_path / "run", resume=True)
    assert "skipped step_000006: model.safetensors has 1000 bytes" in capsys.readouterr().out
    _assert_same(straight, resumed)


def test_resume_refuses_when_nothing_can_be_continued(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint to continue from .*no such folder.*Check --run-dir"):
        train(_model(), ToyLM(8), OPTIM, CKPT_LOOP, tmp_path / "mistyped", resume=True)
    assert not (tmp_path / "mistyped" / "metrics.jsonl").exists()  # refused before writing anything
    checkpoints = _crashed_run(tmp_path / "run", after=2)
    state = checkpoints / "step_000002" / "state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 3'))  # changed after its commit
    with pytest.raises(CheckpointError, match="step_000002: state.json does not match its checksum"):
        train(_model(), ToyLM(8), OPTIM, CKPT_LOOP, tmp_path / "run", resume=True)


def test_a_run_that_starts_over_moves_the_earlier_one_aside(tmp_path: Path, capsys) -> None:
    checkpoints = _crashed_run(tmp_path / "run")
    before = {p.relative_to(tmp_path / "run"): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    train(_model(), ToyLM(8), OPTIM, dataclasses.replace(CKPT_LOOP, max_steps=2), tmp_path / "run")
    assert "starting over: moved the earlier run's files to" in capsys.readouterr().out
    for name, data in before.items():  # every byte of the earlier run is still there
        assert (tmp_path / "run" / "earlier-1" / name).read_bytes() == data
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_000002"]  # the new run's only
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the new run's rows only


def test_metrics_have_no_duplicate_rows_after_resume(tmp_path: Path) -> None:
    _crashed_run(tmp_path / "run", after=5)  # the row of step 5 was logged after the step-4 checkpoint
    train(_model(), ToyLM(8), OPTIM, CKPT_LOOP, tmp_path / "run", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == list(range(1, 9))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 8]


def test_spike_guard_known_answer() -> None:
    guard = SpikeGuard(factor=10)
    assert guard.check(1e9, 1e9) is None  # unarmed before the first accepted step
    for loss in (3.0, 3.1, 2.9):
        guard.accept(loss, grad_norm=1.0)
    assert guard.check(5.9, 1.0) is None  # the module docstring's example: the bar is 3.0 + 10 * 0.3
    assert "deviations above" in guard.check(6.1, 1.0)
    assert "grad_norm 10.5 is more than 10x" in guard.check(3.0, 10.5)
    assert SpikeGuard(factor=0).check(1e9, 1e9) is None  # off


def test_a_blown_up_but_finite_step_is_never_checkpointed(tmp_path: Path) -> None:
    loop = dataclasses.replace(CKPT_LOOP, checkpoint_every=1)
    model = _model()
    with pytest.raises(TrainingDiverged, match=r"loss spike.*moved to .*rejected"):
        train(model, ToyLM(8), OptimConfig(lr=1e3, warmup_steps=2), loop, tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # finite, yet blown up:
    assert max(p.abs().max().item() for p in model.parameters()) > 10
    assert latest_checkpoint(tmp_path / "checkpoints") is None and not (tmp_path / "final").exists()
    for path in (tmp_path / "checkpoints").glob("step_*"):  # whatever is left to resume from is sound
        assert max(t.abs().max().item() for t in read_tensors(path / "model.safetensors").values()) < 10


def test_spike_stop_ends_the_run_at_the_first_spike(tmp_path: Path) -> None:
    loop = dataclasses.replace(CKPT_LOOP, spike_action="stop", max_bad_steps=5)
    with pytest.raises(TrainingDiverged, match="1 bad step"):
        train(_model(), ToyLM(8), OptimConfig(lr=1e3, warmup_steps=2), loop, tmp_path)
