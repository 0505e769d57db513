"""CUDA out-of-memory back-off: the step is redone with half the micro-batch and twice the accumulation, so the
run finishes with the same batch per step, and the same weights, as a run that never ran out of memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from scratchllm.train.loop import train
from tests.train.test_loop import LOOP, OPTIM, ToyLM, _model


class FitsTwoRows(ToyLM):
    """A stand-in for a GPU whose memory holds at most two sequences per forward pass."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)
        self.rows_seen: list[int] = []

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if batch["ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        self.rows_seen.append(batch["ids"].shape[0])
        return super().loss(model, batch)


def test_out_of_memory_halves_the_micro_batch_until_it_fits_and_keeps_the_batch(tmp_path: Path, capsys) -> None:
    loop = dataclasses.replace(LOOP, max_steps=4, batch_size=8, log_every=1)
    reference = _model()
    train(reference, ToyLM(8), OPTIM, loop, tmp_path / "fits")
    model, stage = _model(), FitsTwoRows(8)
    train(model, stage, OPTIM, loop, tmp_path / "backoff")
    assert stage.rows_seen == [2] * 4 * 4  # 4 steps of 8 rows, as 4 micro-batches of 2
    assert stage.windows.position == 4  # one drawn batch per step, redrawn never
    for name, param in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], param, rtol=0, atol=1e-5, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "backoff" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch_size"] for r in rows if "micro_batch_size" in r] == [4, 2]
    assert "micro-batch 2 x 4 accumulation steps" in capsys.readouterr().out


def test_out_of_memory_with_one_row_left_is_raised(tmp_path: Path) -> None:
    class FitsNothing(ToyLM):
        def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    with pytest.raises(torch.OutOfMemoryError):
        train(_model(), FitsNothing(2), OPTIM, dataclasses.replace(LOOP, max_steps=2, batch_size=2), tmp_path)
