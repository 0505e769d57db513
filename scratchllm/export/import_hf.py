"""`scratchllm import-hf DIR --out DIR`: a local Llama-family HF checkpoint -> our model directory.

DIR may also be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors): it becomes one of
our adapter folders, which `--lora` and `export --adapter` take (PEFT folders are also read directly).

The inverse rename table of export/hf.py. The tokenizer is rebuilt from the HF tokenizer.json when it is a
byte-level BPE (vocab + merges in the GPT-2 byte alphabet); other tokenizers are refused with a reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from scratchllm.config import ModelConfig
from scratchllm.export.peft import is_peft_adapter, read_peft_adapter
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer, TokenizerError
from scratchllm.tokenizer.hf import bytes_to_unicode


def model_config_from_hf(cfg: dict) -> ModelConfig:
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2", None) or cfg.get("attention_bias"):
        raise ValueError(f"unsupported model_type {cfg.get('model_type')!r} (Llama-family without attention bias only)")
    return ModelConfig(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        d_ff=cfg["intermediate_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), norm_eps=cfg.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def tokenizer_from_hf(path: Path) -> Tokenizer:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizers can be imported (got {model.get('type')})")
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    vocab: list[bytes] = [b""] * len(model["vocab"])
    for token, idx in model["vocab"].items():
        vocab[idx] = bytes(u2b[c] for c in token)
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    pattern = None
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            pattern = step["pattern"].get("Regex")
    if pattern is None:
        raise TokenizerError(f"{path}: no Split regex pre-tokenizer found; cannot reproduce its pre-tokenization")
    ranks = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    for merge in model.get("merges", []):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((ranks[bytes(u2b[c] for c in left)], ranks[bytes(u2b[c] for c in right)]))
    return Tokenizer(vocab, specials, pattern, merges)


def main(argv: list[str]) -> int:
    from scratchllm.model.io import save_model
    from scratchllm.model.lora import save_adapter_state

    parser = argparse.ArgumentParser(prog="scratchllm import-hf", description=__doc__)
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if is_peft_adapter(args.hf_dir):
        lora_cfg, adapter = read_peft_adapter(args.hf_dir)
        save_adapter_state(args.out, adapter, lora_cfg)
        print(f"imported PEFT adapter {args.hf_dir} -> {args.out} (r={lora_cfg.r}, alpha={lora_cfg.alpha:g}, "
              f"{len(adapter) // 2} modules); use it with --lora {args.out}")
        return 0
    if not (args.hf_dir / "config.json").is_file():
        parser.error(f"{args.hf_dir}: no config.json (a transformers model folder) and no adapter_config.json "
                     "naming a peft_type (a PEFT adapter folder)")
    cfg = model_config_from_hf(json.loads((args.hf_dir / "config.json").read_text()))
    model = GPT(cfg)
    state = {}
    for shard in sorted(args.hf_dir.glob("*.safetensors")):
        state.update({k.removeprefix("model."): v for k, v in load_file(str(shard)).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tok = tokenizer_from_hf(args.hf_dir / "tokenizer.json")
    save_model(args.out, model, tok, {"imported_from": str(args.hf_dir)})
    print(f"imported {args.hf_dir} -> {args.out} ({model.num_params() / 1e6:.1f}M parameters)")
    return 0
