"""Measure every checkpoint of a run on the same held-out sets: the pipeline's comparison table.

Rows: validation bits-per-byte, in-context copy accuracy, end-of-reply rate, task pass@1 (greedy, overall and per
family) and its paired change against SFT's (tasks won, lost, exact McNemar p: eval/significance.py), sampled
task pass@1 (GRPO's objective; paired with SFT's task by task, same seed),
reward-model accuracy, learned reward and gold-judge score of held-out replies, greedy and sampled at PPO's
rollout temperature (the gold score also paired with SFT's, reply by reply), how often the reward model orders
two sampled replies as the judge does, KL to SFT. Columns: pretrain, SFT,
DPO, PPO, GRPO, and a "reference" column: the task pass@1 of answering without reading the question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchllm.config import GRPOConfig, PPOConfig
from scratchllm.data.batches import sequential_windows
from scratchllm.data.jsonl import read_conversations, read_preferences, read_tasks
from scratchllm.eval.chat_eval import (
    constant_answer_by_family,
    constant_answer_scores,
    end_of_reply_rate,
    generate_replies,
    pass_at_1_by_family,
    task_sampled_scores,
    task_scores,
)
from scratchllm.eval.metrics import copy_accuracy, evaluate_lm, token_byte_lengths
from scratchllm.eval.reply_scores import gold_scores, sampled_reply_scores, score_replies
from scratchllm.eval.significance import paired_change
from scratchllm.model.heads import load_scalar_model
from scratchllm.model.io import load_model
from scratchllm.runtime import resolve_device


@torch.no_grad()
def compare_checkpoints(
    checkpoints: dict[str, Path], reward_model: Path, data_dir: Path, quick: bool = False, device: str = "auto"
) -> dict[str, dict[str, float | str | None]]:
    dev = resolve_device(device)
    # n_windows: batches of 16 x 256 held-out text tokens for bits-per-byte, as pretraining's own evaluation
    n_val_convs, n_tasks, n_prefs, n_windows = (16, 22, 16, 2) if quick else (100, 480, 350, 8)  # all of prefs_val
    n_samples = 2 if quick else PPOConfig().eval_samples  # at least 2: the judge-agreement row compares replies
    grpo = GRPOConfig()  # sampled pass@1 as GRPO's own evaluation measures it: its temperature, tasks and k
    n_task_samples, n_sampled_tasks = (2, 11) if quick else (grpo.eval_samples, grpo.sampled_eval_tasks)
    convs = read_conversations(data_dir / "chat" / "sft_val.jsonl")[:n_val_convs]
    tasks = read_tasks(data_dir / "chat" / "tasks_val.jsonl")[:n_tasks]
    pairs = read_preferences(data_dir / "chat" / "prefs_val.jsonl")[:n_prefs]
    rm = load_scalar_model(reward_model, dev)[0] if (reward_model / "model.safetensors").exists() else None
    sft = load_model(checkpoints["sft"], dev)[0] if "sft" in checkpoints else None
    rm_accuracy = None
    summary = reward_model.parent / "summary.json"
    if summary.exists():
        import json

        rm_accuracy = json.loads(summary.read_text())["summary"].get("rm_accuracy")
    results: dict[str, dict[str, float | str | None]] = {}
    scores_by_stage: dict[str, list[float]] = {}  # per held-out task, 1 right / 0 wrong
    gold_by_stage: dict[str, list[float]] = {}  # gold-judge score per held-out preference prompt
    sampled_gold_by_stage: dict[str, list[float]] = {}  # ... per sampled reply (n_samples per prompt)
    sampled_tasks_by_stage: dict[str, list[float]] = {}  # per held-out task, the share of its samples right
    val_tokens_cache: dict[str, Any] = {}
    for stage, path in checkpoints.items():
        model, tok, _ = load_model(path, dev)
        row: dict[str, float | None] = {}
        key = tok.fingerprint()
        if key not in val_tokens_cache:
            from scratchllm.data.shards import split_documents

            text_docs = [d for p in sorted((data_dir / "pretrain" / "val").glob("*.txt")) for d in split_documents(p.read_text())]
            ids: list[int] = []
            for doc in text_docs:
                ids += tok.encode(doc) + [tok.eos_id]
            import numpy as np

            val_tokens_cache[key] = np.array(ids, dtype=np.int64)
        windows = sequential_windows(val_tokens_cache[key], min(256, model.config.max_seq_len), 16, n_windows)
        row["val_bpb"] = evaluate_lm(model, windows, token_byte_lengths(tok, tok.vocab_size))["val_bpb"]
        row["copy_accuracy"] = copy_accuracy(model, min(tok.special_by_id))  # specials sit after the merges
        row["end_rate"] = end_of_reply_rate(model, tok, convs)
        scores_by_stage[stage] = task_scores(model, tok, tasks)
        row.update(pass_at_1_by_family(tasks, scores_by_stage[stage]))  # "pass_at_1" and "pass_at_1/<family>"
        if stage != "pretrain":  # what GRPO optimises: the sampling policy's accuracy (greedy is only its mode)
            per_task = task_sampled_scores(model, tok, tasks[:n_sampled_tasks], n_task_samples, grpo.temperature)
            sampled_tasks_by_stage[stage] = [sum(s) / len(s) for s in per_task]
            row["sampled_pass_at_1"] = sum(sampled_tasks_by_stage[stage]) / max(len(per_task), 1)
        row["rm_accuracy"] = rm_accuracy if stage == "sft" else None
        if rm is not None and sft is not None:
            replies = generate_replies(model, tok, [p["prompt"] for p in pairs], 32)
            scored = score_replies(model, sft, rm, tok, pairs, replies, dev)
            gold_by_stage[stage] = gold_scores(pairs, replies)
            row["learned_reward"], row["gold_score"] = scored["learned_reward"], scored["gold_score"]
            row["kl_to_sft"] = scored["kl_to_sft"]
            if stage != "pretrain":  # a base model's samples run on without ending: a chat-policy metric
                sampled, sampled_gold_by_stage[stage] = sampled_reply_scores(
                    model, rm, tok, pairs, n_samples, PPOConfig().temperature, 32, dev)
                row.update(sampled)
        results[stage] = row
        print(f"[compare] {stage}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float) and "/" not in k))
    # Same prompts, same greedy decoding: each stage's change is paired item by item with SFT's (eval/significance.py).
    pairings = (("pass_at_1_vs_sft", scores_by_stage), ("sampled_pass_at_1_vs_sft", sampled_tasks_by_stage),
                ("gold_vs_sft", gold_by_stage), ("gold_sampled_vs_sft", sampled_gold_by_stage))
    for key, per_item in pairings:
        if "sft" in per_item:
            for stage, scores in per_item.items():
                if stage != "sft":
                    change = paired_change(per_item["sft"], scores)
                    results[stage][key] = f"+{change.won} −{change.lost}, p={change.p_value:.2g}"
    # What reading nothing scores: each task answered with its family's commonest answer in the training split.
    train_tasks = read_tasks(data_dir / "chat" / "tasks_train.jsonl")
    results["reference"] = dict(constant_answer_by_family(train_tasks, tasks))
    guessed = constant_answer_scores(train_tasks, tasks[:n_sampled_tasks])  # a fixed guess: every sample the same
    results["reference"]["sampled_pass_at_1"] = sum(guessed) / max(len(guessed), 1)
    return results
