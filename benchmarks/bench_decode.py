"""Decode throughput: the serving engine vs `transformers` `generate` on the same weights, and the KV cache vs none.

    python benchmarks/bench_decode.py [--preset mini] [--batches 1 8 32] [--new 128] [--threads 2] [--no-compile]
    python benchmarks/bench_decode.py --recompute [--new 256 1024]    # the KV-cache section only

Engine vs transformers (the reference): a random-init model exported with export/hf.py and loaded as
`LlamaForCausalLM`, greedy, 16-token prompts, `--new` tokens per row with no stop token, both in one run; tokens/s =
rows x new tokens / wall time including the prefill, best of --repeats interleaved rounds (a shared host's
load comes in bursts; the best round is the one least disturbed). The ratio is also given by CPU time (best
round of each), which a busy host distorts less than wall time. The serving engine is built once per batch size,
as a server builds it at start. Our side is infer/continuous.py (what `scratchllm serve` runs)
and infer/engine.py `generate` (evaluation and RL rollouts). The share of rows whose greedy tokens equal
transformers' is printed beside the speed: a fast engine that decodes something else proves nothing.

--per-step adds CPU milliseconds per decode step: the weight matmuls alone as F.linear runs them (what transformers'
step pays for them; ours runs them on (in, out) copies, faster for a few rows), ours, transformers.

--recompute: with the cache each step is one position (linear), without it every step re-runs the whole sequence
(quadratic); prints the ratio cache / no-cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scratchllm.config import model_preset
from scratchllm.infer.continuous import ContinuousEngine, Request, TokenLogprob
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.train.reference_step import measure_reference_step

GREEDY = SamplingParams(temperature=0)


@dataclass(eq=False)
class Collect(Request):
    tokens: list[int] = field(default_factory=list)

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        self.tokens.append(token)
        return False


def serving_engine(model: GPT, batch: int, compile: bool = False) -> ContinuousEngine:
    """Built once per batch size, as a server builds it once at start (fusing the weights is start-up work); with
    `compile`, returned once its compiled step is built (the time that takes is printed: what a server spends in
    the background before its steps get faster)."""
    start = time.perf_counter()
    engine = ContinuousEngine(model, frozenset(), max_batch=batch, max_queue=batch, prefill_chunk=16 * batch,
                              compile=compile)
    if compile:
        built = engine.forward.wait_compiled()
        print(f"batch {batch}: compiled step {'built' if built else 'FAILED: ' + str(engine.forward.compile_error)} "
              f"in {time.perf_counter() - start:.0f} s (graphs already built for another batch size are reused)",
              flush=True)
    return engine


@torch.no_grad()
def continuous(engine: ContinuousEngine, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    requests = [Collect(p, n_new, GREEDY) for p in prompts]
    for r in requests:
        engine.submit(r)
    while engine.busy_rows or engine.queued:
        engine.step()
    return [r.tokens for r in requests]


@torch.no_grad()
def transformers_generate(hf, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)  # equal lengths: no padding, no attention mask needed
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1] :].tolist()


def timed(fn, *args) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds of this process, result)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, out


def against_transformers(args: argparse.Namespace) -> None:
    import transformers

    from scratchllm.export.hf import export_hf
    from scratchllm.tokenizer.bpe import Tokenizer

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 50], 256 + 40, progress=False)
    torch.manual_seed(0)
    cfg = model_preset(args.preset, vocab_size=4096, max_seq_len=max(16 + max(args.new), 256))
    model = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tok, Path(tmp))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    print(f"torch={torch.__version__} transformers={transformers.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} preset={args.preset} params={model.num_params() / 1e6:.2f}M greedy, 16-token prompts, "
          f"compile={args.compile}")
    host_speed("start")
    print("| batch | new | continuous tok/s | generate() tok/s | transformers tok/s | continuous / transformers "
          "| same, by CPU time | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        engine = serving_engine(model, batch, args.compile)
        for n_new in args.new:
            prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
            timed(continuous, engine, prompts, 4)  # warm-up: first-call allocations
            timed(transformers_generate, hf, prompts, 4)
            wall = {"continuous": float("inf"), "generate": float("inf"), "transformers": float("inf")}
            cpu = dict(wall)
            for _ in range(args.repeats):  # interleaved rounds, best of each: a shared host's load comes in bursts
                ours_s, ours_cpu, ours = timed(continuous, engine, prompts, n_new)
                engine_s, engine_cpu, _ = timed(generate_batch, model, prompts, n_new, GREEDY)
                ref_s, ref_cpu, ref = timed(transformers_generate, hf, prompts, n_new)
                for name, seconds, cpu_s in (("continuous", ours_s, ours_cpu), ("generate", engine_s, engine_cpu),
                                             ("transformers", ref_s, ref_cpu)):
                    wall[name], cpu[name] = min(wall[name], seconds), min(cpu[name], cpu_s)
            same = sum(a == b for a, b in zip(ours, ref))
            n = batch * n_new
            print(f"| {batch} | {n_new} | {n / wall['continuous']:.0f} | {n / wall['generate']:.0f} "
                  f"| {n / wall['transformers']:.0f} | {wall['transformers'] / wall['continuous']:.2f}x "
                  f"| {cpu['transformers'] / cpu['continuous']:.2f}x | {same}/{batch} |", flush=True)
    if args.per_step:
        print("\nCPU ms per decode step (best of --repeats rounds): | batch | weight matmuls alone | continuous | "
              "transformers generate |")
        for batch in args.batches:
            t = per_step(model, hf, batch, args.repeats, args.compile)
            print(f"| {batch} | {t['matmuls']:.2f} | {t['ours']:.2f} | {t['transformers']:.2f} |", flush=True)
    host_speed("end")


def per_step(model: GPT, hf, batch: int, rounds: int, compile: bool = False) -> dict[str, float]:
    """CPU ms per decode step at `batch` (best of `rounds`): the weight matmuls alone (every projection and the
    lm_head once, as F.linear on the model's weights: what transformers pays for them), our engine's step, and
    transformers' generate per token (the difference of a 96- and a 32-token generate, over 64)."""
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1]) for w in weights}
    prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
    engine = serving_engine(model, batch, compile)

    def matmuls() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def engine_step() -> None:
        if not engine.busy_rows:  # rows ran out of budget: start new ones (their prefill is one untimed step)
            for p in prompts:
                engine.submit(Collect(p, 100, GREEDY))
            engine.step()
        engine.step()

    def best(fn, n: int) -> float:
        times = []
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(n):
                fn()
            times.append((time.process_time() - start) / n)
        return min(times) * 1e3

    with torch.inference_mode():
        out = {"matmuls": best(matmuls, 20), "ours": best(engine_step, 20)}
    long_s = best(lambda: transformers_generate(hf, prompts, 96), 1)
    out["transformers"] = (long_s - best(lambda: transformers_generate(hf, prompts, 32), 1)) / 64
    return out


