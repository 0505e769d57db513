"""Distillation as a stage: a tiny teacher/student run lowers held-out bpb; tokenizer and alpha=1 checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scratchllm.config import ConfigError, DistillConfig, LoopConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.io import load_model
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.stages import distill, pretrain
from tests.conftest import FAST
from tests.train.stages.conftest import first_and_last_eval

SMALL = FAST + ["--loop.seq_len=64", "--loop.batch_size=8", "--loop.eval_batches=4"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_world, tmp_path_factory) -> Path:
    """The tiny base model pretrained briefly on the tiny text slice: a teacher that knows more than a fresh student."""
    data, base = tiny_world
    root = tmp_path_factory.mktemp("teacher")
    pretrain.run(root, base, tokenizer=base / "tokenizer.json", data_dir=data.parent / "pretrain",
                 overrides=SMALL + ["--loop.max_steps=60", "--optim.lr=3e-3", "--optim.warmup_steps=5"])
    return root / "pretrain" / "final"


def test_distill_stage_lowers_held_out_bpb_and_trains_the_student(tiny_world, teacher_dir, tmp_path) -> None:
    data, _ = tiny_world
    distill.run(tmp_path, teacher_dir, student_preset="tiny", data_dir=data.parent / "pretrain",
                overrides=SMALL + ["--loop.max_steps=30", "--optim.lr=3e-3", "--optim.warmup_steps=5",
                                  "--distill.alpha=0.5", "--distill.temperature=2.0"])
    before, after = first_and_last_eval(tmp_path / "distill")
    assert after["val_bpb"] < before["val_bpb"] - 0.5, (before["val_bpb"], after["val_bpb"])
    assert after["teacher_val_bpb"] < before["val_bpb"]  # the teacher was worth learning from
    student, _, _ = load_model(tmp_path / "distill" / "final")
    teacher, _, _ = load_model(teacher_dir)
    assert student.config.d_model == 32 and teacher.config.d_model == 64  # the student has its own, smaller shape
    rows = (tmp_path / "distill" / "metrics.jsonl").read_text()
    assert '"kl_teacher"' in rows  # the soft term was trained on


def test_distill_refuses_a_different_tokenizer(tiny_world, teacher_dir, tmp_path) -> None:
    other = Tokenizer.train(["a different corpus, a different vocabulary " * 20], vocab_size=256 + 20 + 4, progress=False)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="differs from the teacher's tokenizer"):
        distill.run(tmp_path, teacher_dir, student_preset="tiny", tokenizer=tmp_path / "other.json",
                    data_dir=tiny_world[0].parent / "pretrain", overrides=SMALL)
    with pytest.raises(ConfigError, match="vocab_size"):
        distill.run(tmp_path, teacher_dir, student_preset="tiny", data_dir=tiny_world[0].parent / "pretrain",
                    overrides=SMALL + ["--model.vocab_size=999"])


def test_distill_alpha_one_never_runs_the_teacher(tiny_world, teacher_dir) -> None:
    teacher, tok, _ = load_model(teacher_dir)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, tok.vocab_size, (2000,)).numpy()
    stage = distill.DistillStage(teacher, tokens, tokens, tok, LoopConfig(seq_len=16, batch_size=2), DistillConfig(alpha=1.0))
    student = GPT(model_preset("tiny", vocab_size=tok.vocab_size))
    loss, stats = stage.loss(student, next(stage.batches("train")))
    assert calls == [] and stats == {} and torch.isfinite(loss)
