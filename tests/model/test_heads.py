"""Scalar head: the score is read at the last real token whatever the padding; gradients reach head and trunk; save/load."""

from __future__ import annotations

import json

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.heads import ScalarModel, last_real_index, load_scalar_model, save_scalar_model
from scratchllm.model.io import CheckpointError

V = 300


def _rm() -> ScalarModel:
    torch.manual_seed(0)
    return ScalarModel(GPT(model_preset("tiny", vocab_size=V))).eval()


def test_last_real_index_worked_examples() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert last_real_index(attention_mask=mask).tolist() == [4, 2]
    assert last_real_index(lengths=torch.tensor([3, 1])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="lengths"):
        last_real_index()
    with pytest.raises(ValueError, match="no real token"):
        last_real_index(attention_mask=torch.zeros(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("pad_value,n_pad", [(0, 3), (V - 1, 5)])
def test_right_padding_does_not_change_the_score(pad_value: int, n_pad: int) -> None:
    rm = _rm()
    seqs = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    with torch.no_grad():
        alone = torch.cat([rm(s[None], torch.tensor([len(s)])) for s in seqs])
        width = 4 + n_pad
        padded = torch.full((2, width), pad_value)
        for i, s in enumerate(seqs):
            padded[i, : len(s)] = s
        lengths = torch.tensor([4, 2])
        assert torch.allclose(rm(padded, lengths), alone, atol=1e-5)
        real = torch.arange(width)[None] < lengths[:, None]
        assert torch.allclose(rm(padded, attention_mask=real), alone, atol=1e-5)
        # the trap: reading the final column scores a pad, and that number differs
        assert not torch.allclose(rm(padded, torch.tensor([width, width])), alone, atol=1e-3)


@pytest.mark.parametrize("pad_value,n_pad", [(0, 2), (V - 1, 4)])
def test_left_padding_with_attention_mask_does_not_change_the_score(pad_value: int, n_pad: int) -> None:
    rm = _rm()
    seq = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = rm(seq, torch.tensor([4]))
        padded = torch.cat([torch.full((1, n_pad), pad_value), seq], dim=1)
        real = torch.cat([torch.zeros(1, n_pad, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], dim=1)
        assert torch.allclose(rm(padded, attention_mask=real), alone, atol=1e-5)


def test_forward_all_is_per_token_and_matches_forward() -> None:
    rm = _rm()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        values = rm.forward_all(ids)
        assert values.shape == (2, 6) and values.dtype == torch.float32
        assert torch.allclose(rm(ids, torch.tensor([6, 3])), torch.stack([values[0, 5], values[1, 2]]))


def test_gradients_reach_head_and_trunk() -> None:
    rm = _rm().train()
    rm(torch.randint(0, V, (2, 6)), torch.tensor([6, 3])).sum().backward()
    assert rm.score.weight.grad.abs().sum() > 0 and rm.score.bias.grad.abs().sum() > 0
    assert rm.trunk.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert rm.trunk.embed_tokens.weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path) -> None:
    rm = _rm()
    with torch.no_grad():
        rm.score.bias.fill_(0.25)  # a non-default head must survive the trip
    ids = torch.randint(0, V, (2, 5))
    save_scalar_model(tmp_path / "rm", rm, None, {"reward": {"margin": 0.0}})
    names = set(json.loads((tmp_path / "rm" / "config.json").read_text()))
    assert {"head", "model", "reward"} <= names
    loaded, tokenizer = load_scalar_model(tmp_path / "rm")
    assert tokenizer is None
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.tensor([5, 2])), rm(ids, torch.tensor([5, 2])))
    if loaded.config.tie_embeddings:  # re-tied, not two copies
        assert loaded.trunk.lm_head.weight.data_ptr() == loaded.trunk.embed_tokens.weight.data_ptr()


def test_loading_a_plain_gpt_as_scalar_model_is_a_clear_error(tmp_path) -> None:
    from scratchllm.model.io import save_model

    save_model(tmp_path / "gpt", GPT(model_preset("tiny", vocab_size=V)), None, {})
    with pytest.raises(CheckpointError, match="head"):
        load_scalar_model(tmp_path / "gpt")
