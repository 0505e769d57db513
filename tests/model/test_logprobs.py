"""Log-probs of given tokens: against a hand-computed softmax, and against scoring every position one prefix at a time."""

from __future__ import annotations

import math

import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.logprobs import (
    response_token_kl,
    response_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)


def test_token_logprobs_hand_computed_and_dtype() -> None:
    # logits [0, ln 3] -> p = [1/4, 3/4]: log p[1] = ln 0.75, log p[0] = ln 0.25
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]], dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    assert torch.allclose(out, torch.tensor([[math.log(0.75), math.log(0.25)]]), atol=1e-2)
    logits32 = torch.randn(3, 4, 7)
    targets = torch.randint(0, 7, (3, 4))
    expected = torch.log_softmax(logits32, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits32, targets), expected, atol=1e-6)


def test_token_logprobs_gradient_is_log_softmax_gradient() -> None:
    # The row-by-row form must back-propagate like the one-shot log_softmax: each logit's gradient is
    # onehot(target) - softmax, scaled by the upstream weight of its position.
    logits = torch.randn(5, 3, 11, requires_grad=True)
    targets = torch.randint(0, 11, (5, 3))
    weights = torch.randn(5, 3)
    (token_logprobs(logits, targets) * weights).sum().backward()
    expected = (torch.nn.functional.one_hot(targets, 11) - torch.softmax(logits.detach(), -1)) * weights[..., None]
    assert logits.grad is not None and torch.allclose(logits.grad, expected, atol=1e-6)


def _brute_force(model: GPT, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Score each response token from its own prefix: log softmax(model(ids[:t]))[-1][ids[t]]."""
    total = torch.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if response_mask[b, t]:
                logits = model(ids[b : b + 1, :t])[0, -1]
                total[b] += torch.log_softmax(logits.float(), -1)[ids[b, t]]
    return total


def test_sequence_logprobs_equal_prefix_by_prefix_scoring() -> None:
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 7))
    # row 0: prompt of 3, reply of 4; row 1: prompt of 2, reply of 3, then 2 right pads (not scored)
    response_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        seq = sequence_logprobs(model, ids, response_mask)
        per_token, mask = response_token_logprobs(model, ids, response_mask)
        expected = _brute_force(model, ids, response_mask)
    assert per_token.shape == mask.shape == (2, 6)
    assert mask.tolist()[1] == [False, True, True, True, False, False]  # response_mask shifted left by one
    assert torch.allclose(seq, expected, atol=1e-5)
    # what a pad token is changes nothing: it is never a target and comes after every target
    ids2 = ids.clone()
    ids2[1, 5:] = 0
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(model, ids2, response_mask), seq, atol=1e-6)


def test_left_padding_with_attention_mask_matches_unpadded() -> None:
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=300)).eval()
    ids = torch.randint(1, 300, (1, 5))
    response_mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    padded_response = torch.cat([torch.zeros(1, 3, dtype=torch.bool), response_mask], dim=1)
    attention = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone = sequence_logprobs(model, ids, response_mask)
        left = sequence_logprobs(model, padded, padded_response, attention_mask=attention)
    assert torch.allclose(left, alone, atol=1e-5)


def test_response_token_kl_is_the_exact_kl_and_never_negative() -> None:
    torch.manual_seed(0)
    policy, reference = GPT(model_preset("tiny", vocab_size=40)), GPT(model_preset("tiny", vocab_size=40))
    ids = torch.randint(0, 40, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, 4:] = True
    kl, m = response_token_kl(policy, reference, ids, mask)
    assert torch.equal(m, mask[:, 1:]) and (kl >= 0).all()
    p = torch.log_softmax(policy(ids[:, :-1]), -1)
    q = torch.log_softmax(reference(ids[:, :-1]), -1)
    for b in range(3):  # one position at a time, straight from the definition; 0 where nothing is scored
        for t in range(8):
            exact = sum(p[b, t, v].exp() * (p[b, t, v] - q[b, t, v]) for v in range(40)) if m[b, t] else torch.tensor(0.0)
            assert torch.isclose(kl[b, t], exact, atol=1e-5)
    k1 = response_token_logprobs(policy, ids, mask)[0] - response_token_logprobs(reference, ids, mask)[0]
    assert (k1[m] < 0).any()  # the single-token estimate goes negative on these rows; the exact KL does not
    same, _ = response_token_kl(policy, policy, ids, mask)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)


def test_logits_at_selected_positions_equal_the_full_logits_there_with_the_same_gradient() -> None:
    # RL and SFT losses project only the scored positions onto the vocabulary; nothing else may change.
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=50))
    ids = torch.randint(0, 50, (3, 10))
    at = torch.rand(3, 10) < 0.4
    selected = model(ids, logits_at=at)
    full = model(ids)
    assert selected.shape == (int(at.sum()), 50)
    assert torch.allclose(selected, full[at], atol=1e-6)
    weights = torch.randn_like(selected)
    grad_selected = torch.autograd.grad((selected * weights).sum(), model.parameters())
    grad_full = torch.autograd.grad((full[at] * weights).sum(), model.parameters())
    for a, b in zip(grad_selected, grad_full):
        assert torch.allclose(a, b, atol=1e-5)
    logprobs, mask = response_token_logprobs(model, ids, at)
    assert (logprobs[~mask] == 0).all()
    expected = torch.log_softmax(full[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)
