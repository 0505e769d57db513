"""CPU time to quality: our pretraining recipe against a nanoGPT-style recipe of about the same size, one run.

    python benchmarks/bench_time_to_loss.py [--steps 300] [--eval-every 25] [--tokenizer runs/default/tokenizer/tokenizer.json]

Both models train on the bundled text (corpus/pretrain) with the same tokenizer and the same batches (16 x 256
tokens, seeded), and are evaluated on the same held-out windows. The baseline trains `--steps` steps; its final
validation bits-per-byte is the target. The script then prints the steps and seconds each recipe needed to reach
that target, and their ratio (seconds from the same run on the same machine; compare the ratio, not the seconds).

Baseline (GPT-2 as nanoGPT writes it): LayerNorm, GELU MLP of 4 x d_model, learned positions, tied embeddings,
AdamW with nanoGPT's Shakespeare settings (lr 1e-3, betas (0.9, 0.99), weight decay 0.1, 100 warmup steps, cosine
to 1e-4 over the run, gradient clip 1.0). One deviation, in the baseline's favour: dropout 0 instead of 0.2, since
a run shorter than one epoch does not overfit. Its shape is ours (d_model 384, 3 layers, 6 heads of 64): with the
wider MLP it has ~8% more parameters than ours.

Ours: the pipeline's pretraining recipe on text alone (`mini` preset: RMSNorm, RoPE, SwiGLU, GQA; the
pretrain stage's OptimConfig).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratchllm.config import OptimConfig, TokenizerConfig, model_preset  # noqa: E402
from scratchllm.data.batches import LMWindows, sequential_windows  # noqa: E402
from scratchllm.eval.metrics import evaluate_lm, token_byte_lengths  # noqa: E402
from scratchllm.model.gpt import GPT  # noqa: E402
from scratchllm.tokenizer.bpe import Tokenizer  # noqa: E402
from scratchllm.tokenizer.cli import train_tokenizer_from_files  # noqa: E402
from scratchllm.train.optim import build_optimizer, lr_at  # noqa: E402
from scratchllm.train.stages.pretrain import DEFAULT_LOOP, DEFAULT_OPTIM, shard_for  # noqa: E402


class NanoBlock(nn.Module):
    """Pre-LayerNorm block: causal self-attention then a 4x GELU MLP, each added to the residual."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT-2: token + learned position embeddings, blocks, final LayerNorm, tied lm_head."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, block_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(NanoBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2 init, residual projections scaled by depth (nanoGPT)
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


NANOGPT_SHAKESPEARE = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0)


def train_curve(model: nn.Module, optim: OptimConfig, windows: LMWindows, evaluate, steps: int,
                eval_every: int) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, val bpb) at step 0, every `eval_every` steps and at the end."""
    optimizer = build_optimizer(list(model.named_parameters()), optim, torch.device("cpu"))
    curve, seconds = [(0, 0.0, evaluate(model))], 0.0
    for step in range(steps):
        batch = windows.batch(step)
        start = time.perf_counter()
        for group in optimizer.param_groups:  # lr_scale: Muon's groups run on their own scale (train/optim.py)
            group["lr"] = lr_at(step / steps, step, optim) * group.get("lr_scale", 1.0)
        loss = F.cross_entropy(model(batch["ids"]).flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, seconds, evaluate(model)))
            print(f"  step {step + 1:4d}  {seconds:7.1f} s  val bpb {curve[-1][2]:.4f}", flush=True)
    return curve


def first_reaching(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or below `target` bits-per-byte; None if never."""
    return next(((step, seconds) for step, seconds, bpb in curve if bpb <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_LOOP.max_steps, help="the baseline's steps (N)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 16 x 256 tokens")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: train one, ~5 s)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "corpus" / "pretrain")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    cache = ROOT / "runs" / "bench_time_to_loss"
    tok_path = args.tokenizer or cache / "tokenizer.json"
    if args.tokenizer is None:
        train_tokenizer_from_files(sorted((args.corpus / "train").glob("*.txt")), TokenizerConfig().vocab_size, tok_path,
                                   progress=False)
    tok = Tokenizer.load(tok_path)
    train_tokens = shard_for(args.corpus / "train", tok, cache / "shards")
    val_tokens = shard_for(args.corpus / "val", tok, cache / "shards")
    batch_size, seq_len = DEFAULT_LOOP.batch_size, DEFAULT_LOOP.seq_len
    windows = LMWindows(train_tokens, seq_len, batch_size, seed=args.seed)
    token_bytes = token_byte_lengths(tok, tok.vocab_size)

    def evaluate(model: nn.Module) -> float:
        model.eval()
        bpb = evaluate_lm(model, sequential_windows(val_tokens, seq_len, batch_size, args.eval_batches), token_bytes)["val_bpb"]
        model.train()
        return bpb

    ours_cfg = model_preset("mini", vocab_size=tok.vocab_size)
    torch.manual_seed(args.seed)
    baseline = NanoGPT(tok.vocab_size, ours_cfg.d_model, ours_cfg.n_layers, n_heads=6, block_size=seq_len)
    torch.manual_seed(args.seed)
    ours = GPT(ours_cfg)
    n_base, n_ours = sum(p.numel() for p in baseline.parameters()), ours.num_params()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {train_tokens.size / 1e6:.2f}M train tokens, "
          f"batch {batch_size} x {seq_len}")
    print(f"baseline (nanoGPT-style): {n_base / 1e6:.2f}M parameters, {args.steps} steps")
    base_curve = train_curve(baseline, NANOGPT_SHAKESPEARE, windows, evaluate, args.steps, args.eval_every)
    target = base_curve[-1][2]
    print(f"ours ({n_ours / 1e6:.2f}M parameters), until it reaches the baseline's final {target:.4f} bpb "
          f"(at most {args.steps} steps)")
    ours_curve = train_curve(ours, DEFAULT_OPTIM, windows, evaluate, args.steps, args.eval_every)
    base_hit, ours_hit = first_reaching(base_curve, target), first_reaching(ours_curve, target)
    print(f"\ntarget: {target:.4f} val bpb (the baseline after {args.steps} steps); ours after {args.steps}: "
          f"{ours_curve[-1][2]:.4f}")
    print(f"baseline  reached it at step {base_hit[0]:4d} in {base_hit[1]:7.1f} s")
    if ours_hit is None:
        print(f"ours      did not reach it in {args.steps} steps")
        return
    print(f"ours      reached it at step {ours_hit[0]:4d} in {ours_hit[1]:7.1f} s "
          f"(first evaluation at or below it; evaluations every {args.eval_every} steps)")
    print(f"ratio ours/baseline: steps {ours_hit[0] / base_hit[0]:.2f}, seconds {ours_hit[1] / base_hit[1]:.2f}")


if __name__ == "__main__":
    main()
