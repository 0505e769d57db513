"""Distillation: the loss on hand-computed values and its T² gradient scale; the stage on a tiny teacher/student run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from scratchllm.config import ConfigError, DistillConfig, LoopConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.checkpoint import load_model
from scratchllm.train.losses import distillation_loss
from scratchllm.train.stages import distill, pretrain
from tests.train.stages.conftest import first_and_last_eval
from tests.train.stages.conftest import tiny_world as tiny_world  # noqa: F401  (fixture reused, not redefined)

FAST = ["--loop.eval_every=0", "--loop.checkpoint_every=0", "--loop.device=cpu", "--loop.max_time_s=0",
        "--loop.seq_len=64", "--loop.batch_size=8", "--loop.eval_batches=4"]


def test_distill_loss_hand_computed_with_mask() -> None:
    # V = 2, T = 1, α = 0.25; two positions, the second masked out (its huge logits must not count).
    # position 0: student [ln 3, 0] -> p_s = [¾, ¼]; teacher [0, 0] -> p_t = [½, ½]; target 1 -> CE = ln 4.
    # KL(p_t‖p_s) = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3).
    student = torch.tensor([[[math.log(3), 0.0], [50.0, -50.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-50.0, 50.0]]])
    mask = torch.tensor([[True, False]])
    loss, stats = distillation_loss(student, teacher, torch.tensor([[1, 0]]), mask, alpha=0.25, temperature=1.0)
    kl = 0.5 * math.log(4 / 3)
    assert math.isclose(stats["ce"], math.log(4), rel_tol=1e-6)
    assert math.isclose(stats["kl_teacher"], kl, rel_tol=1e-6)
    assert math.isclose(float(loss), 0.25 * math.log(4) + 0.75 * kl, rel_tol=1e-6)


def test_distill_loss_is_zero_when_student_equals_teacher_and_alpha_zero() -> None:
    logits = torch.randn(2, 4, 7) * 3
    loss, stats = distillation_loss(logits, logits.clone(), torch.randint(0, 7, (2, 4)), None, alpha=0.0, temperature=3.0)
    assert abs(float(loss)) < 1e-6 and abs(stats["kl_teacher"]) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_distill_loss_gradient_is_t_times_soft_target_gap(temperature: float) -> None:
    # Hinton et al. 2015 eq. 2: ∂KL_T/∂z = (q - p)/T; the T² factor makes it T·(q - p), averaged over tokens.
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6)
    loss, _ = distillation_loss(student[None], teacher[None], torch.zeros(1, 3, dtype=torch.long), None, 0.0, temperature)
    loss.backward()
    q, p = torch.softmax(student.detach() / temperature, -1), torch.softmax(teacher / temperature, -1)
    assert torch.allclose(student.grad, temperature * (q - p) / 3, atol=1e-6)


def test_t_squared_keeps_the_soft_gradient_scale_independent_of_temperature() -> None:
    # High-T limit (§2.1): T·(q - p) -> (z - v)/V for zero-mean logits, whatever T is; without T² it would shrink as 1/T².
    student = torch.randn(1, 1, 8)
    student = (student - student.mean()).requires_grad_(True)
    teacher = torch.randn(1, 1, 8)
    teacher = teacher - teacher.mean()
    grads = []
    for temperature in (20.0, 40.0):
        student.grad = None
        distillation_loss(student, teacher, torch.zeros(1, 1, dtype=torch.long), None, 0.0, temperature)[0].backward()
        grads.append(student.grad.clone())
    limit = (student.detach() - teacher) / 8
    for grad in grads:
        assert torch.allclose(grad, limit, atol=0.05 * limit.abs().max())


@pytest.fixture(scope="module")
def teacher_dir(tiny_world, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny base model pretrained briefly on the tiny text slice: a teacher that knows more than a fresh student."""
    data, base = tiny_world
    root = tmp_path_factory.mktemp("teacher")
    pretrain.run(root, base, tokenizer=base / "tokenizer.json", data_dir=data.parent / "pretrain",
                 overrides=FAST + ["--loop.max_steps=60", "--optim.lr=3e-3", "--optim.warmup_steps=5"])
    return root / "pretrain" / "final"


def test_distill_stage_lowers_held_out_bpb_and_trains_the_student(tiny_world, teacher_dir, tmp_path) -> None:  # noqa: F811
    data, _ = tiny_world
    distill.run(tmp_path, teacher_dir, student_preset="tiny", data_dir=data.parent / "pretrain",
                overrides=FAST + ["--loop.max_steps=30", "--optim.lr=3e-3", "--optim.warmup_steps=5",
                                  "--distill.alpha=0.5", "--distill.temperature=2.0"])
    before, after = first_and_last_eval(tmp_path / "distill")
    assert after["val_bpb"] < before["val_bpb"] - 0.5, (before["val_bpb"], after["val_bpb"])
    assert after["teacher_val_bpb"] < before["val_bpb"]  # the teacher was worth learning from
    student, _, _ = load_model(tmp_path / "distill" / "final")
    teacher, _, _ = load_model(teacher_dir)
    assert student.config.d_model == 32 and teacher.config.d_model == 64  # the student has its own, smaller shape
    rows = (tmp_path / "distill" / "metrics.jsonl").read_text()
    assert '"kl_teacher"' in rows  # the soft term was trained on


def test_distill_refuses_a_different_tokenizer(tiny_world, teacher_dir, tmp_path) -> None:  # noqa: F811
    other = Tokenizer.train(["a different corpus, a different vocabulary " * 20], vocab_size=256 + 20 + 4, progress=False)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="differs from the teacher's tokenizer"):
        distill.run(tmp_path, teacher_dir, student_preset="tiny", tokenizer=tmp_path / "other.json",
                    data_dir=tiny_world[0].parent / "pretrain", overrides=FAST)
    with pytest.raises(ConfigError, match="vocab_size"):
        distill.run(tmp_path, teacher_dir, student_preset="tiny", data_dir=tiny_world[0].parent / "pretrain",
                    overrides=FAST + ["--model.vocab_size=999"])


def test_distill_alpha_one_never_runs_the_teacher(tiny_world, teacher_dir) -> None:  # noqa: F811
    teacher, tok, _ = load_model(teacher_dir)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, tok.vocab_size, (2000,)).numpy()
    stage = distill.DistillStage(teacher, tokens, tokens, tok, LoopConfig(seq_len=16, batch_size=2), DistillConfig(alpha=1.0))
    student = GPT(model_preset("tiny", vocab_size=tok.vocab_size))
    loss, stats = stage.loss(student, next(stage.batches("train")))
    assert calls == [] and stats == {} and torch.isfinite(loss)
