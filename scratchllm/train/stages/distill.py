"""Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531): a student learns from a frozen teacher's soft targets.

Same data and headline metric as pretraining (random token windows; held-out bits-per-byte); only the loss differs:
α·CE(labels) + (1−α)·T²·KL(teacher_T ‖ student_T) over the full vocabulary (`losses.distillation_loss`).
Both models must share one tokenizer, since the KL compares distributions over the same token ids.
With --distill.alpha=1 the teacher is never run: that is the no-teacher baseline at equal steps.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import ConfigError, DistillConfig, LoopConfig, model_preset
from scratchllm.data.batches import sequential_windows
from scratchllm.eval.metrics import evaluate_lm
from scratchllm.model.gpt import GPT
from scratchllm.model.io import load_model
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.losses import cross_entropy_loss, distillation_loss
from scratchllm.train.stages.pretrain import DEFAULT_LOOP, DEFAULT_OPTIM, PretrainStage, shard_for
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

# T=1, not the T=2 of DistillConfig: at T=2 the student lost to plain CE in a 60-step sweep (docs/benchmarks.md).
DEFAULT_DISTILL = DistillConfig(alpha=0.5, temperature=1.0)


class DistillStage(PretrainStage):
    """PretrainStage's windows and evaluation with the teacher's soft targets added to the loss."""

    name = "distill"

    def __init__(self, teacher: nn.Module, train_tokens, val_tokens, tokenizer: Tokenizer, loop: LoopConfig,
                 cfg: DistillConfig) -> None:
        super().__init__(train_tokens, val_tokens, tokenizer, loop)
        self.teacher, self.cfg = teacher.eval().requires_grad_(False), cfg
        self.teacher_metrics: dict[str, float] | None = None

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, targets = batch["ids"], batch["targets"]
        if self.cfg.alpha == 1.0:  # plain CE: skip the teacher's forward, so the baseline costs what pretraining costs
            return cross_entropy_loss(model(ids), targets), {}
        self.teacher.to(ids.device)
        with torch.no_grad():
            teacher_logits = self.teacher(ids)
        return distillation_loss(model(ids), teacher_logits, targets, None, self.cfg.alpha, self.cfg.temperature)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = super().evaluate(model)
        if self.cfg.alpha == 1.0:
            return metrics
        if self.teacher_metrics is None:  # the teacher is frozen: score it once, as the bar the student aims at
            self.teacher.to(next(model.parameters()).device)
            batches = sequential_windows(self.val_tokens, self.loop.seq_len, self.loop.batch_size, self.loop.eval_batches)
            self.teacher_metrics = {f"teacher_{k}": v for k, v in evaluate_lm(self.teacher, batches, self.token_bytes).items()}
        return {**metrics, **self.teacher_metrics}


def check_same_tokenizer(teacher_tok: Tokenizer, student_tok: Tokenizer, teacher_dir: Path, student_path: Path) -> None:
    """Refuse a student tokenizer that differs from the teacher's: the KL would compare unrelated token ids."""
    if teacher_tok.fingerprint() != student_tok.fingerprint():
        raise ConfigError(
            f"--tokenizer {student_path} differs from the teacher's tokenizer {teacher_dir / 'tokenizer.json'} "
            f"(vocab {student_tok.vocab_size} vs {teacher_tok.vocab_size}, fingerprint {student_tok.fingerprint()} vs "
            f"{teacher_tok.fingerprint()}). Distillation matches distributions over the same token ids, so the student "
            "must use the teacher's tokenizer: drop --tokenizer (the teacher's is used) or distill from a teacher "
            "trained with this one."
        )


def run(
    run_root: Path,
    teacher: Path,
    student_preset: str = "mini",
    tokenizer: Path | None = None,
    data_dir: Path = Path("corpus/pretrain"),
    overrides: list[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a fresh student (--student-preset, --model.* overrides) from a frozen --teacher model directory."""
    started = time.perf_counter()
    teacher_model, tok, _ = load_model(teacher)
    if tokenizer is not None:
        check_same_tokenizer(tok, Tokenizer.load(tokenizer), Path(teacher), Path(tokenizer))
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM,
                             model=model_preset(student_preset, vocab_size=teacher_model.config.vocab_size),
                             distill=DEFAULT_DISTILL)
    return run_stage(run_root, "distill", defaults, overrides, resume,
                     partial(build, Path(run_root) / "distill", teacher_model, tok, Path(data_dir)), started=started)


def build(stage_dir: Path, teacher_model: GPT, tok: Tokenizer, data_dir: Path, sections: dict[str, Any],
          ) -> tuple[nn.Module, DistillStage, Tokenizer]:
    """(student, stage, tokenizer): a fresh student of the preset, the frozen teacher, token shards of the text."""
    vocab = teacher_model.config.vocab_size
    cfg, loop = sections["distill"], sections["loop"]
    if sections["model"].vocab_size != vocab:
        raise ConfigError(f"--model.vocab_size={sections['model'].vocab_size} must equal the teacher's vocab_size={vocab}: "
                          "the KL is taken over the full shared vocabulary")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"--distill.alpha={cfg.alpha} must be in [0, 1] (1 = labels only, 0 = teacher only)")
    if cfg.temperature <= 0:
        raise ConfigError(f"--distill.temperature={cfg.temperature} must be positive")
    for who, limit in (("student --model", sections["model"].max_seq_len), ("teacher", teacher_model.config.max_seq_len)):
        if loop.seq_len > limit:
            raise ConfigError(f"--loop.seq_len={loop.seq_len} exceeds the {who} max_seq_len={limit}")
    torch.manual_seed(loop.seed)  # the student's init depends on the seed alone, so runs with and without a teacher match
    student = GPT(sections["model"])
    cache = stage_dir / "shards"
    stage = DistillStage(teacher_model, shard_for(Path(data_dir) / "train", tok, cache),
                         shard_for(Path(data_dir) / "val", tok, cache), tok, loop, cfg)
    print(f"[distill] student {student.num_params() / 1e6:.2f}M parameters, teacher {teacher_model.num_params() / 1e6:.2f}M, "
          f"alpha={cfg.alpha} T={cfg.temperature}")
    return student, stage, tok


def _args(parser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model directory, e.g. runs/default/pretrain/final")
    parser.add_argument("--student-preset", default="mini", help="student shape; refine with --model.key=value")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="optional: checked equal to the teacher's tokenizer (which is always the one used)")


def main(argv: list[str]) -> int:
    return stage_main(argv, "distill", run, needs_init=False, extra_args=_args)
