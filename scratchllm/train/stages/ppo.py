"""RLHF with PPO (Ouyang et al. 2022): the policy maximises the reward model's score minus a KL penalty to SFT.

Per-token reward r_t = -β·KL_k1(π‖π_ref) at every reply token, plus the reward-model score on the last one
(and optionally, on a verifiable task's prompt, `verifier_weight` x its verifier's 0/1: a rule-based reward
beside the learned one, Mu et al. 2024). Advantages by GAE (arXiv:1506.02438) from a value model initialised
from the reward model; PPO-clip (arXiv:1707.06347 eq. 7) with a clipped value loss; `ppo_epochs` updates per
rollout batch; PPO-ptx (InstructGPT eq. 2) adds `ptx_coef` x the SFT loss on SFT conversations every step.
Reward hacking check: held-out replies are also scored by the rule-based gold judge, which must not fall.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm import runtime
from scratchllm.config import LoopConfig, OptimConfig, PPOConfig, SFTConfig
from scratchllm.data.chat_batches import EpochStream, render_sft, sft_batch
from scratchllm.data.jsonl import read_conversations, read_preferences, read_tasks
from scratchllm.data.rewards import score_task
from scratchllm.errors import UserError
from scratchllm.eval.chat_eval import generate_replies
from scratchllm.eval.reply_scores import sampled_reply_scores, score_replies
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.model.heads import ScalarModel, load_scalar_model
from scratchllm.model.io import load_model
from scratchllm.model.logprobs import response_token_logprobs
from scratchllm.model.lora import maybe_inject_lora, save_final_model
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train import distributed as dist
from scratchllm.train.loop import Stage
from scratchllm.train.losses import (
    gae,
    kl_k1,
    masked_lm_loss,
    masked_mean,
    ppo_clip_loss,
    value_loss,
    whiten,
)
from scratchllm.train.rollout import Rollout, rollout_logprobs, rollout_seed, sample_rollouts
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

DEFAULT_LOOP = LoopConfig(max_steps=45, batch_size=1, eval_every=0, checkpoint_every=15, log_every=1)
DEFAULT_OPTIM = OptimConfig(lr=2e-4, warmup_steps=3, weight_decay=0.0, min_lr_ratio=1.0, grad_clip=1.0)


class PPODiverged(UserError, RuntimeError):
    """KL to the reference or the policy ratio exploded; the run stops instead of collapsing."""


class PolicyAndValue(nn.Module):
    """What the optimizer trains: the policy and its value model, side by side."""

    def __init__(self, policy: GPT, value: ScalarModel) -> None:
        super().__init__()
        self.policy, self.value = policy, value


def adaptive_kl_coef(beta: float, kl: float, target: float, n_replies: int, horizon: int) -> float:
    """Ziegler et al. 2019 (arXiv:1909.08593 sec. 2.2): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon).

    A proportional controller on the measured KL per reply: above the target β grows, below it shrinks, by at
    most 20% of n/horizon per rollout, so a noisy batch cannot swing it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_replies / horizon)


def reward_model_scores(reward_model: ScalarModel, rollout: Rollout, device: torch.device) -> Tensor:
    return reward_model(rollout.ids.to(device), rollout.lengths.to(device))


