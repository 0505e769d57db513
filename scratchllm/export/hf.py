"""`scratchllm export`: a model directory -> a Hugging Face `LlamaForCausalLM` directory, by a rename table.

Our parameter names are HF's minus the `model.` prefix, so export renames, writes `config.json`
(LlamaConfig), `generation_config.json`, and the tokenizer as `tokenizer.json` + `tokenizer_config.json`
with the ChatML chat template. Tests load the result with `transformers` and compare logits and ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.hf import save_hf_tokenizer_json

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def llama_config(model: GPT, tok: Tokenizer) -> dict[str, Any]:
    cfg = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.resolved_d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": tok.im_end_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }


def export_hf(model: GPT, tok: Tokenizer, out: Path) -> Path:
    if model.config.n_experts:  # checked before anything is written, so no half-exported directory is left behind
        raise ValueError(
            f"cannot export a Mixture-of-Experts model (--model.n_experts={model.config.n_experts}) as "
            "LlamaForCausalLM: it has one dense MLP per layer and no router, so the experts would be dropped or "
            "misread. Export a dense checkpoint (--model.n_experts=0) instead."
        )
    if model.config.sliding_window:
        raise ValueError("export supports full-attention models only (--model.sliding_window has no Llama equivalent)")
    out.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(model, tok), indent=2))
    generation = {"eos_token_id": [tok.im_end_id, tok.eos_id], "pad_token_id": tok.pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_hf_tokenizer_json(tok, out / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_seq_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    return out


def main(argv: list[str]) -> int:
    from scratchllm.train.checkpoint import load_model

    parser = argparse.ArgumentParser(prog="scratchllm export", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, tok, _ = load_model(args.checkpoint)
    export_hf(model, tok, args.out)
    print(f"exported to {args.out}: AutoModelForCausalLM.from_pretrained({str(args.out)!r}) loads it")
    return 0
