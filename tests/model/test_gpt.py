"""The decoder: equal to transformers' LlamaForCausalLM, SDPA == reference, GQA(K=H) == MHA, cache == recompute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scratchllm.config import ModelConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import KVCache


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_equals_hf_llama(n_kv_heads: int) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = _cfg(n_kv_heads=n_kv_heads)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.resolved_d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = GPT(cfg).eval()
    renamed = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}  # the rename table
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_sdpa_equals_reference(window: int) -> None:
    model = GPT(_cfg(sliding_window=window)).eval()
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :4] = False  # left padding in one row exercises the explicit-mask path
    with torch.no_grad():
        for attention_mask in (None, mask):
            fast = model(ids, attention_mask=attention_mask)
            model.set_attention_impl(use_sdpa=False)
            slow = model(ids, attention_mask=attention_mask)
            model.set_attention_impl(use_sdpa=True)
            assert torch.allclose(fast, slow, atol=1e-5)


def test_gqa_with_all_heads_equals_mha() -> None:
    torch.manual_seed(0)
    mha = GPT(_cfg(n_kv_heads=4)).eval()
    gqa = GPT(_cfg(n_kv_heads=4)).eval()
    gqa.load_state_dict(mha.state_dict())
    # Same weights, but run GQA's grouping code with group size 1 vs MHA: shapes and results must agree.
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(mha(ids), gqa(ids))
    # And a GQA model whose K/V heads are duplicated per group equals the MHA model built from them.
    g = GPT(_cfg(n_kv_heads=2)).eval()
    m = GPT(_cfg(n_kv_heads=4)).eval()
    state = g.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[name].view(2, 8, 32)  # (K, D, d_model)
            state[name] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    m.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(g(ids), m(ids), atol=1e-6)


def test_sliding_window_wider_than_sequence_equals_full() -> None:
    full = GPT(_cfg()).eval()
    windowed = GPT(_cfg(sliding_window=64)).eval()
    windowed.load_state_dict(full.state_dict())
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert torch.allclose(full(ids), windowed(ids), atol=1e-6)


@pytest.mark.parametrize(("n_kv_heads", "window"), [(4, 0), (2, 0), (1, 0), (2, 6)])
def test_kv_cache_decoding_equals_full_recompute(n_kv_heads: int, window: int) -> None:
    cfg = _cfg(n_kv_heads=n_kv_heads, sliding_window=window)
    model = GPT(cfg).eval()
    ids = torch.randint(0, 97, (2, 24))
    cache = KVCache(cfg, batch_size=2)
    with torch.no_grad():
        full = model(ids)
        prefill = model(ids[:, :10], kv_cache=cache)
        assert torch.allclose(prefill, full[:, :10], atol=1e-5)
        for t in range(10, 24):
            step = model(ids[:, t : t + 1], kv_cache=cache)
            assert torch.allclose(step[:, 0], full[:, t], atol=1e-5), t


def test_gradients_reach_every_parameter_and_tied_weights_share_storage() -> None:
    model = GPT(model_preset("tiny", vocab_size=50))
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 50, (2, 16))
    model(ids).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_param_count_and_init_scale() -> None:
    cfg = dataclasses.replace(model_preset("mini"), vocab_size=4096)
    model = GPT(cfg)
    assert 4e6 < model.num_params() < 7e6  # the "~5M" CPU preset
    assert model.num_params(exclude_embeddings=True) == model.num_params() - 4096 * cfg.d_model
    std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * cfg.n_layers) ** 0.5) < 2e-3
