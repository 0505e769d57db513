"""Training-step throughput: our GPT vs transformers' LlamaForCausalLM of the same shape, same run.

    python benchmarks/bench_train_step.py [--preset mini] [--batch 16] [--seq 256] [--steps 5] [--compile] [--muon-lr 0.02]

Forward + backward + AdamW step, float32 on CPU (bf16 autocast on CUDA); prints tokens/s and the ratio. With
--muon-lr, also our model with the pretraining stage's optimizer (Muon for the blocks' matrices, AdamW for the
rest; train/optim.py), and its cost against plain AdamW in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from scratchllm.config import OptimConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.train.optim import build_optimizer


def tokens_per_s(model: torch.nn.Module, forward, ids: torch.Tensor, steps: int, device: str,
                 opt: torch.optim.Optimizer | None = None) -> float:
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with ctx:
            logits = forward(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return ids[:, :-1].numel() * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (the same settings)")
    parser.add_argument("--muon-lr", type=float, default=0.0, help="> 0: also time ours with Muon (train/optim.py)")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_preset(args.preset, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    ours = GPT(cfg).to(args.device)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.resolved_d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )).to(args.device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    ours_forward, hf_forward = ours, lambda x: hf(x).logits
    if args.compile:
        ours_forward, hf_forward = torch.compile(ours_forward), torch.compile(hf_forward)
    results = {}
    for _ in range(2):  # interleave to share whatever else the machine is doing fairly
        results.setdefault("ours", []).append(tokens_per_s(ours, ours_forward, ids, args.steps, args.device))
        results.setdefault("hf", []).append(tokens_per_s(hf, hf_forward, ids, args.steps, args.device))
        if args.muon_lr > 0:
            muon = build_optimizer(list(ours.named_parameters()), OptimConfig(lr=1e-4, muon_lr=args.muon_lr),
                                   torch.device(args.device))
            results.setdefault("muon", []).append(tokens_per_s(ours, ours_forward, ids, args.steps, args.device, muon))
    ours_tps, hf_tps = max(results["ours"]), max(results["hf"])
    print(f"device={args.device} torch={torch.__version__} preset={args.preset} params={ours.num_params() / 1e6:.2f}M "
          f"batch={args.batch}x{args.seq} compile={args.compile}")
    print(f"ours            {ours_tps:10.0f} tokens/s")
    print(f"LlamaForCausalLM {hf_tps:10.0f} tokens/s")
    print(f"ratio ours/hf   {ours_tps / hf_tps:10.2f}")
    if args.muon_lr > 0:
        muon_tps = max(results["muon"])
        print(f"ours with Muon  {muon_tps:10.0f} tokens/s")
        print(f"step time Muon/AdamW {ours_tps / muon_tps:5.2f}")


if __name__ == "__main__":
    main()
