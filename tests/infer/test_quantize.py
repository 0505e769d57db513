"""INT8 weight-only quantization: per-channel error bound, logits near float32, KV-cache generation, smaller files."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save

from scratchllm.config import LoRAConfig, model_preset
from scratchllm.infer import generate_cli
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize,
    quantize_int8,
    quantize_per_channel,
    weight_bytes,
)
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.model.io import model_tensors, save_model
from scratchllm.model.lora import inject_lora
from scratchllm.tokenizer.bpe import Tokenizer


@pytest.fixture
def model() -> GPT:
    return GPT(model_preset("tiny", vocab_size=300, d_model=64, n_heads=4, n_kv_heads=2)).eval()


def test_dequantised_weights_lie_within_half_a_step_of_the_originals() -> None:
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    w[5] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round-to-nearest: at most half a step per channel
    assert (q.abs().amax(1)[torch.arange(48) != 5] == 127).all()  # absmax maps each row's largest weight to ±127
    assert (q[5] == 0).all()


def test_int8_linear_equals_the_linear_of_its_dequantised_weight() -> None:
    linear = torch.nn.Linear(40, 24, bias=True)
    int8 = Int8Linear.from_linear(linear, kernel="dequant")
    x = torch.randn(3, 5, 40)
    reference = torch.nn.functional.linear(x, dequantize(int8.weight_int8, int8.weight_scale), linear.bias)
    assert torch.allclose(int8(x), reference, atol=1e-5)


@pytest.mark.parametrize("kernel, tol", [("dequant", 0.02), ("int8mm", 0.05), ("auto", 0.05)])
def test_int8_logits_close_to_float32(model: GPT, kernel: str, tol: float) -> None:
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        reference = model(ids)
        quantized = quantize_int8(copy.deepcopy(model), kernel=kernel)(ids)
    rel = (quantized - reference).norm() / reference.norm()
    assert rel < tol, float(rel)
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.9, float(agree)


def test_every_linear_and_the_tied_embedding_are_quantized_once(model: GPT) -> None:
    quantize_int8(model)
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.modules())
    assert isinstance(model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.embed_tokens.weight_int8 is model.lm_head.weight_int8  # tied weights stay one tensor


def test_quantized_model_generates_through_the_kv_cache_engine(model: GPT) -> None:
    auto = quantize_int8(copy.deepcopy(model))  # int8mm for the 1-row decode steps, dequant for longer inputs
    out, _ = generate_batch(auto, [[5, 6, 7], [9]], 10, SamplingParams(temperature=0))
    assert [len(row) for row in out] == [10, 10]
    quantize_int8(model, kernel="dequant")  # one kernel throughout: cached decode equals full recompute, as in float32
    prompt = [5, 6, 7]
    out, _ = generate_batch(model, [prompt], 10, SamplingParams(temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0] == ids[len(prompt):]


def test_serialized_weights_shrink_to_about_a_quarter(model: GPT) -> None:
    float_bytes = len(save(model_tensors(model)))
    quantize_int8(model)
    int8_bytes = len(save(model_tensors(model)))
    assert int8_bytes < 0.35 * float_bytes, (int8_bytes, float_bytes)
    assert weight_bytes(model) <= int8_bytes  # the file adds only its header


def test_lora_is_merged_before_quantizing(model: GPT) -> None:
    inject_lora(model, LoRAConfig(r=4, target_modules="q_proj,v_proj"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero update that quantization must not drop
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        reference = model(ids)
        quantize_int8(model)
        quantized = model(ids)
    assert not any("lora" in name for name in model.state_dict())
    assert (quantized - reference).norm() / reference.norm() < 0.02


def test_generate_cli_quantize_flag(model: GPT, tmp_path, capsys) -> None:
    tok = Tokenizer.train(["hello world, hello there " * 50], vocab_size=256 + 20 + 4, progress=False)
    tiny = GPT(model_preset("tiny", vocab_size=tok.vocab_size))
    save_model(tmp_path / "m", tiny, tok, {})
    args = ["--checkpoint", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "5", "--temperature", "0"]
    assert generate_cli.main(args + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    loaded, _ = generate_cli.load_for_inference(tmp_path / "m", "cpu", quantize="int8")
    assert isinstance(loaded.lm_head, Int8Linear)
