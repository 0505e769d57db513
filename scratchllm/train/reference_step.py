"""The machine's speed as one number: the time of a fixed reference training step.

The pipeline's work is fixed (steps, rollouts, held-out sets), so its cost on any machine is a count of these
steps; seconds are that count times this machine's step time. Hosts of one kind differ several-fold (AVX-512
against AVX2-only CPUs), so every time the pipeline prints or reports is also given in reference steps, which
compare across machines.

The shape is frozen here, not taken from a preset, so the unit stays the same when the default model changes:
d_model 384, 3 layers, 12 heads (6 KV), vocabulary 4,096, batch 16 x 256 tokens, forward + backward + AdamW,
float32.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from scratchllm.config import ModelConfig
from scratchllm.model.gpt import GPT

REFERENCE_MODEL = ModelConfig(vocab_size=4096, d_model=384, n_layers=3, n_heads=12, n_kv_heads=6, max_seq_len=256)
REFERENCE_BATCH, REFERENCE_SEQ_LEN = 16, 256


def measure_reference_step(steps: int = 7, device: str = "cpu", warmup: int = 3) -> float:
    """Median seconds of `steps` reference steps, after `warmup` untimed ones.

    The first steps of a process run slow and uneven (allocations, kernel selection, the CPU's clock settling):
    on a 2-core host the 2nd-4th steps took 0.64-1.46 s where later ones took 0.65-0.69 s, so a median of three
    after one warm-up step read anywhere from 0.70 to 0.93 s, and the run's cost in these units moved by a third.

    Seeded and independent of the caller's random state: measuring never changes what a run trains."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(REFERENCE_MODEL).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, REFERENCE_MODEL.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ_LEN + 1), device=device)

        def step() -> None:
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        for _ in range(max(1, warmup)):
            step()
        times = []
        for _ in range(max(1, steps)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_tokens_per_s(step_s: float) -> float:
    """Training tokens per second that a reference step time means (the figure bench_train_step.py prints)."""
    return REFERENCE_BATCH * REFERENCE_SEQ_LEN / step_s
