"""Every knob as a typed dataclass, named presets, and `--section.key=value` overrides.

One dataclass per concern; a preset is a plain Python value. The resolved config is saved as JSON
beside every artefact (`to_dict` / `from_dict`), so loading a checkpoint needs nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from scratchllm.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-supplied configuration value is wrong; the message names the flag and the fix."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows: `lo` and `hi` (None = unbounded), inclusive unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


AT_LEAST_1, AT_LEAST_0 = Range(1), Range(0)  # counts: "0 = off" fields take AT_LEAST_0
POSITIVE = Range(0, lo_open=True)  # rates, scales, temperatures: 0 would divide by zero or silently do nothing
FRACTION, UNIT_OPEN = Range(0, 1), Range(0, 1, hi_open=True)  # probabilities / ratios; decays and betas below 1


MAX_INT = 2**31 - 1  # no count, size or seed here needs more; a larger one is a typo that would overflow later


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(cfg: Any) -> None:
    """Validate every field of a config dataclass against its declared type (`Literal` choices included) and
    the class's `RANGES`, so a value built in Python or read from JSON is held to what a flag is held to.

    Called first in each `__post_init__`: the cross-field rules after it can then rely on sane values (no
    division by a zero `n_heads`). Errors name the flag, the value and what is allowed."""
    section = cfg.SECTION
    for f in fields(cfg):
        value, annotation, flag = getattr(cfg, f.name), _hints(type(cfg))[f.name], f"--{section}.{f.name}"
        if typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            if value not in choices:
                raise ConfigError(f"{flag}={value!r}: allowed values are {', '.join(map(str, choices))}")
            continue
        kind = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(annotation)
        if kind is None:  # a type without a generic check (none yet): its __post_init__ checks it
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and annotation is not bool):
            raise ConfigError(f"{flag}={value!r}: expected a value of type {annotation.__name__}")
        if annotation is float and not math.isfinite(value):
            raise ConfigError(f"{flag}={value!r}: must be a finite number")
        if annotation is int and abs(value) > MAX_INT:
            raise ConfigError(f"{flag}={value!r} is out of range: allowed at most {MAX_INT}")
        allowed = cfg.RANGES.get(f.name)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{flag}={value!r} is out of range: allowed {allowed}")


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # set from the tokenizer at build time; must cover every special token
    d_model: int = 256  # residual width
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4  # < n_heads = GQA, 1 = MQA, == n_heads = MHA
    d_ff: int = 0  # SwiGLU hidden width; 0 = auto: 8/3 * d_model rounded up to a multiple of 64 (Llama)
    max_seq_len: int = 512  # RoPE table and KV-cache length
    rope_theta: float = 10000.0  # RoPE base (Su et al. 2021, arXiv:2104.09864)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # small models spend a large share of parameters on embeddings
    dropout: float = 0.0  # tiny data is seen ~once per run: regularisation rarely pays
    sliding_window: int = 0  # 0 = full causal attention; else attend to the last `sliding_window` tokens
    n_experts: int = 0  # 0 = dense SwiGLU MLP; > 0 = Mixture-of-Experts MLP
    n_experts_active: int = 2  # top-k experts per token when n_experts > 0
    n_shared_experts: int = 0  # always-on experts every token also passes through (DeepSeekMoE, arXiv:2401.06066)
    d_ff_expert: int = 0  # hidden width of each expert; 0 = the dense d_ff, so top-1 costs what the dense MLP costs
    moe_aux_loss_coef: float = 0.01  # Switch Transformer's alpha (arXiv:2101.03961 §2.2): balances, barely hurts quality
    moe_z_loss_coef: float = 0.001  # ST-MoE's c_z (arXiv:2202.08906 eq. 6): keeps router logits small and stable
    init_std: float = 0.02  # GPT-2 init; residual projections get init_std / sqrt(2 * n_layers)

    SECTION: ClassVar[str] = "model"
    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                         "n_experts_active"], AT_LEAST_1),
        **dict.fromkeys(["d_ff", "sliding_window", "n_experts", "n_shared_experts", "d_ff_expert",
                         "moe_aux_loss_coef", "moe_z_loss_coef"], AT_LEAST_0),
        "rope_theta": POSITIVE, "norm_eps": POSITIVE, "init_std": POSITIVE, "dropout": UNIT_OPEN,
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"--model.d_model={self.d_model} must be divisible by --model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"--model.n_heads={self.n_heads} must be divisible by --model.n_kv_heads={self.n_kv_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("head dim (--model.d_model / --model.n_heads) must be even for RoPE")
        if self.n_experts and not 1 <= self.n_experts_active <= self.n_experts:
            raise ConfigError("--model.n_experts_active must be in [1, --model.n_experts]")
        if self.n_shared_experts and not self.n_experts:
            raise ConfigError("--model.n_shared_experts needs --model.n_experts > 0 (without routed experts, "
                              "raise --model.d_ff for a wider dense MLP instead)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        """SwiGLU hidden width: `d_ff`, or 8/3 * d_model rounded up to a multiple of 64 when d_ff == 0."""
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def resolved_d_ff_expert(self) -> int:
        """Hidden width of one Mixture-of-Experts expert: `d_ff_expert`, or the dense width when 0."""
        return self.d_ff_expert or self.resolved_d_ff


# Model presets: `mini` is the CPU default (~6.4M parameters with TokenizerConfig's vocab), `small` ~25-30M,
# `gpt2` ~124M (GPT-2 small shape, for a GPU), `tiny` is for tests only.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # Wide and shallow: on a small CPU budget as many steps per second as a deeper model of the same size, with more
    # useful work per step (scripts/sweep_pretrain.py; the measurement is in docs/benchmarks.md).
    "mini": dict(d_model=384, n_layers=3, n_heads=12, n_kv_heads=6, max_seq_len=512),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024),
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, tie_embeddings=True),
    "medium": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=1024),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


@dataclass
class TokenizerConfig:
    """Defaults of `scratchllm tokenizer`, the pipeline's tokenizer stage and pretrain's own tokenizer."""

    vocab_size: int = 4096  # 256 bytes + merges + specials; more compresses better but widens embedding and softmax
    bytes_per_file: int = 600_000  # train on a prefix of each file (0 = whole files): merges stabilise long before 10 MB

    SECTION: ClassVar[str] = "tokenizer"
    # 256 byte tokens + the 4 special tokens (tokenizer/bpe.py DEFAULT_SPECIAL_TOKENS) is the smallest vocabulary
    RANGES: ClassVar[dict[str, Range]] = {"vocab_size": Range(260), "bytes_per_file": AT_LEAST_0}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DataConfig:
    """How pretraining text becomes token shards (data/shards.py)."""

    # 0 = one shard per split, built in memory (the bundled corpus); N > 0 = stream the text files into shards
    # of at most N tokens each, read back lazily, for corpora larger than memory (docs/scaling.md)
    shard_tokens: int = 0
    # Chat-format data mixed into pretraining from the first step: comma-separated JSONL files of verifiable tasks
    # (rendered with their canonical reply) or conversations; "" = plain text only. A small model that first meets
    # the task questions in SFT has too few steps left to learn to read them (docs/results.md).
    chat_data: str = ""
    chat_rows: int = 12  # rows of every batch (of 16 by default) drawn from chat_data, the rest text, when it is set
    # "all": the chat rows are language modelled like text; "replies": only the assistant replies are (SFT's loss),
    # so a task row's gradient is its answer's, not mostly the unpredictable operands of its question.
    chat_loss: Literal["all", "replies"] = "replies"
    eval_tasks: str = ""  # JSONL of held-out tasks: pretraining's evaluation then also reports greedy task pass@1

    SECTION: ClassVar[str] = "data"
    RANGES: ClassVar[dict[str, Range]] = {"shard_tokens": AT_LEAST_0, "chat_rows": AT_LEAST_0}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # small models tolerate (and need) a high peak lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # applied to matrices only, never to norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    # > 0: Muon (train/optim.py) for the blocks' matrices at this peak lr (scheduled like lr); 0 = AdamW for all
    muon_lr: float = 0.0

    SECTION: ClassVar[str] = "optim"
    RANGES: ClassVar[dict[str, Range]] = {
        "lr": POSITIVE, "min_lr_ratio": FRACTION, "warmup_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
        "beta1": UNIT_OPEN, "beta2": UNIT_OPEN, "eps": POSITIVE, "grad_clip": AT_LEAST_0, "muon_lr": AT_LEAST_0,
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LoopConfig:
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1
    seq_len: int = 256
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 20
    checkpoint_every: int = 200  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # keep the last N checkpoints
    log_every: int = 10
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto = bf16 on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the model (falls back with a warning where unsupported)
    # Under torchrun: ddp keeps a full model per process; fsdp (FSDP2) shards parameters, gradients and Adam
    # state across processes, for models too big for one device (pretrain, sft, dpo and distill support it).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Processes per tensor-parallel group (1 = off): each block's matrices are split across them (Megatron
    # layout, train/tensor_parallel.py); the rest of the world size becomes data-parallel replicas (FSDP2).
    tensor_parallel: int = 1
    # Write checkpoints as per-process shards through torch.distributed.checkpoint, loadable by any number of
    # processes; off = one safetensors file gathered on rank 0 (every process's memory must hold the full model).
    sharded_checkpoint: bool = False
    # Recompute each block's activations in the backward pass instead of storing them: ~1/3 more compute for
    # activation memory of one block instead of all (Chen et al. 2016, arXiv:1604.06174).
    activation_checkpointing: bool = False
    max_time_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    # Loss-spike guard beside the non-finite one: a step whose loss is more than `spike_factor` running standard
    # deviations above its running mean, or whose gradient norm is more than `spike_factor` times its running mean
    # (both EMAs of accepted steps), is a spike. The largest seen in the default run's stages: 1.3 deviations and
    # 4.0 times (GRPO at lr 3e-4), so 10 leaves room. 0 = off.
    spike_factor: float = 10.0
    spike_action: Literal["skip", "stop"] = "skip"  # skip: drop the step (counts toward max_bad_steps); stop: end the run

    SECTION: ClassVar[str] = "loop"
    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(["max_steps", "batch_size", "grad_accum_steps", "seq_len", "eval_batches", "keep_checkpoints",
                         "log_every", "max_bad_steps", "tensor_parallel"], AT_LEAST_1),
        **dict.fromkeys(["eval_every", "checkpoint_every", "max_time_s", "spike_factor", "seed"], AT_LEAST_0),
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if 0 < self.spike_factor < 2:
            raise ConfigError(f"--loop.spike_factor={self.spike_factor}: allowed 0 (off) or >= 2; below 2 ordinary "
                              "steps would count as spikes")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--loop.device={self.device!r}: allowed values are auto, cpu, cuda, cuda:N, mps")


@dataclass
class LoRAConfig:
    r: int = 0  # 0 = LoRA off; > 0 = train rank-r adapters only (Hu et al. 2021)
    alpha: float = 16.0  # update scaled by alpha / r
    dropout: float = 0.0
    target_modules: str = "q_proj,v_proj"  # comma-separated name patterns

    SECTION: ClassVar[str] = "lora"
    RANGES: ClassVar[dict[str, Range]] = {"r": AT_LEAST_0, "alpha": POSITIVE, "dropout": UNIT_OPEN}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.r and not self.target_modules.strip(","):
            raise ConfigError("--lora.target_modules is empty: name the layers to adapt, e.g. q_proj,v_proj")


@dataclass
class SFTConfig:
    max_len: int = 256  # conversations longer than this are truncated (loss mask follows)
    eval_prompts: int = 100  # held-out conversations for the end-of-reply rate
    eval_tasks: int = 480  # held-out verifiable tasks for pass@1 (the whole tasks_val split)
    # Replay of pretraining text: without it SFT on short chats erases language modelling (val bpb rose
    # 2.98 -> 4.82 in one default run). Each step adds this many windows of plain text (0 = off).
    pretrain_rows: int = 4
    pretrain_seq_len: int = 128
    pretrain_weight: float = 1.0  # weight of their loss beside the assistant-token loss
    pretrain_data: str = "corpus/pretrain"  # holds train/ and val/ *.txt
    # "chat": sft_train.jsonl (conversations, half of them tasks). "tasks": every tasks_train.jsonl question with
    # its canonical reply, a drill for the verifiable tasks (docs/grpo.md: how long until the model reads them).
    train_data: Literal["chat", "tasks"] = "chat"

    SECTION: ClassVar[str] = "sft"
    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(["max_len", "eval_prompts", "eval_tasks", "pretrain_seq_len"], AT_LEAST_1),
        "pretrain_rows": AT_LEAST_0, "pretrain_weight": AT_LEAST_0,
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RewardConfig:
    margin: float = 0.0  # optional Bradley-Terry margin

    SECTION: ClassVar[str] = "reward"
    RANGES: ClassVar[dict[str, Range]] = {"margin": AT_LEAST_0}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint (Rafailov et al. 2023)
    # Weight of an SFT term, the mean per-token NLL of the chosen reply, beside the DPO loss (RPO: Pang et al.
    # 2024, arXiv:2404.19733); DPO alone may lower the chosen reply's likelihood as long as the rejected one
    # falls faster, and the replies it samples then get worse (docs/dpo.md). 0 = plain DPO.
    sft_weight: float = 1.0
    eval_pairs: int = 350  # held-out preference pairs (the whole prefs_val split)
    eval_prompts: int = 100  # held-out conversations for the end-of-reply rate
    eval_tasks: int = 480  # held-out verifiable tasks for pass@1

    SECTION: ClassVar[str] = "dpo"
    RANGES: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "sft_weight": AT_LEAST_0,
                                          **dict.fromkeys(["eval_pairs", "eval_prompts", "eval_tasks"], AT_LEAST_1)}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PPOConfig:
    clip_eps: float = 0.2  # PPO-clip epsilon (Schulman et al. 2017)
    value_clip_eps: float = 0.2
    gamma: float = 1.0  # no discounting inside one short reply
    gae_lambda: float = 0.95
    # beta of the per-token KL penalty to the reference. 0.05 let PPO trade the reward model's blind spot (it cannot
    # check arithmetic) for reward: learned reward 6.9 -> 8.2, gold 0.880 -> 0.868, task pass@1 0.135 -> 0.044,
    # KL 0.76; 0.2 gave 6.9 -> 8.0 with gold 0.880 -> 0.879 and KL 0.36 (75 steps, one default run's models).
    kl_coef: float = 0.2
    # Adaptive KL controller (Ziegler et al. 2019, arXiv:1909.08593 sec. 2.2): with kl_target > 0 (nats per reply),
    # beta follows beta *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / kl_horizon after each rollout of n
    # replies, starting from kl_coef. 0 = a fixed beta (the default).
    kl_target: float = 0.0
    kl_horizon: int = 10_000
    # Weight of a verifiable task's 0/1 verifier beside the reward-model score (a rule-based reward, Mu et al. 2024);
    # 0 = the learned reward alone. Off by default: 1.0 moved the gold score by < 0.01 in one 90-step test.
    verifier_weight: float = 0.0
    ppo_epochs: int = 2
    rollout_batch: int = 32
    max_new_tokens: int = 48
    temperature: float = 1.0
    value_coef: float = 0.5
    max_kl: float = 10.0  # guard: stop with a message when mean KL (nats per reply) passes this
    # Held-out preference prompts scored by the reward model and the gold judge: all 350 of prefs_val, because
    # PPO's changes are small and fewer prompts would leave them inside the noise between seeds.
    eval_prompts: int = 350
    # Also sample this many replies per held-out prompt at `temperature` (the distribution PPO optimises) and
    # report their learned reward and gold score; 0 = greedy replies only. The pipeline's report scores every
    # checkpoint so, with the same draws for each.
    eval_samples: int = 3
    # Which training preference prompts PPO samples: "all", or "chat" (those without a verifiable task). The reward
    # model cannot check answers, so on task prompts it rewards the answer format, and PPO then says "The answer
    # is 1." to chat prompts too.
    train_prompts: Literal["all", "chat"] = "chat"
    # PPO-ptx (InstructGPT, Ouyang et al. 2022 eq. 2): every step also fits `ptx_batch` SFT conversations, weighted
    # by ptx_coef (InstructGPT mixed in pretraining text; here the SFT data, what the policy should not forget).
    # Without it the gold judge's score fell while the learned reward rose; much more and the learned reward stops
    # rising (docs/ppo.md).
    ptx_coef: float = 1.5
    ptx_batch: int = 8
    # Targets of the PPO-ptx term on task questions: "data" (the SFT set's right answers), "sampled" (replies the SFT
    # model samples at temperature 1, drawn afresh for each ptx batch) or "reference" (its greedy replies). With a
    # model that reads the questions, sampled targets are mostly wrong answers and teach it to guess; the data's
    # right answers keep what SFT taught (docs/results.md).
    ptx_targets: Literal["data", "reference", "sampled"] = "data"

    SECTION: ClassVar[str] = "ppo"
    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(["clip_eps", "value_clip_eps", "temperature", "max_kl"], POSITIVE),
        "gamma": FRACTION, "gae_lambda": FRACTION,
        **dict.fromkeys(["kl_coef", "kl_target", "verifier_weight", "value_coef", "eval_samples", "ptx_coef",
                         "ptx_batch"], AT_LEAST_0),
        # ppo_epochs 0 would draw rollouts forever without one update
        **dict.fromkeys(["kl_horizon", "ppo_epochs", "rollout_batch", "max_new_tokens", "eval_prompts"], AT_LEAST_1),
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ptx_coef and not self.ptx_batch:
            raise ConfigError(f"--ppo.ptx_batch={self.ptx_batch} with --ppo.ptx_coef={self.ptx_coef}: the SFT term "
                              "needs ptx_batch >= 1 conversations (or set ptx_coef=0)")


@dataclass
class GRPOConfig:
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 6  # groups with signal per update (dynamic sampling below); 6 cost 3/4 of 8 (docs/results.md)
    clip_eps: float = 0.2
    # β of the k3 KL to the reference. 0 (DAPO, Dr. GRPO; TRL's default) skips the reference forward pass; 0.02 did
    # not hold the chat replies in the default run, GRPO-ptx below does (docs/results.md)
    kl_coef: float = 0.0
    max_new_tokens: int = 24  # canonical replies are ~8-15 tokens
    # 1.0 samples the policy's own distribution; a sharper 0.7 rewarded the guesses the greedy answer already makes
    # and lost more held-out tasks than it won (docs/results.md)
    temperature: float = 1.0
    # The verifiers GRPO rewards, as weights of the composite (rewards.composite_reward): correctness (each task's
    # own verifier, math or exact) and the format check. Group standardisation blows any within-group difference
    # up to unit size, so even format 0.1 makes GRPO chase format instead of answers: format off by default.
    correct_weight: float = 1.0
    format_weight: float = 0.0
    epochs: int = 1  # policy updates per rollout batch
    # How token terms are averaged in the loss (losses.grpo_loss): "reply" (the paper), "token" (DAPO),
    # "constant" (Dr. GRPO). "reply" pushes short right replies harder and truncates multi-digit answers.
    loss_norm: Literal["reply", "token", "constant"] = "reply"
    scale_advantages: bool = True  # divide by the group's std (the paper); False = Dr. GRPO's r - mean(r)
    max_draws: int = 4  # dynamic sampling (DAPO): redraw until prompts_per_step groups have signal, at most this often
    eval_tasks: int = 480  # held-out verifiable tasks for pass@1 (the whole tasks_val split)
    # Sampled pass@1 (k replies per task at `temperature`) on the first `sampled_eval_tasks` of those; 0 = off.
    # Greedy pass@1 hides probability moving toward the right answer until it is the top one.
    eval_samples: int = 4
    sampled_eval_tasks: int = 240  # 240 x 4 replies: 10 tasks per family and language
    curriculum: bool = False  # True = draw families by learnability p(1-p) (FamilyCurriculum); False = uniform tasks
    curriculum_decay: float = 0.8  # EMA weight on a family's past success rate
    curriculum_floor: float = 0.02  # added to every family's weight, so none is starved for good
    # GRPO-ptx, as PPO-ptx (InstructGPT eq. 2): + ptx_coef x the SFT loss on `ptx_batch` chat conversations (none
    # with a task question) every step. GRPO samples task prompts only, so nothing else holds the chat replies:
    # without it the default run's chat gold score fell beyond noise (with β = 0.02 as well), with it it rose for
    # two seeds (docs/results.md, docs/experiments/grpo.md). 0 = off.
    ptx_coef: float = 1.5
    ptx_batch: int = 8

    SECTION: ClassVar[str] = "grpo"
    RANGES: ClassVar[dict[str, Range]] = {
        "group_size": Range(2),  # advantages compare the replies of one group
        # epochs 0 would draw rollouts forever without one update
        **dict.fromkeys(["prompts_per_step", "max_new_tokens", "epochs", "max_draws", "eval_tasks"], AT_LEAST_1),
        **dict.fromkeys(["clip_eps", "temperature", "curriculum_floor"], POSITIVE),
        **dict.fromkeys(["kl_coef", "correct_weight", "format_weight", "eval_samples", "sampled_eval_tasks",
                         "ptx_coef", "ptx_batch"], AT_LEAST_0),
        "curriculum_decay": UNIT_OPEN,
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ptx_coef and not self.ptx_batch:
            raise ConfigError(f"--grpo.ptx_batch={self.ptx_batch} with --grpo.ptx_coef={self.ptx_coef}: the SFT term "
                              "needs ptx_batch >= 1 conversations (or set ptx_coef=0)")
        if self.correct_weight + self.format_weight == 0:
            raise ConfigError(f"--grpo.correct_weight={self.correct_weight} with --grpo.format_weight="
                              f"{self.format_weight}: one of them must be > 0 (a reward of 0 teaches nothing)")


@dataclass
class DistillConfig:
    alpha: float = 0.5  # weight of the hard-label CE; 1 - alpha goes to the KL to the teacher
    temperature: float = 2.0

    SECTION: ClassVar[str] = "distill"
    RANGES: ClassVar[dict[str, Range]] = {"alpha": FRACTION, "temperature": POSITIVE}

    def __post_init__(self) -> None:
        check_fields(self)


C = TypeVar("C")


def _coerce(value: str, annotation: Any, flag: str) -> Any:
    """Turn the text of `--flag=value` into the field's declared type."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, str)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0]
    try:
        if annotation is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            if "e" not in value.lower():
                return int(value)
            number = float(value)  # 1e5 is an integer; 2.5e0 is not and must not be truncated silently
            if not number.is_integer():
                raise ValueError(value)
            if abs(number) > MAX_INT:  # named as typed, not as its 31 digits
                raise ConfigError(f"--{flag}={value!r} is out of range: allowed at most {MAX_INT}")
            return int(number)
        if annotation is float:
            return float(value)
        return str(value)
    except (ValueError, OverflowError):  # int("1e400") overflows
        raise ConfigError(f"--{flag}={value!r}: expected a value of type {getattr(annotation, '__name__', annotation)}") from None


