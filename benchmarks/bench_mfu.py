"""Training throughput and MFU (issue 14): our GPT vs LlamaForCausalLM vs a nanoGPT-style GPT-2, in one run.

    python benchmarks/bench_mfu.py [--preset gpt2] [--batch 32] [--seq 1024] [--steps 20] [--warmup 5]
                                   [--compile] [--json PATH]
    python benchmarks/bench_mfu.py --decode      # greedy decode tokens/s at batch 1 and 64, ours vs generate

A step is forward + cross-entropy + backward + grad-norm clip 1.0 + AdamW (the project's `build_optimizer`: fused
on CUDA), bf16 autocast over float32 master weights with TF32 on CUDA, float32 on CPU. Each step is timed alone
(CUDA events on CUDA, perf_counter on CPU) and the median is reported. MFU divides the achieved model FLOP/s by a
peak measured in the same run (a large bf16 matmul on CUDA, float32 on CPU), not by the datasheet's.
FLOPs per token follow PaLM (Chowdhery et al. 2022, arXiv:2204.02311, App. B): 6N + 12·L·H·Q·T; `matmul_params`
says which N.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.config import ModelConfig, OptimConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.train.optim import build_optimizer

# GPT-2's 50,257 tokens padded up to a multiple of 64 (as nanoGPT does): the shape the issue's reference figures
# were measured at, and a vocab the tensor cores tile evenly.
GPT2_VOCAB = 50304


class NanoGPTBlock(nn.Module):
    """GPT-2 block: pre-LayerNorm, causal multi-head attention through SDPA, GELU MLP of width 4·d_model."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # q, k, v in one matmul, as GPT-2 stores them
        self.c_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H = self.n_heads
        qkv = self.c_attn(self.ln_1(x)).view(B, T, 3, H, C // H)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPTStyle(nn.Module):
    """The GPT-2 baseline of issue 14: learned absolute positions, LayerNorm, GELU, biases, tied embeddings.

    Written for this benchmark after the GPT-2 paper (Radford et al. 2019), the shape nanoGPT trains; init
    N(0, 0.02) with residual output projections scaled by 1/√(2·L), biases zero."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(NanoGPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.c_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> logits (B, T, V)."""
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_llama(cfg: ModelConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.resolved_d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa", use_cache=False,
    )).float()  # float32 master weights whatever default dtype this transformers version picks


def build_models(cfg: ModelConfig, names: list[str]) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """name -> (model, ids (B, T) -> logits (B, T, V)), each initialised from the same seed, on CPU, float32."""
    builders: dict[str, Callable[[], tuple[nn.Module, Callable[[Tensor], Tensor]]]] = {
        "ours": lambda: (m := GPT(cfg), m),
        # subtle: use_cache=False, or every training forward would also fill a DynamicCache.
        "llama": lambda: (m := build_llama(cfg), lambda ids: m(input_ids=ids, use_cache=False).logits),
        "nanogpt": lambda: (
            m := NanoGPTStyle(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len), m),
    }
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = builders[name]()
    return models


LABELS = {"ours": "scratchllm GPT", "llama": "LlamaForCausalLM", "nanogpt": "nanoGPT-style GPT-2"}


def matmul_params(model: nn.Module) -> int:
    """N of 6N: every nn.Linear weight and bias, lm_head included, each tensor once.

    These are the parameters that multiply activations, 2 FLOPs per parameter per token forward and 4 backward.
    Left out: embedding tables (a lookup, no FLOPs; a tied lm_head still counts, as the output matmul), learned
    position tables, norm gains (elementwise). For GPT-2 124M this is within 0.05% of nanoGPT's `get_num_params`
    (which keeps norm gains), so MFU here compares with the issue's reference figures."""
    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return n


def flops_per_token(n_matmul: int, cfg: ModelConfig, seq: int) -> int:
    """6N + 12·L·H·Q·T (PaLM App. B): weights forward + backward, plus attention scores and values at length T.

    subtle: the attention term counts the full T×T square, as PaLM and nanoGPT do; a causal kernel computes about
    half of it, so this convention credits every model the same unexecuted FLOPs."""
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq


class Timer:
    """Wall time of one region: CUDA events on CUDA (no host sync inside the region), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.seconds_cpu = time.perf_counter() - self.t0

    @property
    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.seconds_cpu


def measure_peak_flops(device: torch.device, n: int, reps: int) -> tuple[float, str]:
    """FLOP/s of an n×n×n matmul (2n³ FLOPs), the median of `reps` timed ones after as many untimed ones.

    subtle: the untimed matmuls also let a GPU reach its boost clock; the first one alone also picks the kernel."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(max(reps, 2)):
        a @ b
    times = []
    for _ in range(reps):
        with Timer(device) as timer:
            a @ b
        times.append(timer)
    return 2 * n**3 / statistics.median(t.seconds for t in times), str(dtype).removeprefix("torch.")


