"""GRPO with verifiable rewards (Shao et al. 2024, arXiv:2402.03300): G replies per task, group-relative advantages.

No value model: each reply's advantage is its reward standardised within its group. Groups whose
replies all score the same carry no signal and are dropped (and counted). Headline metric: held-out
pass@1 on tasks_val with greedy decoding, before and after.
Deviation from the paper: one policy update per rollout batch by default (`grpo.epochs`), so the clipped
ratio is 1 on the first pass, as in the paper's single-update setting.
Prompts come from a learnability curriculum over task families (`FamilyCurriculum`): a tiny model solves
some families always or never, and those groups carry no signal.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm import runtime
from scratchllm.config import GRPOConfig, LoopConfig, OptimConfig, SFTConfig
from scratchllm.data.chat_batches import EpochStream, pad_right, render_sft, sft_batch
from scratchllm.data.jsonl import read_conversations, read_tasks
from scratchllm.data.rewards import composite_reward, score_task
from scratchllm.eval.chat_eval import pass_at_1_by_family, task_sampled_pass_at_1, task_scores
from scratchllm.eval.significance import paired_change
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.io import load_model
from scratchllm.model.logprobs import response_token_logprobs
from scratchllm.model.lora import maybe_inject_lora
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.loop import Stage
from scratchllm.train.losses import (
    grpo_advantages,
    grpo_loss,
    masked_lm_loss,
    mean_per_reply,
    mean_per_token,
    per_max_len,
)
from scratchllm.train.rollout import rollout_seed, sample_rollouts
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

DEFAULT_LOOP = LoopConfig(max_steps=200, batch_size=1, eval_every=0, checkpoint_every=100, log_every=1)
DEFAULT_OPTIM = OptimConfig(lr=5e-5, warmup_steps=3, weight_decay=0.0, min_lr_ratio=1.0, grad_clip=1.0)


class FamilyCurriculum:
    """Draw tasks family by family, weighted by learnability p·(1-p) (Foster & Foerster 2025, "Learning to Reason
    at the Frontier of Learnability"), p = the family's running success rate in rollouts.

    A family the policy always or never solves has p·(1-p) ≈ 0: its groups score all-equal and GRPO learns
    nothing from them, so they are drawn rarely (`floor` keeps every family in play, since p moves). Every
    family starts at p = 0.5, i.e. uniform. p is an exponential moving average with weight `decay` on the past.
    """

    def __init__(self, tasks: list[dict[str, Any]], decay: float, floor: float) -> None:
        self.by_family: dict[str, list[dict[str, Any]]] = {}
        for task in tasks:
            self.by_family.setdefault(task["family"], []).append(task)
        self.families = sorted(self.by_family)
        self.success = {f: 0.5 for f in self.families}
        self.decay, self.floor = decay, floor

    def weights(self) -> list[float]:
        return [self.success[f] * (1 - self.success[f]) + self.floor for f in self.families]

    def sample(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        families = rng.choices(self.families, weights=self.weights(), k=n)
        return [rng.choice(self.by_family[f]) for f in families]

    def update(self, families: list[str], correct: list[float]) -> None:
        """One rollout per entry: the family it came from and whether it was right."""
        for family in set(families):
            scores = [c for f, c in zip(families, correct) if f == family]
            self.success[family] = self.decay * self.success[family] + (1 - self.decay) * sum(scores) / len(scores)

    def state_dict(self) -> dict[str, float]:
        return dict(self.success)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.success.update(state)


def chat_conversations(conversations: list, tasks: list) -> list:
    """The conversations with no message from a task's prompt: fitting the data's answers to questions the model
    cannot read would fight the verifier over its guesses (GRPO-ptx trains on chat only)."""
    questions = {t["prompt"][-1]["content"] for t in tasks}
    return [c for c in conversations if not any(m["content"] in questions for m in c["messages"])]


def token_average(cfg: GRPOConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The losses.py function `--grpo.loss_norm` names: how the per-token terms of the objective are averaged."""
    if cfg.loss_norm == "constant":
        return per_max_len(cfg.max_new_tokens)
    return {"reply": mean_per_reply, "token": mean_per_token}[cfg.loss_norm]


class GRPOStage(Stage):
    name = "grpo"

    def __init__(self, tok: Tokenizer, policy: nn.Module, reference: nn.Module | None, train_tasks: list,
                 val_tasks: list, cfg: GRPOConfig, seed: int, reward_fn=composite_reward) -> None:
        """`policy`: the model the loop trains, which samples the rollouts; `reference`: a frozen copy for the KL
        (None when `cfg.kl_coef` is 0: nothing reads it)."""
        if reference is None and cfg.kl_coef > 0:
            raise ValueError(f"--grpo.kl_coef={cfg.kl_coef} needs a reference model")
        self.tok, self.cfg, self.seed = tok, cfg, seed
        self.reference = None if reference is None else reference.eval().requires_grad_(False)
        self.policy = policy
        self.average = token_average(cfg)
        self.train_tasks, self.val_tasks, self.reward_fn = train_tasks, val_tasks, reward_fn
        self.position = 0  # rollout batches drawn so far (resumable state)
        self.groups_total = self.groups_dropped = 0
        self.first_scores: list[float] | None = None  # held-out greedy scores at the first evaluation (step 0)
        self.curriculum = FamilyCurriculum(train_tasks, cfg.curriculum_decay, cfg.curriculum_floor) if cfg.curriculum else None
        self.ptx_stream: EpochStream | None = None

    def add_ptx_data(self, conversations: list, max_len: int) -> None:
        """Chat conversations for the GRPO-ptx term (used when cfg.ptx_coef > 0), rendered once: their targets
        never change, unlike PPO-ptx's sampled ones."""
        rows = render_sft(self.tok, chat_conversations(conversations, self.train_tasks), max_len)
        self.ptx_stream = EpochStream(rows, self.cfg.ptx_batch, self.seed)

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        ptx = iter(self.ptx_stream) if self.ptx_stream is not None and self.cfg.ptx_coef > 0 else None
        while True:
            batch = self._rollout_batch()
            for _ in range(self.cfg.epochs):
                yield batch if ptx is None else {**batch, "ptx": sft_batch(next(ptx), self.tok.pad_id)}

    @torch.no_grad()
    def _draw(self) -> dict[str, Any]:
        """One draw: `prompts_per_step` tasks × G sampled replies, scored, with group-relative advantages."""
        k = self.position * runtime.world_size() + runtime.rank()  # draw k of one global stream, split across ranks
        rng = random.Random(self.seed * 7919 + k)
        self.position += 1
        if self.curriculum is None:
            tasks = rng.sample(self.train_tasks, self.cfg.prompts_per_step)
        else:
            tasks = self.curriculum.sample(rng, self.cfg.prompts_per_step)
        G = self.cfg.group_size
        prompts = [t["prompt"] for t in tasks for _ in range(G)]
        params = SamplingParams(temperature=self.cfg.temperature)
        rollout = sample_rollouts(self.policy, self.tok, prompts, self.cfg.max_new_tokens, params,
                                  seed=rollout_seed(self.seed, k, len(prompts)))
        rewards = torch.tensor([self.reward_fn(text, tasks[i // G]) for i, text in enumerate(rollout.texts)])
        correct = [score_task(text, tasks[i // G]) for i, text in enumerate(rollout.texts)]
        advantages, has_signal = grpo_advantages(rewards, G, scale=self.cfg.scale_advantages)
        if self.curriculum is not None:
            self.curriculum.update([tasks[i // G]["family"] for i in range(len(correct))], correct)
        self.groups_total += len(tasks)
        self.groups_dropped += int((~has_signal).sum())
        lengths = rollout.lengths.tolist()
        return {
            "rows": [rollout.ids[i, : lengths[i]].tolist() for i in range(len(lengths))],
            "masks": [rollout.response_mask[i, : lengths[i]].tolist() for i in range(len(lengths))],
            "advantages": advantages, "row_has_signal": has_signal.repeat_interleave(G), "n_signal": int(has_signal.sum()),
            "stats": {"reward": float(rewards.mean()), "correct": sum(correct) / len(correct),
                      "reply_len": float(rollout.response_mask.sum(1).float().mean())},
        }

    @torch.no_grad()
    def _rollout_batch(self) -> dict[str, Any]:
        """Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476 §3.2): keep drawing until the batch holds
        `prompts_per_step` groups with signal, at most `max_draws` draws. A group whose G replies all score the
        same has zero advantage everywhere: it costs compute and only dilutes the step.
        """
        G, wanted = self.cfg.group_size, self.cfg.prompts_per_step
        draws: list[dict[str, Any]] = []
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        advantages: list[float] = []
        while len(draws) < self.cfg.max_draws and len(rows) < wanted * G:
            draw = self._draw()
            draws.append(draw)
            for i, keep in enumerate(draw["row_has_signal"].tolist()):
                if keep:
                    rows.append(draw["rows"][i])
                    masks.append(draw["masks"][i])
                    advantages.append(float(draw["advantages"][i]))
        if not rows:
            # subtle: no group of any draw had signal. Redrawing until one does can loop forever (an untrained
            # policy scores 0 everywhere), so take the step on the last draw: its advantages are all zero and
            # only the KL term pulls.
            rows, masks, advantages = draws[-1]["rows"], draws[-1]["masks"], draws[-1]["advantages"].tolist()
        rows, masks, advantages = rows[: wanted * G], masks[: wanted * G], advantages[: wanted * G]
        n_groups = len(draws) * wanted
        stats = {k: sum(d["stats"][k] for d in draws) / len(draws) for k in draws[0]["stats"]}
        stats |= {"groups_with_signal": sum(d["n_signal"] for d in draws) / n_groups, "draws": float(len(draws)),
                  "groups_used": len(rows) / G}
        ids = pad_right(rows, self.tok.pad_id)  # (B, T) prompt + reply, right-padded
        response_mask = pad_right(masks, 0).bool()
        device = next(self.policy.parameters()).device
        # One update per batch: π_old is the policy at the update itself, so the loss takes its own log-probs,
        # detached, as π_old (ρ = 1, the gradient of ρ·Â is Â·∇log π) and this forward pass is not needed.
        old = (response_token_logprobs(self.policy, ids.to(device), response_mask.to(device))[0]
               if self.cfg.epochs > 1 else None)
        ref = None  # β = 0: no KL term, no reference forward pass
        if self.cfg.kl_coef > 0:  # __init__ made sure a reference exists
            ref = response_token_logprobs(self.reference.to(device), ids.to(device), response_mask.to(device))[0]
        return {"ids": ids, "response_mask": response_mask, "old_logprobs": old, "ref_logprobs": ref,
                "advantages": torch.tensor(advantages), "stats": stats}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        logprobs, mask = response_token_logprobs(model, batch["ids"], batch["response_mask"])
        old = logprobs.detach() if batch["old_logprobs"] is None else batch["old_logprobs"]
        loss, stats = grpo_loss(logprobs, old, batch["ref_logprobs"], batch["advantages"].to(logprobs.device),
                                mask, self.cfg.clip_eps, self.cfg.kl_coef, self.average)
        stats = {**stats, **batch["stats"], "groups_dropped_total": float(self.groups_dropped)}
        if "ptx" in batch:  # GRPO-ptx: + γ · CE on chat conversations, which GRPO never samples
            ptx = batch["ptx"]
            ptx_loss = masked_lm_loss(model, ptx["ids"], ptx["targets"], ptx["mask"])
            loss = loss + self.cfg.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        return loss, stats

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        scores = task_scores(model, self.tok, self.val_tasks, self.cfg.max_new_tokens)
        result = pass_at_1_by_family(self.val_tasks, scores)
        if self.first_scores is None:
            self.first_scores = scores
        else:  # paired with the first evaluation, task by task: is the greedy change beyond this task set's luck?
            change = paired_change(self.first_scores, scores)
            result |= {"pass_at_1_won": float(change.won), "pass_at_1_lost": float(change.lost),
                       "pass_at_1_p": change.p_value}
        if self.cfg.eval_samples > 0:  # what GRPO optimises: the sampling policy's accuracy, on held-out tasks
            # seed 0 whatever the run's seed, as the pipeline's report: every run and checkpoint is measured on the
            # same random draws, and the report's identical query is answered from memory (eval/chat_eval.py)
            result |= task_sampled_pass_at_1(model, self.tok, self.val_tasks[: self.cfg.sampled_eval_tasks],
                                             self.cfg.eval_samples, self.cfg.temperature, self.cfg.max_new_tokens, seed=0)
        result["groups_dropped_share"] = self.groups_dropped / max(self.groups_total, 1)
        if self.curriculum is not None:
            result |= {f"curriculum_p/{f}": p for f, p in self.curriculum.success.items()}
        return result

    def state_dict(self) -> dict[str, Any]:
        state = {"position": self.position, "groups_total": self.groups_total, "groups_dropped": self.groups_dropped,
                 "first_scores": self.first_scores, "ptx_position": self.ptx_stream.position if self.ptx_stream else 0}
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.groups_total, self.groups_dropped = state["position"], state["groups_total"], state["groups_dropped"]
        self.first_scores = state.get("first_scores")  # absent in checkpoints written before it was kept
        if self.ptx_stream is not None:
            self.ptx_stream.position = state.get("ptx_position", 0)
        if self.curriculum is not None and "curriculum" in state:
            self.curriculum.load_state_dict(state["curriculum"])

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(batch["response_mask"].sum())


def verifier_reward(cfg: GRPOConfig) -> Callable[[str, dict[str, Any]], float]:
    """The reward of a reply to a task: the verifiers selected by their weights in `cfg` (correct, format)."""
    weights = {"correct": cfg.correct_weight, "format": cfg.format_weight}
    return lambda text, task: composite_reward(text, task, weights)


def run(run_root: Path, init: Path, data_dir: Path = Path("corpus/chat"), overrides: list[str] | None = None,
        resume: bool = False) -> dict[str, Any]:
    """GRPO on the training tasks with verifiable rewards; reports held-out pass@1."""
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, grpo=GRPOConfig())
    return run_stage(run_root, "grpo", defaults, overrides, resume, partial(build, init, Path(data_dir)))


def build(init: Path, data_dir: Path, sections: dict[str, Any]) -> tuple[nn.Module, GRPOStage, Tokenizer]:
    """(model, stage, tokenizer): the --init policy (LoRA if asked), a frozen copy as reference, the tasks."""
    train_tasks = read_tasks(Path(data_dir) / "tasks_train.jsonl")
    val_tasks = read_tasks(Path(data_dir) / "tasks_val.jsonl")[: sections["grpo"].eval_tasks]
    model, tok, _ = load_model(init)
    sections["model"] = model.config
    reference = copy.deepcopy(model) if sections["grpo"].kl_coef > 0 else None
    maybe_inject_lora(model, sections["lora"])
    stage = GRPOStage(tok, model, reference, train_tasks, val_tasks, sections["grpo"], sections["loop"].seed,
                      verifier_reward(sections["grpo"]))
    if sections["grpo"].ptx_coef > 0:
        stage.add_ptx_data(read_conversations(Path(data_dir) / "sft_train.jsonl"), SFTConfig().max_len)
    return model.train(), stage, tok


def main(argv: list[str]) -> int:
    return stage_main(argv, "grpo", run)
