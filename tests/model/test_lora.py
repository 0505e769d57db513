"""LoRA: a hand-computed update, starts as a no-op, merged == unmerged, only adapters train, adapter round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchllm.config import LoRAConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.lora import (
    LoRALinear,
    count_trainable,
    has_lora,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

V = 300


class Block(nn.Module):
    """A stand-in with Llama names: attention projections, an MLP and a tied output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.q_proj, self.v_proj, self.gate_proj = nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Linear(4, 6)
        self.down_proj = nn.Linear(6, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        x = x + self.q_proj(x) + self.v_proj(x)
        return self.lm_head(x + self.down_proj(torch.relu(self.gate_proj(x))))


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=V)).eval()


def _randomise_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def test_lora_linear_hand_computed() -> None:
    # W₀ = I (2×2), r = 1, α = 2 -> scaling 2. A = [[1, 0]], B = [[0], [1]] -> ΔW = 2·BA = [[0, 0], [2, 0]].
    # x = [1, 1]: W₀x = [1, 1], ΔWx = [0, 2] -> y = [1, 3].
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = LoRALinear(base, r=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
    x = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(layer(x), torch.tensor([[1.0, 3.0]]))
    layer.merge()
    assert torch.allclose(base.weight, torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    assert torch.allclose(layer(x), torch.tensor([[1.0, 3.0]]))
    layer.unmerge()
    assert torch.allclose(base.weight, torch.eye(2)) and torch.allclose(layer(x), torch.tensor([[1.0, 3.0]]))


def test_count_trainable_hand_computed() -> None:
    # Linear 4->3 without bias: 12 weights. r = 2 adds A (2×4) = 8 and B (3×2) = 6 -> trainable 14 of 26.
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 3, bias=False))
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="q_proj"))
    assert count_trainable(model) == (14, 26)


def test_targets_match_last_name_component_and_lm_head_is_never_default() -> None:
    model = Block()
    assert inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="q_proj, gate_proj")) == ["q_proj", "gate_proj"]
    assert inject_lora(Block(), LoRAConfig(r=2, alpha=4, target_modules="all-linear")) == [
        "q_proj", "v_proj", "gate_proj", "down_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(Block(), LoRAConfig(r=2, alpha=4, target_modules="proj"))  # no substring matching
    with pytest.raises(ValueError, match="tied"):
        inject_lora(Block(), LoRAConfig(r=2, alpha=4, target_modules="lm_head"))
    replaced = inject_lora(_gpt(), LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    assert len(replaced) == 2 * 7 and not any("lm_head" in r for r in replaced)  # 2 layers × q,k,v,o,gate,up,down


def test_injecting_twice_never_nests_adapters() -> None:
    model = Block()
    cfg = LoRAConfig(r=2, alpha=4, target_modules="all-linear")
    inject_lora(model, cfg)
    before = set(lora_state_dict(model))
    assert inject_lora(model, cfg) == [] and set(lora_state_dict(model)) == before


def test_starts_as_identity_then_merged_equals_unmerged() -> None:
    model = _gpt()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        before = model(ids)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="q_proj,v_proj,gate_proj"))
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: exactly the base model
    _randomise_b(model)
    with torch.no_grad():
        unmerged = model(ids)
        assert not torch.allclose(unmerged, before, atol=1e-4)  # the adapters do act
        merged = merge_lora(model)(ids)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not has_lora(model) and not lora_state_dict(model)
    assert all(type(m) is not LoRALinear for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_only_adapters_receive_gradients() -> None:
    model = _gpt().train()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    _randomise_b(model)  # else ∂L/∂A = 0 exactly (B = 0), and A would look frozen
    model(torch.randint(0, V, (2, 8))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name
    trainable, total = count_trainable(model)
    assert 0 < trainable < 0.2 * total


def test_adapter_round_trip(tmp_path) -> None:
    model = _gpt()
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    inject_lora(model, cfg)
    _randomise_b(model)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        expected = model(ids)
    save_adapter(tmp_path / "adapter", model, cfg)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = _gpt()
    loaded_cfg = load_adapter(tmp_path / "adapter", fresh)
    assert (loaded_cfg.r, loaded_cfg.alpha, loaded_cfg.target_modules) == (4, 8.0, "q_proj,v_proj")
    with torch.no_grad():
        assert torch.allclose(fresh(ids), expected, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(tmp_path / "adapter", Block())  # no layers.* names there


def test_inference_loads_an_adapter_on_a_base_checkpoint(tmp_path, capsys) -> None:
    from scratchllm.infer import generate_cli
    from scratchllm.model.io import save_model
    from scratchllm.tokenizer.bpe import Tokenizer

    tok = Tokenizer.train(["hello world, hello there " * 50], vocab_size=256 + 20 + 4, progress=False)
    torch.manual_seed(0)
    base = GPT(model_preset("tiny", vocab_size=tok.vocab_size)).eval()
    save_model(tmp_path / "base", base, tok, {})
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    inject_lora(base, cfg)
    _randomise_b(base)  # an adapter that changes the outputs
    save_adapter(tmp_path / "adapter", base, cfg)
    ids = torch.tensor([tok.encode("hello world")])
    loaded, _ = generate_cli.load_for_inference(tmp_path / "base", "cpu", lora=tmp_path / "adapter")
    plain, _ = generate_cli.load_for_inference(tmp_path / "base", "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(ids), base(ids), atol=1e-5)  # base + adapter, merged
        assert not torch.allclose(plain(ids), base(ids), atol=1e-3)
    assert not has_lora(loaded)  # merged for inference: no extra matmuls per token
    args = ["--checkpoint", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"), "--prompt", "hello",
            "--max-new-tokens", "4", "--temperature", "0"]
    assert generate_cli.main(args) == 0 and capsys.readouterr().out.startswith("hello")