class PPOStage(Stage):
    name = "ppo"

    def __init__(self, tok: Tokenizer, model: PolicyAndValue, reference: GPT, reward_model: ScalarModel,
                 train_records: list, val_pairs: list, cfg: PPOConfig, seed: int) -> None:
        """`model`: what the loop trains (its policy samples the rollouts); `reference`, `reward_model`: frozen.
        `train_records`: {"prompt": messages, optionally "task": task record}, e.g. the preference pairs."""
        self.tok, self.model, self.cfg, self.seed = tok, model, cfg, seed
        self.reference = reference.eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.train_records, self.val_pairs = train_records, val_pairs
        self.position = 0
        self.kl_coef = cfg.kl_coef  # β; moved by adaptive_kl_coef when cfg.kl_target > 0
        self.ptx_stream: EpochStream | None = None
        self.ptx_max_len = 0
        self.reference_questions: set[str] = set()

    def add_ptx_data(self, conversations: list, max_len: int, reference_questions: set[str] | None = None) -> None:
        """SFT conversations for the PPO-ptx term (used when cfg.ptx_coef > 0). A conversation whose last question
        is in `reference_questions` is fitted to a reply of the reference model (greedy, or sampled when
        cfg.ptx_targets is "sampled"), generated when its batch is drawn (`reference_task_targets`), not to the
        reply written in the data."""
        trainable = [c for c in conversations if render_sft(self.tok, [c], max_len)]
        self.ptx_stream = EpochStream(trainable, self.cfg.ptx_batch, self.seed)
        self.ptx_max_len, self.reference_questions = max_len, reference_questions or set()

    def _ptx_batch(self, conversations: list) -> dict[str, Tensor]:
        if self.reference_questions:
            # Samples at temperature 1 are draws from π_ref itself: their CE is KL(π_ref ‖ π) in expectation, so
            # the guess keeps its distribution; greedy targets sharpen it.
            sampled = self.cfg.ptx_targets == "sampled"
            conversations = reference_task_targets(
                conversations, self.reference_questions, self.reference, self.tok,
                params=SamplingParams(temperature=1.0) if sampled else None,
                seed=rollout_seed(self.seed + 1, self.ptx_stream.position, self.cfg.ptx_batch) if sampled else None)
        return sft_batch(render_sft(self.tok, conversations, self.ptx_max_len), self.tok.pad_id)

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        ptx = iter(self.ptx_stream) if self.ptx_stream is not None and self.cfg.ptx_coef > 0 else None
        while True:
            batch = self._rollout_batch()
            for _ in range(self.cfg.ppo_epochs):
                yield batch if ptx is None else {**batch, "ptx": self._ptx_batch(next(ptx))}

    @torch.no_grad()
    def _rollout_batch(self) -> dict[str, Any]:
        policy, value_model = self.model.policy, self.model.value
        device = next(policy.parameters()).device
        self.reference.to(device)
        self.reward_model.to(device)
        # Rollout k of the global stream, as batches are split (data/batches.py): rank r of N draws rollouts
        # r, r+N, …, so ranks sample different prompts and replies, and one process draws what it always did.
        k = self.position * runtime.world_size() + runtime.rank()
        self.position += 1
        records = random.Random(self.seed * 104729 + k).sample(self.train_records, self.cfg.rollout_batch)
        rollout = sample_rollouts(policy, self.tok, [r["prompt"] for r in records], self.cfg.max_new_tokens,
                                  SamplingParams(temperature=self.cfg.temperature),
                                  seed=rollout_seed(self.seed, k, self.cfg.rollout_batch))
        old_logprobs, mask = rollout_logprobs(policy, rollout, device)
        ref_logprobs, _ = rollout_logprobs(self.reference, rollout, device)
        scores = reward_model_scores(self.reward_model, rollout, device)
        verified = {i: score_task(text, r["task"]) for i, (text, r) in enumerate(zip(rollout.texts, records)) if r.get("task")}
        checks = torch.tensor([verified.get(i, 0.0) for i in range(len(records))], device=device)
        kl = kl_k1(old_logprobs, ref_logprobs) * mask  # (B, T-1), k1 as in InstructGPT
        rewards = -self.kl_coef * kl
        last = (rollout.lengths.to(device) - 2).clamp(min=0)  # target index of the last reply token
        rewards[torch.arange(len(last), device=device), last] += scores + self.cfg.verifier_weight * checks
        values = value_model.forward_all(rollout.ids.to(device))[:, :-1] * mask
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.gae_lambda)
        advantages = whiten(advantages, mask)
        stats = {"reward": float(scores.mean()), "task_accuracy": sum(verified.values()) / max(len(verified), 1),
                 "kl": float(masked_mean(kl, mask) * mask.sum(1).float().mean()),
                 "reply_len": float(mask.sum(1).float().mean()), "ended": sum(rollout.ended) / len(rollout.ended),
                 "kl_coef": self.kl_coef}
        if stats["kl"] > self.cfg.max_kl:
            raise PPODiverged(f"mean KL to the reference is {stats['kl']:.2f} > --ppo.max_kl={self.cfg.max_kl}: "
                              "lower --optim.lr or raise --ppo.kl_coef")
        if self.cfg.kl_target > 0:  # the β this rollout paid is logged; the next rollout pays the updated one
            kl_all = dist.all_reduce_mean(stats["kl"], device)  # every rank keeps the same β
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl_all, self.cfg.kl_target,
                                            len(records) * runtime.world_size(), self.cfg.kl_horizon)
        return {"ids": rollout.ids, "response_mask": rollout.response_mask, "old_logprobs": old_logprobs,
                "old_values": values, "advantages": advantages, "returns": returns, "stats": stats}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        logprobs, mask = response_token_logprobs(model.policy, batch["ids"], batch["response_mask"])
        policy_loss, stats = ppo_clip_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, self.cfg.clip_eps)
        if stats["ratio_max"] > 1e3:
            raise PPODiverged(f"policy ratio {stats['ratio_max']:.1f} exploded; lower --optim.lr")
        values = model.value.forward_all(batch["ids"])[:, :-1]
        v_loss = value_loss(values, batch["old_values"], batch["returns"], mask, self.cfg.value_clip_eps)
        with torch.no_grad():
            entropy_proxy = -masked_mean(logprobs, mask)  # mean surprisal of the sampled tokens
        stats = {**stats, **batch["stats"], "value_loss": float(v_loss.detach()), "entropy": float(entropy_proxy)}
        loss = policy_loss + self.cfg.value_coef * v_loss
        if "ptx" in batch:  # PPO-ptx: + γ · CE on SFT replies keeps what SFT taught on prompts PPO never samples
            ptx = batch["ptx"]
            ptx_loss = masked_lm_loss(model.policy, ptx["ids"], ptx["targets"], ptx["mask"])
            loss = loss + self.cfg.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        policy = model.policy
        device = next(policy.parameters()).device
        self.reward_model.to(device)
        self.reference.to(device)
        pairs = self.val_pairs[: self.cfg.eval_prompts]
        replies = generate_replies(policy, self.tok, [p["prompt"] for p in pairs], self.cfg.max_new_tokens)
        result = score_replies(policy, self.reference, self.reward_model, self.tok, pairs, replies, device)
        if self.cfg.eval_samples > 0:
            result |= sampled_reply_scores(policy, self.reward_model, self.tok, pairs, self.cfg.eval_samples,
                                           self.cfg.temperature, self.cfg.max_new_tokens, device)[0]
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "ptx_position": self.ptx_stream.position if self.ptx_stream else 0,
                "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.kl_coef = state.get("kl_coef", self.cfg.kl_coef)
        if self.ptx_stream is not None:
            self.ptx_stream.position = state.get("ptx_position", 0)

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(batch["response_mask"].sum())

    def save_final(self, model: nn.Module, directory: Path, tokenizer: Tokenizer, sections: dict[str, Any]) -> None:
        save_final_model(model.policy, tokenizer, directory, sections)  # the policy alone: the value model stays


