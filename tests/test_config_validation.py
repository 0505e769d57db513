"""Every config field refuses bad values where it is declared, naming flag, value and range (issue #29).

The fuzz test feeds every field of every section the same bad values. Each must be refused within a second with
a ConfigError naming the flag, or be a value the field documents (0 = off, a legal float, any path text); the
accepted values of the training loop's own sections then run a toy training, which must finish or stop with a
UserError within seconds: none may hang, crash with another exception, or train on silently with nonsense.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
import typing
from pathlib import Path

import pytest
import torch

from scratchllm import config as C
from scratchllm.errors import UserError
from scratchllm.model.gpt import GPT
from scratchllm.train.loop import train
from tests.train.test_loop import VOCAB, ToyLM

SECTIONS = [C.ModelConfig, C.TokenizerConfig, C.DataConfig, C.OptimConfig, C.LoopConfig, C.LoRAConfig,
            C.SFTConfig, C.RewardConfig, C.DPOConfig, C.PPOConfig, C.GRPOConfig, C.DistillConfig]
BAD_VALUES = ["0", "-1", "-2.5", "2.5", "abc", "", "nan", "inf", "1e400", "1e30"]
# Fields where 0 is a documented setting (its meaning), not a mistake.
ZERO_MEANS = {
    "model.d_ff": "auto width", "model.sliding_window": "full attention", "model.n_experts": "dense MLP",
    "model.n_shared_experts": "none", "model.d_ff_expert": "the dense width", "model.moe_aux_loss_coef": "off",
    "model.moe_z_loss_coef": "off", "model.dropout": "off", "tokenizer.bytes_per_file": "whole files",
    "data.shard_tokens": "one shard per split", "data.chat_rows": "text only", "optim.min_lr_ratio": "decay to 0",
    "optim.warmup_steps": "no warmup", "optim.weight_decay": "off", "optim.beta1": "no momentum",
    "optim.beta2": "no second-moment memory", "optim.grad_clip": "off", "optim.muon_lr": "AdamW for all",
    "loop.eval_every": "only at the end", "loop.checkpoint_every": "only at the end", "loop.seed": "seed 0",
    "loop.max_time_s": "no limit", "loop.spike_factor": "guard off", "lora.r": "LoRA off", "lora.dropout": "off",
    "sft.pretrain_rows": "no replay", "sft.pretrain_weight": "off", "reward.margin": "none",
    "dpo.sft_weight": "plain DPO", "ppo.gamma": "no bootstrapping", "ppo.gae_lambda": "one-step TD",
    "ppo.kl_coef": "no KL penalty", "ppo.kl_target": "fixed beta", "ppo.verifier_weight": "off",
    "ppo.value_coef": "value loss off", "ppo.eval_samples": "greedy only", "ppo.ptx_coef": "off",
    "grpo.kl_coef": "no KL", "grpo.format_weight": "off", "grpo.eval_samples": "off",
    "grpo.sampled_eval_tasks": "off", "grpo.curriculum_decay": "no memory", "grpo.ptx_coef": "off",
    "distill.alpha": "teacher only",  # grpo.ptx_batch=0 is refused with the default ptx_coef, as ppo.ptx_batch
}
NEVER_ACCEPTED = {"-1", "-2.5", "nan", "inf", "1e400"}  # for any number field


def _fuzz() -> dict[str, list[str]]:
    """flag -> the bad values it accepted; asserts every refusal is a clear ConfigError within a second."""
    accepted: dict[str, list[str]] = {}
    for cls in SECTIONS:
        for field in dataclasses.fields(cls):
            flag = f"{cls.SECTION}.{field.name}"
            for value in BAD_VALUES:
                start = time.perf_counter()
                try:
                    C.apply_overrides({cls.SECTION: cls()}, [f"--{flag}={value}"])
                    accepted.setdefault(flag, []).append(value)
                except C.ConfigError as err:
                    assert f"--{flag}=" in str(err) and "\n" not in str(err), str(err)
                    assert value in str(err) or repr(float(value)) in str(err), str(err)
                assert time.perf_counter() - start < 1.0, flag
    return accepted


def _kind(flag: str) -> type:
    section, name = flag.split(".")
    cls = next(c for c in SECTIONS if c.SECTION == section)
    return typing.get_type_hints(cls)[name]


def test_fuzz_every_config_field_with_bad_values() -> None:
    accepted = _fuzz()
    for flag, values in accepted.items():
        kind = _kind(flag)
        if kind is str:  # free text (paths, module patterns): checked where it is read, naming the path
            continue
        assert not NEVER_ACCEPTED & set(values), (flag, values)
        if kind is bool:
            assert values == ["0"], (flag, values)  # 0 = false
            continue
        if "0" in values:
            assert flag in ZERO_MEANS, f"--{flag}=0 is accepted but means nothing documented"
        if kind is int:
            assert set(values) <= {"0"}, (flag, values)  # 2.5 is no count, 1e30 no size
    assert {flag for flag, values in accepted.items() if "0" in values and _kind(flag) in (int, float)} == set(ZERO_MEANS)


class Timeout(Exception):
    pass


def _toy_run(tmp_path: Path, overrides: list[str]) -> None:
    """2 steps of the training loop with these overrides, or a UserError; a hang is cut off after 30 s."""
    sections = {"model": C.model_preset("tiny", vocab_size=VOCAB),
                "loop": C.LoopConfig(max_steps=2, batch_size=2, seq_len=8, eval_every=0, checkpoint_every=0,
                                     log_every=1, device="cpu"),
                "optim": C.OptimConfig(lr=1e-2, warmup_steps=1)}
    sections = C.apply_overrides(sections, overrides)

    def hung(signum, frame):
        raise Timeout(f"{overrides} still running after 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        torch.manual_seed(0)
        model = GPT(sections["model"])
        metrics = train(model, ToyLM(2, seq_len=8), sections["optim"], sections["loop"], tmp_path / str(len(overrides)))
        assert math.isfinite(metrics["val_loss"]), overrides  # finished: and not with nonsense weights
    except UserError as err:  # a clear stop, e.g. TrainingDiverged for --optim.lr=1e30
        assert "\n" not in str(err).strip()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_accepted_extreme_values_of_the_loop_sections_train_or_stop_clearly(tmp_path: Path) -> None:
    """One toy run per section and value, with every field of the section that accepts the value set to it."""
    accepted = _fuzz()
    for section in ("loop", "optim", "model"):
        for value in BAD_VALUES:
            flags = [flag for flag, values in accepted.items() if flag.split(".")[0] == section and value in values
                     and _kind(flag) is not str and flag not in ("loop.compile", "loop.activation_checkpointing")]
            if flags:
                _toy_run(tmp_path / f"{section}{value}", [f"--{flag}={value}" for flag in flags])


@pytest.mark.parametrize("section, override, message", [
    (C.PPOConfig, "--ppo.ppo_epochs=0", "--ppo.ppo_epochs=0 is out of range: allowed >= 1"),  # drew rollouts forever
    (C.PPOConfig, "--ppo.ppo_epochs=-2", "--ppo.ppo_epochs=-2 is out of range: allowed >= 1"),
    (C.GRPOConfig, "--grpo.epochs=0", "--grpo.epochs=0 is out of range: allowed >= 1"),  # drew rollouts forever
    (C.GRPOConfig, "--grpo.max_new_tokens=0", "--grpo.max_new_tokens=0 is out of range: allowed >= 1"),
    (C.LoopConfig, "--loop.eval_batches=0", "--loop.eval_batches=0 is out of range: allowed >= 1"),  # val_loss 0.0
    (C.LoopConfig, "--loop.keep_checkpoints=0", "--loop.keep_checkpoints=0 is out of range: allowed >= 1"),  # kept all
    (C.LoopConfig, "--loop.log_every=0", "--loop.log_every=0 is out of range: allowed >= 1"),  # ZeroDivisionError
    (C.LoRAConfig, "--lora.r=-3", "--lora.r=-3 is out of range: allowed >= 0"),  # turned LoRA off
    (C.DistillConfig, "--distill.temperature=0", "--distill.temperature=0.0 is out of range: allowed > 0"),
    (C.DPOConfig, "--dpo.beta=-1", "--dpo.beta=-1.0 is out of range: allowed > 0"),
])
def test_measured_bad_settings_are_refused_naming_flag_value_and_range(section, override, message) -> None:
    with pytest.raises(C.ConfigError) as err:
        C.apply_overrides({section.SECTION: section()}, [override])
    assert str(err.value) == message


def test_literal_choices_and_wrong_types_are_named() -> None:
    with pytest.raises(C.ConfigError, match=r"--loop.dtype='fp16': allowed values are auto, float32, bfloat16"):
        C.apply_overrides({"loop": C.LoopConfig()}, ["--loop.dtype=fp16"])
    with pytest.raises(C.ConfigError, match=r"--loop.max_steps=2.5: expected a value of type int"):
        C.LoopConfig(max_steps=2.5)  # from Python or JSON as from a flag
    with pytest.raises(C.ConfigError, match=r"--loop.max_steps='2.5e0': expected a value of type int"):
        C.apply_overrides({"loop": C.LoopConfig()}, ["--loop.max_steps=2.5e0"])  # was truncated to 2
