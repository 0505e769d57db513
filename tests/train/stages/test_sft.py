"""Supervised fine-tuning moves its held-out loss and end-of-reply rate; replay limits forgetting."""

from __future__ import annotations

import pytest
import torch

from scratchllm.config import ConfigError, SFTConfig
from scratchllm.data.jsonl import read_tasks
from scratchllm.data.tasks import canonical_reply, task_conversation
from scratchllm.model.io import load_model
from scratchllm.train.stages import sft
from tests.conftest import FAST, SFT_ARGS
from tests.train.stages.conftest import first_and_last_eval


def test_sft_lowers_assistant_loss_and_learns_to_stop(sft_model, tiny_world) -> None:
    root, _ = sft_model
    before, after = first_and_last_eval(root / "sft")
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert after["end_rate"] > before["end_rate"] and after["end_rate"] >= 0.5
    base, _, _ = load_model(tiny_world[1])
    tuned, _, _ = load_model(root / "sft" / "final")
    assert not torch.equal(base.layers[0].mlp.up_proj.weight, tuned.layers[0].mlp.up_proj.weight)


def test_sft_replay_of_pretraining_text_limits_forgetting(sft_model, tiny_world, tmp_path) -> None:
    root, data = sft_model  # trained without replay
    sft.run(tmp_path, tiny_world[1], data, FAST + SFT_ARGS + [f"--sft.pretrain_data={data.parent / 'pretrain'}",
                                                               "--sft.pretrain_rows=4"])
    (first, with_replay), without = first_and_last_eval(tmp_path / "sft"), first_and_last_eval(root / "sft")[1]
    assert with_replay["val_bpb"] < without["val_bpb"] - 0.1, (with_replay["val_bpb"], without["val_bpb"])
    assert with_replay["val_loss"] < first["val_loss"] - 1.0  # the chat loss still falls


def test_sft_task_drill_trains_on_canonical_task_replies(tiny_world, tmp_path) -> None:
    data, base = tiny_world
    task = read_tasks(data / "tasks_train.jsonl")[0]
    conv = task_conversation(task)
    assert conv["messages"][:-1] == task["prompt"]
    assert conv["messages"][-1] == {"role": "assistant", "content": canonical_reply(task["answer"], task["lang"])}
    sft.run(tmp_path, base, data, FAST + SFT_ARGS[:3] + ["--loop.max_steps=30", "--sft.train_data=tasks",
                                                        "--sft.pretrain_rows=0", "--sft.eval_tasks=22"])
    before, after = first_and_last_eval(tmp_path / "sft")
    # sft_val is about half task conversations: their replies are learned, the chat half's are not trained here
    # (measured: 6.16 -> 5.16 nats with the balanced task set)
    assert after["val_loss"] < before["val_loss"] - 0.75
    with pytest.raises(ConfigError, match="train_data"):
        SFTConfig(train_data="tasks_train.jsonl")