def time_training(
    model: nn.Module, forward: Callable[[Tensor], Tensor], ids: Tensor, args: argparse.Namespace,
    device: torch.device,
) -> tuple[list[float], float]:
    """Seconds of each timed step and the last loss; `args.warmup` untimed steps first (compilation happens there)."""
    model.train()
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(lr=6e-4), device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    bf16 = device.type == "cuda"

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        # the autocast context is built inside, so that torch.compile traces it rather than a captured object
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    if args.compile:
        loss_of = torch.compile(loss_of)  # forward + cross-entropy in one graph, for every model alike

    def step() -> Tensor:
        loss = loss_of(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    timers = []
    for _ in range(args.steps):
        with Timer(device) as timer:
            loss = step()
        timers.append(timer)
    return [t.seconds for t in timers], float(loss)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_training(args: argparse.Namespace, device: torch.device) -> dict:
    cfg = model_preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq)
    peak, peak_dtype = measure_peak_flops(device, args.peak_n, args.peak_reps)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    tokens_per_step = args.batch * args.seq
    rows = []
    for name in args.models:
        model, forward = build_models(cfg, [name])[name]
        model.to(device)
        assert all(p.dtype == torch.float32 for p in model.parameters()), f"{name}: master weights must be float32"
        n_matmul = matmul_params(model)
        flops = flops_per_token(n_matmul, cfg, args.seq)
        row = dict(model=name, label=LABELS[name], params=sum(p.numel() for p in model.parameters()),
                   matmul_params=n_matmul, flops_per_token=flops)
        try:
            step_s, loss = time_training(model, forward, ids, args, device)
        except Exception as exc:  # one model failing (OOM, a compile error) must not cost the others' figures
            traceback.print_exc()
            row.update(error=f"{type(exc).__name__}: {exc}"[:500], tokens_per_s=None, mfu=None)
        else:
            median_s = statistics.median(step_s)
            tps = tokens_per_step / median_s
            row.update(step_ms_median=median_s * 1e3, step_ms_min=min(step_s) * 1e3, step_ms_max=max(step_s) * 1e3,
                       tokens_per_s=tps, mfu=tps * flops / peak, last_loss=loss)
            print(f"done: {LABELS[name]} {tps:,.0f} tokens/s", flush=True)  # survives a later timeout
        rows.append(row)
        del model, forward
        if args.compile:
            torch._dynamo.reset()  # drop the compiled graphs, which keep the model's tensors alive
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "ours"), None)
    for row in rows:
        row["ratio_to_ours"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
    return dict(
        mode="train", device=device_name(device), torch=torch.__version__,
        settings=dict(
            preset=args.preset, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, d_ff=cfg.resolved_d_ff, vocab_size=cfg.vocab_size, batch=args.batch,
            seq=args.seq, warmup=args.warmup, steps=args.steps, compile=args.compile,
            dtype="bf16 autocast, float32 master weights, TF32" if device.type == "cuda" else "float32",
            optimizer="AdamW (fused)" if device.type == "cuda" else "AdamW (foreach)", grad_clip=1.0,
        ),
        peak_flops=peak, peak_dtype=peak_dtype, peak_matmul_n=args.peak_n, models=rows,
    )


def print_training(result: dict) -> None:
    s = result["settings"]
    print(f"device: {result['device']}   torch {result['torch']}")
    print(f"settings: preset {s['preset']} (d_model {s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads, "
          f"vocab {s['vocab_size']}), micro-batch {s['batch']} x T={s['seq']}, {s['dtype']}, {s['optimizer']}, "
          f"clip {s['grad_clip']}, compile={s['compile']}, warm-up {s['warmup']} + {s['steps']} timed steps (median)")
    print(f"measured peak: {result['peak_flops'] / 1e12:.2f} TFLOP/s "
          f"({result['peak_dtype']} {result['peak_matmul_n']}^3 matmul, median)")
    def row(r: dict) -> str:
        ratio = f"{r['ratio_to_ours']:.2f}" if r["ratio_to_ours"] is not None else "-"
        return (f"{r['label']:<22} {r['params'] / 1e6:8.2f}M {r['matmul_params'] / 1e6:8.2f}M "
                f"{r['step_ms_median']:9.1f} {r['tokens_per_s']:11,.0f} {100 * r['mfu']:7.2f} {ratio:>8}")

    print_rows(result["models"], f"{'model':<22} {'params':>9} {'N (6N)':>9} {'step ms':>9} {'tokens/s':>11} "
               f"{'MFU %':>7} {'vs ours':>8}", lambda r: f"{r['label']:<22}", row)


def print_rows(rows: list[dict], header: str, name: Callable[[dict], str], row: Callable[[dict], str]) -> None:
    """A table of result rows; a row that failed prints its name and the error instead of figures."""
    print(header)
    for r in rows:
        print(f"{name(r)} failed: {r['error']}" if r.get("error") else row(r))


def run_decode(args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy decode tokens/s, ours (KV cache, `generate_batch`) vs `transformers` `generate` on the same weights."""
    from transformers import GenerationConfig

    from scratchllm.export.hf import to_hf_name
    from scratchllm.infer.engine import generate_batch
    from scratchllm.infer.sampling import SamplingParams

    max_len = args.prompt_len + args.new_tokens
    cfg = model_preset(args.preset, vocab_size=args.vocab_size, max_seq_len=max_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = build_models(cfg, ["ours"])["ours"][0].to(device=device, dtype=dtype).eval()
    hf = build_llama(cfg)
    missing, unexpected = hf.load_state_dict({to_hf_name(k): v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    hf = hf.to(device=device, dtype=dtype).eval()
    rows = []
    for batch in args.decode_batches:
        torch.manual_seed(2)
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)

        def ours_run(prompts: Tensor = prompts) -> list[list[int]]:
            return generate_batch(ours, prompts.tolist(), args.new_tokens, SamplingParams(temperature=0.0))[0]

        def hf_run(prompts: Tensor = prompts, **kw: object) -> list[list[int]]:
            gen = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=0, eos_token_id=None, **kw)
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=gen)
            return out[:, args.prompt_len:].tolist()

        ours_first: list[int] = []
        variants: list[tuple[str, Callable[[], list[list[int]]]]] = [
            ("ours", ours_run), ("transformers default", hf_run)]
        if device.type == "cuda":  # a static cache makes `generate` compile its decode step on CUDA
            variants.append(("transformers static+compile", lambda: hf_run(cache_implementation="static")))
        for label, fn in variants:
            try:
                with torch.inference_mode():
                    for _ in range(args.warmup_decode):
                        fn()
                    times, out = [], []
                    for _ in range(args.decode_reps):
                        with Timer(device) as timer:
                            out = fn()
                        times.append(timer)
            except Exception as exc:  # e.g. generate's compile failing: keep the other rows
                traceback.print_exc()
                rows.append(dict(model=label, batch=batch, error=f"{type(exc).__name__}: {exc}"[:500]))
                continue
            median_s = statistics.median(t.seconds for t in times)
            n_tokens = sum(len(row) for row in out)
            if label == "ours":
                ours_first = out[0]
            # Same weights, greedy: the first row should match ours token for token (float32; bf16 may drift late).
            agree = sum(a == b for a, b in zip(out[0], ours_first)) / len(ours_first) if ours_first else None
            rows.append(dict(model=label, batch=batch, new_tokens=n_tokens, seconds_median=median_s,
                             tokens_per_s=n_tokens / median_s, first_row_agreement=agree))
            print(f"done: {label} batch {batch} {n_tokens / median_s:,.0f} tokens/s", flush=True)
    return dict(
        mode="decode", device=device_name(device), torch=torch.__version__,
        settings=dict(preset=args.preset, vocab_size=cfg.vocab_size, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, dtype=str(dtype).removeprefix("torch."), greedy=True),
        models=rows,
    )


def print_decode(result: dict) -> None:
    s = result["settings"]
    print(f"device: {result['device']}   torch {result['torch']}")
    print(f"settings: preset {s['preset']}, {s['dtype']}, greedy, prompt {s['prompt_len']}, "
          f"{s['new_tokens']} new tokens; ours uses its KV cache, eager")
    print_rows(result["models"],
               f"{'model':<30} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>11} {'same as ours':>12}",
               lambda r: f"{r['model']:<30} {r['batch']:>5}",
               lambda r: (f"{r['model']:<30} {r['batch']:>5} {r['new_tokens']:>7} {r['seconds_median']:8.3f} "
                          f"{r['tokens_per_s']:11,.0f} {format(r['first_row_agreement'] or 0, '12.0%')}"))


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--vocab-size", type=int, default=GPT2_VOCAB)
    parser.add_argument("--batch", type=int, default=32 if cuda else 2, help="micro-batch (sequences per step)")
    parser.add_argument("--seq", type=int, default=1024 if cuda else 128, help="tokens per sequence (T)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's forward + loss")
    parser.add_argument("--models", default="ours,llama,nanogpt", help="comma-separated subset of " + ",".join(LABELS))
    parser.add_argument("--peak-n", type=int, default=8192 if cuda else 1024, help="size of the peak-FLOP/s matmul")
    parser.add_argument("--peak-reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--decode", action="store_true", help="measure greedy decode tokens/s instead of training")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-reps", type=int, default=3)
    parser.add_argument("--warmup-decode", type=int, default=1)
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in LABELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(LABELS)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left outside autocast

    if args.decode:
        result = run_decode(args, device)
        print_decode(result)
    else:
        result = run_training(args, device)
        print_training(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
