"""`scratchllm model info --preset mini [--model.key=value …]`: parameter counts per part and training FLOPs per token.

For a Mixture-of-Experts model it also reports the parameters one token actually uses (`active`).
"""

from __future__ import annotations

import argparse

from scratchllm.config import (
    MODEL_PRESETS,
    ModelConfig,
    TokenizerConfig,
    apply_overrides,
    model_preset,
)
from scratchllm.model.gpt import GPT


def describe(
    preset: str, vocab_size: int, seq_len: int | None = None, overrides: list[str] | None = None
) -> list[tuple[str, float]]:
    model = GPT(model_config(preset, vocab_size, overrides))
    cfg = model.config
    parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head (untied)": 0}
    routed = 0  # parameters of routed experts: a token uses only n_experts_active / n_experts of them
    for name, p in model.named_parameters():
        key = ("embeddings" if "embed_tokens" in name else "attention" if "self_attn" in name else "mlp" if ".mlp." in name
               else "lm_head (untied)" if "lm_head" in name else "norms")
        parts[key] += p.numel()
        routed += p.numel() if ".mlp.experts." in name else 0
    inactive = routed - routed * cfg.n_experts_active // cfg.n_experts if cfg.n_experts else 0
    T = seq_len or cfg.max_seq_len
    n = model.num_params(exclude_embeddings=True) - inactive
    # 6N for the matmuls of forward+backward, plus 12·L·d·T for attention scores (Kaplan et al. 2020 / PaLM appendix B);
    # N counts active parameters only, since an unchosen expert does no work for that token.
    flops = 6 * n + 12 * cfg.n_layers * cfg.d_model * T
    rows = [(k, float(v)) for k, v in parts.items()]
    rows += [("total", float(model.num_params())), ("non-embedding", float(model.num_params(exclude_embeddings=True)))]
    if cfg.n_experts:
        rows += [("active per token (total)", float(model.num_params() - inactive)), ("active non-embedding", float(n))]
    rows += [(f"train FLOPs/token (T={T})", float(flops))]
    return rows


def model_config(preset: str, vocab_size: int, overrides: list[str] | None = None) -> ModelConfig:
    """The preset with `--model.key=value` overrides applied (unknown keys raise ConfigError listing valid ones)."""
    return apply_overrides({"model": model_preset(preset, vocab_size=vocab_size)}, overrides or [])["model"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm model", description=__doc__,
                                     epilog="any ModelConfig field can be overridden: --model.n_experts=4")
    parser.add_argument("action", choices=["info"])
    parser.add_argument("--preset", default="mini", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig().vocab_size, help="default: the tokenizer's")
    parser.add_argument("--seq-len", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--model.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --model.n_experts=4)")
    # a ConfigError reaches __main__'s one place for user errors: one line, exit 2, like every other command
    print(f"preset {args.preset}: {model_config(args.preset, args.vocab_size, overrides)}")
    for name, value in describe(args.preset, args.vocab_size, args.seq_len, overrides):
        print(f"  {name:28s} {value / 1e6:10.3f} M")
    return 0
