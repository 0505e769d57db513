"""`scratchllm model info --preset mini`: parameter counts per part and training FLOPs per token."""

from __future__ import annotations

import argparse

from scratchllm.config import MODEL_PRESETS, model_preset
from scratchllm.model.gpt import GPT


def describe(preset: str, vocab_size: int, seq_len: int | None = None) -> list[tuple[str, float]]:
    model = GPT(model_preset(preset, vocab_size=vocab_size))
    cfg = model.config
    parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head (untied)": 0}
    for name, p in model.named_parameters():
        key = ("embeddings" if "embed_tokens" in name else "attention" if "self_attn" in name else "mlp" if ".mlp." in name
               else "lm_head (untied)" if "lm_head" in name else "norms")
        parts[key] += p.numel()
    T = seq_len or cfg.max_seq_len
    n = model.num_params(exclude_embeddings=True)
    # 6N for the matmuls of forward+backward, plus 12·L·d·T for attention scores (Kaplan et al. 2020 / PaLM appendix B)
    flops = 6 * n + 12 * cfg.n_layers * cfg.d_model * T
    rows = [(k, float(v)) for k, v in parts.items()]
    rows += [("total", float(model.num_params())), ("non-embedding", float(n)), (f"train FLOPs/token (T={T})", float(flops))]
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm model", description=__doc__)
    parser.add_argument("action", choices=["info"])
    parser.add_argument("--preset", default="mini", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"preset {args.preset}: {model_preset(args.preset, vocab_size=args.vocab_size)}")
    for name, value in describe(args.preset, args.vocab_size, args.seq_len):
        print(f"  {name:28s} {value / 1e6:10.3f} M")
    return 0
