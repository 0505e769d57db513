"""`scratchllm export`: a model directory -> a Hugging Face `LlamaForCausalLM` directory, by a rename table.

Our parameter names are HF's minus the `model.` prefix, so export renames, writes `config.json`
(LlamaConfig), `generation_config.json`, and the tokenizer as `tokenizer.json` + `tokenizer_config.json`
with the ChatML chat template. Tests load the result with `transformers` and compare logits and ids.
`--format gguf` writes one llama.cpp file instead (export/gguf.py); `--adapter` carries a LoRA adapter along
(export/peft.py); every export gets a README.md model card (export/model_card.py).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import reply_stop_ids
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


def check_exportable(model: GPT) -> None:
    """Refuse what a Llama-family file cannot hold, before anything is written (no half-exported output)."""
    if model.config.n_experts:
        raise ValueError(
            f"cannot export a Mixture-of-Experts model (--model.n_experts={model.config.n_experts}) as "
            "LlamaForCausalLM: it has one dense MLP per layer and no router, so the experts would be dropped or "
            "misread. Export a dense checkpoint (--model.n_experts=0) instead."
        )
    if model.config.sliding_window:
        raise ValueError("export supports full-attention models only (--model.sliding_window has no Llama equivalent)")


def export_hf(model: GPT, tok: Tokenizer, out: Path) -> Path:
    check_exportable(model)
    out.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(model, tok), indent=2))
    # Every id our own generation stops a reply on (<|im_start|> included: a model that opens a new turn has
    # finished), so `generate` on the export stops where `scratchllm generate` does.
    generation = {"eos_token_id": sorted(reply_stop_ids(tok)), "pad_token_id": tok.pad_id, "do_sample": False}
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
    from scratchllm.export.model_card import write_model_card
    from scratchllm.export.peft import load_any_adapter
    from scratchllm.model.io import load_model
    from scratchllm.model.lora import lora_state_dict, merge_lora

    parser = argparse.ArgumentParser(prog="scratchllm export", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="model directory (e.g. runs/x/sft/final)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (README.md model card included)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf",
                        help="hf: transformers folder; gguf: one file for llama.cpp / Ollama / LM Studio")
    parser.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF weight type")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="LoRA adapter trained on --checkpoint (ours, e.g. runs/x/sft/final_adapter, or PEFT's): "
                             "hf writes it as a PEFT adapter in OUT/adapter; gguf merges it into the weights")
    args = parser.parse_args(argv)
    if args.format == "hf" and args.dtype != "f32":
        parser.error(f"--dtype={args.dtype} applies to --format gguf; the hf format keeps the checkpoint's float32")
    model, tok, _ = load_model(args.checkpoint)
    if args.format == "gguf":
        from scratchllm.export.gguf import export_gguf

        if args.adapter:  # llama.cpp runs one file: the adapter goes into the weights
            load_any_adapter(args.adapter, model)
            merge_lora(model)
        name = f"model-{args.dtype}.gguf"
        export_gguf(model, tok, args.out / name, args.dtype, name=args.checkpoint.resolve().parent.name)
        files = {name: f"llama.cpp: `llama-cli -m {name}`; Ollama: `FROM ./{name}` in a Modelfile"}
    else:
        from scratchllm.export.peft import save_peft_adapter

        export_hf(model, tok, args.out)
        files = {"model.safetensors, config.json, tokenizer.json": "`AutoModelForCausalLM.from_pretrained(OUT)`"}
        if args.adapter:
            adapted = copy.deepcopy(model)  # the base stays plain: the adapter travels beside it
            cfg = load_any_adapter(args.adapter, adapted)
            save_peft_adapter(args.out / "adapter", lora_state_dict(adapted), cfg, base_model=str(args.out))
            files["adapter/"] = "`peft.PeftModel.from_pretrained(base, OUT/adapter)` (LoRA, PEFT format)"
    write_model_card(args.out, model, tok, args.checkpoint, files)
    print(f"exported {args.checkpoint} to {args.out}: {', '.join(files)}")
    return 0