def reference_task_targets(conversations: list, task_questions: set[str], reference: nn.Module, tok: Tokenizer,
                           max_new_tokens: int = 24, params: SamplingParams | None = None, seed: int | None = None,
                           ) -> list:
    """The conversations with the last reply to each task question replaced by the reference model's reply, greedy
    or drawn with `params` and `seed` (kept as written where the reference did not end its reply: the target would
    teach <|im_end|> after a cut).

    PPO-ptx with these targets is self-distillation on task questions: it keeps the SFT model's answers where the
    data's right answers, which a model that cannot read the question can only guess, would move the guess."""
    is_task = [len(c["messages"]) >= 2 and c["messages"][-1]["role"] == "assistant"
               and c["messages"][-2]["content"] in task_questions
               for c in conversations]
    replies = iter(generate_replies(reference, tok, [c["messages"][:-1] for c, t in zip(conversations, is_task) if t],
                                    max_new_tokens, params=params, seed=seed))
    out = []
    for conversation, task in zip(conversations, is_task):
        text, ended = next(replies) if task else ("", False)
        out.append({**conversation, "messages": conversation["messages"][:-1] + [{"role": "assistant", "content": text}]}
                   if ended else conversation)
    return out


def run(run_root: Path, init: Path, data_dir: Path = Path("corpus/chat"), overrides: list[str] | None = None,
        resume: bool = False, reward_model: Path | None = None) -> dict[str, Any]:
    """PPO from an SFT model against a trained reward model (--reward-model)."""
    reward_dir = Path(reward_model) if reward_model else Path(run_root) / "reward" / "final"
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, ppo=PPOConfig())
    return run_stage(run_root, "ppo", defaults, overrides, resume, partial(build, init, Path(data_dir), reward_dir))


def build(init: Path, data_dir: Path, reward_dir: Path, sections: dict[str, Any],
          ) -> tuple[nn.Module, PPOStage, Tokenizer]:
    """(model, stage, tokenizer): the --init policy (LoRA if asked) beside a value model started from the reward
    model, a frozen copy of the policy as reference, the reward model, the prompts."""
    train_pairs = read_preferences(Path(data_dir) / "prefs_train.jsonl")
    val_pairs = read_preferences(Path(data_dir) / "prefs_val.jsonl")
    policy, tok, _ = load_model(init)
    sections["model"] = policy.config
    reference = copy.deepcopy(policy)
    maybe_inject_lora(policy, sections["lora"])  # adapters on the policy; the value model trains in full
    rm, _ = load_scalar_model(reward_dir)
    value = copy.deepcopy(rm).train().requires_grad_(True)  # the critic starts from the reward model
    model = PolicyAndValue(policy.train(), value)
    if sections["ppo"].train_prompts == "chat":
        train_pairs = [p for p in train_pairs if not p.get("task")]
    stage = PPOStage(tok, model, reference, rm, train_pairs, val_pairs, sections["ppo"], sections["loop"].seed)
    if sections["ppo"].ptx_coef > 0:
        conversations = read_conversations(Path(data_dir) / "sft_train.jsonl")
        task_questions = None
        if sections["ppo"].ptx_targets in ("reference", "sampled"):
            task_questions = {t["prompt"][-1]["content"] for t in read_tasks(Path(data_dir) / "tasks_train.jsonl")}
        stage.add_ptx_data(conversations, SFTConfig().max_len, task_questions)
    return model, stage, tok


def _args(parser) -> None:
    parser.add_argument("--reward-model", type=Path, default=None, help="reward model directory (default: <run-dir>/reward/final)")


def main(argv: list[str]) -> int:
    return stage_main(argv, "ppo", run, extra_args=_args)
