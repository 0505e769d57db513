"""LoRA adapters travel both ways between scratchllm and PEFT, with equal logits (PEFT itself is the reference)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft  # in the dev extra: a missing package must fail here, not skip
import pytest
import torch
import transformers

from scratchllm.config import LoRAConfig
from scratchllm.export.hf import export_hf
from scratchllm.export.hf import main as export_main
from scratchllm.export.import_hf import main as import_main
from scratchllm.export.peft import AdapterFormatError, load_any_adapter
from scratchllm.infer.generate_cli import load_for_inference
from scratchllm.model.io import save_model
from scratchllm.model.lora import inject_lora, save_adapter
from tests.export.conftest import TRAIN_TEXT


def _randomize_lora_b(model: torch.nn.Module) -> None:
    """B starts at 0 (ΔW = 0): give it values so the adapter really changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok.encode(TRAIN_TEXT)])


def test_our_adapter_loads_in_peft_with_equal_logits(tiny_model, tmp_path: Path) -> None:
    base, tok = tiny_model
    save_model(tmp_path / "base", base, tok, {})
    adapted = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules="q_proj,v_proj,gate_proj,down_proj")
    inject_lora(adapted, cfg)
    _randomize_lora_b(adapted)
    save_adapter(tmp_path / "adapter", adapted, cfg)
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    ids = _ids(tok)
    with torch.no_grad():
        ours, plain, theirs_logits = adapted(ids), base(ids), theirs(ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters, so equality below is not vacuous
    torch.testing.assert_close(theirs_logits, ours, atol=1e-5, rtol=0)
    assert "parameters" in (out / "README.md").read_text()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_ours_with_equal_logits(tiny_model, tmp_path: Path, use_rslora: bool) -> None:
    base, tok = tiny_model
    export_hf(base, tok, tmp_path / "hf")
    save_model(tmp_path / "base", base, tok, {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                           use_rslora=use_rslora, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, lora).eval()
    _randomize_lora_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ids = _ids(tok)
    ours = copy.deepcopy(base)
    load_any_adapter(tmp_path / "peft", ours)  # --lora takes a PEFT folder as it is
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - base(ids)).abs().max() > 1e-2
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=0)
    # import-hf turns the folder into one of ours; --lora (generate/chat/serve) merges it into the base
    assert import_main([str(tmp_path / "peft"), "--out", str(tmp_path / "ours_adapter")]) == 0
    merged, _ = load_for_inference(tmp_path / "base", "cpu", lora=tmp_path / "ours_adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=0)


def test_adapter_variants_plain_lora_cannot_express_are_refused(tiny_model, tmp_path: Path) -> None:
    base, tok = tiny_model
    export_hf(base, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    dora = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="use_dora"):
        load_any_adapter(tmp_path / "dora", copy.deepcopy(base))


def test_adapter_for_another_model_is_refused_by_name(tiny_model, tmp_path: Path) -> None:
    base, tok = tiny_model
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoRAConfig(r=2, alpha=4.0, target_modules="q_proj"))
    save_adapter(tmp_path / "a", adapted, LoRAConfig(r=2, alpha=4.0, target_modules="q_proj"))
    from scratchllm.export.peft import save_peft_adapter
    from scratchllm.model.lora import lora_state_dict

    state = lora_state_dict(adapted)
    state = {k: (v[:, :-1] if k.endswith("lora_A") else v) for k, v in state.items()}  # wrong d_in
    save_peft_adapter(tmp_path / "p", state, LoRAConfig(r=2, alpha=4.0, target_modules="q_proj"))
    with pytest.raises(AdapterFormatError, match=r"layers\.0\.self_attn\.q_proj\.lora_A has shape"):
        load_any_adapter(tmp_path / "p", copy.deepcopy(base))
    meta = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["target_modules"][0].startswith("model.layers.")
