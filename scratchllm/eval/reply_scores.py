"""Scoring held-out replies with a reward model and the rule-based gold judge: PPO's evaluation and the
pipeline's comparison table (eval/compare.py) call the same functions, so their numbers agree.

The learned reward says what PPO optimises; the gold judge (data/rewards.py, the rules the preference data was
built from) says whether the rise is real, and `judge_agreement` how often the two order replies alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scratchllm.data.chat_batches import length_sorted_chunks, pad_right
from scratchllm.data.rewards import gold_score
from scratchllm.eval.chat_eval import generate_replies
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.heads import ScalarModel
from scratchllm.model.logprobs import response_token_kl
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_for_completion


def gold_scores(pairs: list, replies: list[tuple[str, bool]]) -> list[float]:
    """The rule-based gold judge's score of each held-out reply (the rules the preference data was built from),
    with the pair's chosen reply as the on-topic reference."""
    return [gold_score(p["prompt"], text, p.get("task"), ended, p["chosen"]) for p, (text, ended) in zip(pairs, replies)]


def render_replies(tok: Tokenizer, pairs: list, replies: list[tuple[str, bool]]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, reply mask, lengths) of prompt + reply rows, right-padded; an ended reply keeps its <|im_end|>."""
    rows, masks = [], []
    for pair, (text, ended) in zip(pairs, replies):
        prompt = render_for_completion(tok, pair["prompt"])
        reply = tok.encode(text) + ([tok.im_end_id] if ended else [])
        reply = reply or [tok.eos_id]
        rows.append(prompt + reply)
        masks.append([0] * len(prompt) + [1] * len(reply))
    return pad_right(rows, tok.pad_id), pad_right(masks, 0).bool(), torch.tensor([len(r) for r in rows])


@torch.no_grad()
def reward_scores(reward_model: ScalarModel, ids: Tensor, lengths: Tensor, device: torch.device, chunk: int = 64) -> Tensor:
    """The reward model's score of each right-padded row (B,), in row order, run in length-sorted chunks each cut
    to its longest row (causal and right-padded: the cut changes no real token; memory stays bounded)."""
    scores = torch.empty(len(lengths))
    for rows in length_sorted_chunks(lengths.tolist(), chunk):
        width = int(lengths[rows].max())
        scores[rows] = reward_model(ids[rows, :width].to(device), lengths[rows].to(device)).float().cpu()
    return scores


@torch.no_grad()
def score_replies(policy: nn.Module, reference: nn.Module, reward_model: ScalarModel, tok: Tokenizer, pairs: list,
                  replies: list[tuple[str, bool]], device: torch.device, chunk: int = 64) -> dict[str, float]:
    """Learned reward, gold-judge score, KL to the reference (nats/token) and end rate of held-out replies."""
    ids, mask, lengths = render_replies(tok, pairs, replies)
    learned = reward_scores(reward_model, ids, lengths, device, chunk)
    kl_sum = kl_tokens = 0.0
    for rows in length_sorted_chunks(lengths.tolist(), chunk):  # as in reward_scores: cut to each chunk's longest
        width = int(lengths[rows].max())
        chunk_ids, chunk_mask = ids[rows, :width].to(device), mask[rows, :width].to(device)
        kl, m = response_token_kl(policy, reference, chunk_ids, chunk_mask)
        kl_sum += float((kl * m).sum())
        kl_tokens += float(m.sum())
    gold = gold_scores(pairs, replies)
    return {
        "learned_reward": float(learned.mean()),
        "gold_score": sum(gold) / len(gold),
        "kl_to_sft": kl_sum / max(kl_tokens, 1.0),
        "end_rate": sum(e for _, e in replies) / len(replies),
    }


@torch.no_grad()
def sampled_reply_scores(policy: nn.Module, reward_model: ScalarModel, tok: Tokenizer, pairs: list, n_samples: int,
                         temperature: float, max_new_tokens: int, device: torch.device, seed: int = 0,
                         ) -> tuple[dict[str, float], list[float]]:
    """Learned reward and gold score of `n_samples` replies per held-out prompt sampled at `temperature`, how
    often the reward model orders two replies to a prompt as the judge does (`judge_agreement`, where the judge
    tells them apart), and the gold score of each reply (sample k of prompt i at k * len(pairs) + i).

    PPO maximises E_{y~π(·|x)}[r(x, y)] over replies sampled at its rollout temperature, so this is where its
    learned reward should rise and where the gold judge checks that the rise is real; the greedy reply is only
    the mode of π, and a small shift of the logits flips it. The same seed for every checkpoint pairs the draws."""
    prompts_k = pairs * n_samples
    replies = generate_replies(policy, tok, [p["prompt"] for p in prompts_k], max_new_tokens,
                               params=SamplingParams(temperature=temperature), seed=seed)
    ids, _, lengths = render_replies(tok, prompts_k, replies)
    learned = reward_scores(reward_model, ids, lengths, device).tolist()
    gold = gold_scores(prompts_k, replies)
    agree, told_apart = judge_agreement(learned, gold, len(pairs))
    metrics = {"learned_reward_sampled": sum(learned) / len(learned), "gold_score_sampled": sum(gold) / len(gold),
               "judge_pairs_sampled": float(told_apart)}
    if told_apart:
        metrics["rm_judge_agreement_sampled"] = agree / told_apart
    return metrics, gold


def judge_agreement(learned: list[float], gold: list[float], n_prompts: int) -> tuple[int, int]:
    """(agreeing, compared): among replies to the same prompt that the gold judge scores differently, how many
    pairs the reward model orders the same way (a tie counts as disagreeing). Reply k of prompt i sits at
    k * n_prompts + i.

    The reward model's accuracy on the policy's own replies, which is where PPO leans on it: its accuracy on
    the preference data's pairs says little about replies unlike them, and a policy that moves to where the two
    disagree is exploiting the reward model (reward over-optimisation, Gao et al. 2022, arXiv:2210.10760)."""
    agree = compared = 0
    for i in range(n_prompts):
        ks = range(i, len(gold), n_prompts)
        for a in ks:
            for b in ks:
                if a < b and gold[a] != gold[b]:
                    compared += 1
                    agree += (learned[a] - learned[b]) * (gold[a] - gold[b]) > 0
    return agree, compared