def host_speed(when: str) -> None:
    """The host's speed beside the figures: one reference training step (train/reference_step.py) and the load."""
    step_s = measure_reference_step(steps=1)
    print(f"{when}: one reference step {step_s:.2f} s, load average {os.getloadavg()[0]:.1f}", flush=True)


@torch.no_grad()
def no_cache(model: GPT, prompts: torch.Tensor, n_new: int) -> None:
    ids = prompts
    for _ in range(n_new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)


def cache_vs_recompute(args: argparse.Namespace) -> None:
    cfg = model_preset(args.preset, vocab_size=4096, max_seq_len=max(args.new) + 16)
    model = GPT(cfg).eval()
    print(f"torch={torch.__version__} preset={args.preset} params={model.num_params() / 1e6:.2f}M")
    for batch in args.batches:
        for n_new in args.new:
            prompts = torch.randint(0, 4096, (batch, 8))
            start = time.perf_counter()
            generate_batch(model, prompts.tolist(), n_new, GREEDY)
            cached = batch * n_new / (time.perf_counter() - start)
            start = time.perf_counter()
            no_cache(model, prompts, n_new)
            plain = batch * n_new / (time.perf_counter() - start)
            print(f"batch={batch:2d} new={n_new:5d}  kv-cache {cached:8.0f} tok/s   recompute {plain:8.0f} tok/s   "
                  f"ratio {cached / plain:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--new", type=int, nargs="+", default=None, help="new tokens per row (default 128; 256 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (1 8 with --recompute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time of each counts")
    parser.add_argument("--recompute", action="store_true", help="the KV cache vs full recompute instead")
    parser.add_argument("--per-step", action="store_true", help="also CPU ms per decode step: the weight matmuls "
                        "alone, ours, transformers (where the step's time goes)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the serving engine's decode step via torch.compile, as `scratchllm serve` runs it by "
                        "default (built before the timings; the time it took is printed); --no-compile: uncompiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recompute:
        args.new, args.batches = args.new or [256, 1024], args.batches or [1, 8]
        cache_vs_recompute(args)
    else:
        args.new, args.batches = args.new or [128], args.batches or [1, 8, 32]
        against_transformers(args)


if __name__ == "__main__":
    main()