def apply_overrides(sections: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (leading dashes optional) to a dict of dataclass sections.

    Returns new dataclass instances, so `__post_init__` validation runs on the final values.
    Unknown sections or keys raise ConfigError listing the valid ones.
    """
    pending: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for raw in overrides:
        text = raw.lstrip("-")
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(f"override {raw!r} must look like --section.key=value, e.g. --model.n_layers=4")
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r} in {raw!r}; valid sections: {sorted(sections)}")
        cfg = sections[section]
        hints = typing.get_type_hints(type(cfg))
        valid = [f.name for f in fields(cfg)]
        if key not in valid:
            raise ConfigError(f"unknown key {section}.{key}; valid keys of {section}: {', '.join(valid)}")
        pending[section][key] = _coerce(value, hints[key], dotted)
    out = {}
    for name, cfg in sections.items():
        out[name] = dataclasses.replace(cfg, **pending[name]) if pending[name] else cfg
    return out


def to_dict(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: asdict(cfg) for name, cfg in sections.items()}


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a dataclass from JSON, ignoring keys a newer/older version added (logged by callers)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def save_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "MODEL_PRESETS",
    "model_preset",
    "TokenizerConfig",
    "OptimConfig",
    "LoopConfig",
    "LoRAConfig",
    "SFTConfig",
    "RewardConfig",
    "DPOConfig",
    "PPOConfig",
    "GRPOConfig",
    "DistillConfig",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "save_json",
]
