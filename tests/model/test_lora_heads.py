"""LoRA merged == unmerged, starts as a no-op, trains only adapters; reward read at the last real token."""

from __future__ import annotations

import torch

from scratchllm.config import LoRAConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.heads import ScalarModel, load_scalar_model, save_scalar_model
from scratchllm.model.lora import count_trainable, inject_lora, load_adapter, merge_lora, save_adapter


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=64)).eval()


def test_lora_starts_as_identity_and_merge_equals_unmerged(tmp_path) -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids)
    cfg = LoRAConfig(r=4, alpha=8, target_modules="q_proj,v_proj,gate_proj")
    replaced = inject_lora(model, cfg)
    assert len(replaced) == 6 and not any("lm_head" in r for r in replaced)
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        unmerged = model(ids)
    save_adapter(tmp_path / "adapter", model, cfg)
    merged_model = merge_lora(model)
    with torch.no_grad():
        assert torch.allclose(merged_model(ids), unmerged, atol=1e-5)
    fresh = _model()
    load_adapter(tmp_path / "adapter", fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(ids), unmerged, atol=1e-5)


def test_only_adapters_receive_gradients() -> None:
    model = _model().train()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    model(torch.randint(0, 64, (2, 8))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    trainable, total = count_trainable(model)
    assert 0 < trainable < 0.2 * total


def test_reward_read_at_last_real_token_regardless_of_padding(tmp_path) -> None:
    rm = ScalarModel(_model()).eval()
    seq = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = rm(seq, torch.tensor([4]))
        for pad_value, extra in [(0, 3), (63, 7)]:
            padded = torch.cat([seq, torch.full((1, extra), pad_value)], dim=1)
            assert torch.allclose(rm(padded, torch.tensor([4])), alone, atol=1e-6)
        # The reading position matters: the score at the pad position differs.
        padded = torch.cat([seq, torch.full((1, 3), 0)], dim=1)
        assert not torch.allclose(rm(padded, torch.tensor([7])), alone)
    save_scalar_model(tmp_path / "rm", rm, None, {})  # no tokenizer: none fits this 64-token toy vocabulary
    loaded, _ = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.allclose(loaded(seq, torch.tensor([4])), alone)


def test_scalar_head_gradients_reach_head_and_trunk() -> None:
    rm = ScalarModel(_model()).train()
    rm(torch.randint(0, 64, (2, 6)), torch.tensor([6, 3])).sum().backward()
    assert rm.score.weight.grad.abs().sum() > 0
    assert rm.trunk.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
