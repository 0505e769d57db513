"""The serving forward (infer/slot_forward.py) against GPT.forward: logits of rows at different lengths in one batch,
fused or not, chunked prefill into any slots, and models whose layers cannot be fused (int8, LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch

from scratchllm.config import LoRAConfig, model_preset
from scratchllm.infer import slot_forward as slot_forward_module
from scratchllm.infer.continuous import ContinuousEngine
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.quantize import quantize_int8
from scratchllm.infer.sampling import SamplingParams
from scratchllm.infer.slot_forward import SlotForward
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import SlotKVCache
from scratchllm.model.lora import inject_lora

CONFIGS = {
    "gqa": dict(),  # tiny: 4 query heads share 2 K/V heads
    "mha": dict(n_kv_heads=4),
    "mqa_window": dict(n_kv_heads=1, sliding_window=6),
}


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=300, max_seq_len=64, **overrides)).eval()


def _forward(model: GPT, n_slots: int, fuse: bool = True) -> SlotForward:
    K = model.layers[0].self_attn.n_kv_heads
    return SlotForward(model, SlotKVCache(model.config, n_slots, 96, K), fuse=fuse)


def _reference(model: GPT, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]  # (T, V)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_logits_equal_the_full_forward_for_rows_of_different_lengths(name, fuse) -> None:
    model = _model(**CONFIGS[name])
    fwd = _forward(model, n_slots=3, fuse=fuse)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 11, 20)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):  # right-padded: the padding writes junk past each row's length
        ids[b, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        hidden = fwd.prefill(ids, [0, 1, 2], torch.zeros(3, dtype=torch.long), T)
        for b, s in enumerate(seqs):
            assert torch.allclose(fwd.logits(hidden[b, len(s) - 1]), _reference(model, s)[-1], atol=1e-4)
        for _ in range(5):  # each decode step overwrites the junk at its row's next position
            new = torch.randint(0, 300, (3,), generator=g)
            lengths = torch.tensor([len(s) for s in seqs])
            logits = fwd.decode(new, lengths, int(lengths.max()) + 1)
            for b, s in enumerate(seqs):
                s.append(int(new[b]))
                assert torch.allclose(logits[b], _reference(model, s)[-1], atol=1e-4)


def test_chunked_prefill_into_scattered_slots_equals_the_full_forward() -> None:
    model = _model()
    fwd = _forward(model, n_slots=4)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 300, (13,), generator=g).tolist(), torch.randint(0, 300, (9,), generator=g).tolist()
    with torch.no_grad():
        fwd.prefill(torch.tensor([a[:6], b[:6]]), [3, 1], torch.tensor([0, 0]), 6)  # slots 3 and 1: gathered reads
        ids = torch.zeros(2, 7, dtype=torch.long)
        ids[0], ids[1, :3] = torch.tensor(a[6:]), torch.tensor(b[6:])
        hidden = fwd.prefill(ids, [3, 1], torch.tensor([6, 6]), 13)
    assert torch.allclose(fwd.logits(hidden[0, 6]), _reference(model, a)[-1], atol=1e-4)
    assert torch.allclose(fwd.logits(hidden[1, 2]), _reference(model, b)[-1], atol=1e-4)


def test_write_index_known_answer() -> None:
    cache = SlotKVCache(model_preset("tiny", vocab_size=300), n_slots=4, max_len=8, n_kv_heads=2)
    index = cache.write_index(torch.tensor([1]), torch.tensor([[3]]))
    assert index.tolist() == [19, 27, 83, 91]  # keys of slot 1 at position 3 for heads 0 and 1, then its values
    kv = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8)  # (B, T, 2K, D), tiny has d_head 8
    cache.write(0, index, kv)
    assert torch.equal(cache.keys(0)[1, :, 3], kv[0, 0, :2]) and torch.equal(cache.values(0)[1, :, 3], kv[0, 0, 2:])


@pytest.mark.parametrize("convert", ["int8", "lora"])
def test_layers_that_cannot_be_fused_run_as_their_modules(convert) -> None:
    model = copy.deepcopy(_model())
    if convert == "int8":
        quantize_int8(model, kernel="dequant")
    else:
        inject_lora(model, LoRAConfig(r=4, target_modules="q_proj,gate_proj"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # a non-zero adapter, so a bypassed one would show
    fwd = _forward(model, n_slots=1)
    assert fwd.layers[0].qkv_weight is None and fwd.layers[0].gate_up_weight is None
    seq = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        hidden = fwd.prefill(torch.tensor([seq[:-1]]), [0], torch.tensor([0]), 9)
        assert torch.allclose(fwd.logits(hidden[0, -1]), _reference(model, seq[:-1])[-1], atol=1e-4)
        logits = fwd.decode(torch.tensor(seq[-1:]), torch.tensor([9]), 10)
    assert torch.allclose(logits[0], _reference(model, seq)[-1], atol=1e-4)


def test_greedy_text_is_the_same_fused_unfused_and_through_generate() -> None:
    model = _model()
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (2, 9, 17)]
    greedy = SamplingParams(temperature=0)
    expected, _ = generate_batch(model, prompts, 40, greedy)
    for fuse in (True, False):
        engine = ContinuousEngine(model, frozenset(), max_batch=3, fuse=fuse)
        tokens: list[list[int]] = [[] for _ in prompts]
        requests = [_collector(p, tokens[i]) for i, p in enumerate(prompts)]
        for r in requests:
            engine.submit(r)
        while engine.busy_rows or engine.queued:
            engine.step()
        assert tokens == expected


def _decode_both(fwd: SlotForward, eager: SlotForward, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        for f in (fwd, eager):
            f.prefill(torch.tensor([seq[:-1]]), [0], torch.tensor([0]), len(seq) - 1)
        n = len(seq) - 1
        return (fwd.decode(torch.tensor(seq[-1:]), torch.tensor([n]), n + 1),
                eager.decode(torch.tensor(seq[-1:]), torch.tensor([n]), n + 1))


def test_a_compiler_that_fails_leaves_the_step_eager(monkeypatch) -> None:
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(slot_forward_module.torch, "compile", broken_compile)
    model = _model()
    K = model.layers[0].self_attn.n_kv_heads
    with pytest.warns(RuntimeWarning, match="no C..? compiler"):  # raised on the compiling thread
        fwd = SlotForward(model, SlotKVCache(model.config, 1, 96, K), compile=True)
        assert not fwd.wait_compiled()
    assert "no C++ compiler" in fwd.compile_error
    logits, expected = _decode_both(fwd, _forward(model, n_slots=1), [5, 6, 7])
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("kv_len_step", [1, 16])
def test_the_step_compiled_in_the_background_serves_other_batch_sizes_and_lengths_without_recompiling(
        monkeypatch, kv_len_step) -> None:
    """Built on a scratch cache at batch 1 and 2, the compiled step then runs this forward's own cache at other
    sizes and lengths with no new graph (dynamo with its eager backend: the tracing and guards, not inductor's
    minutes).
    kv_len_step 16: the keys read rounded up as for CUDA graphs (the extra keys are masked), and the cache made under
    inference_mode."""
    import torch._dynamo

    runs = []

    def counting_backend(graph, example_inputs):  # dynamo's eager backend, counting the graphs it runs
        def run(*args):
            runs.append(1)
            return graph(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(slot_forward_module.torch, "compile",
                        lambda fn, **kwargs: real_compile(fn, backend=counting_backend, dynamic=True))
    torch._dynamo.reset()
    model = _model()
    K = model.layers[0].self_attn.n_kv_heads
    with torch.inference_mode(kv_len_step > 1):
        fwd = SlotForward(model, SlotKVCache(model.config, 3, 96, K), compile=True)
    eager = _forward(model, n_slots=3)
    assert fwd.wait_compiled(), fwd.compile_error
    fwd.kv_len_step = kv_len_step
    frames, runs[:] = torch._dynamo.utils.counters["stats"]["unique_graphs"], []
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for B, n in ((1, 9), (3, 5), (2, 17)):
            seqs = torch.randint(0, 300, (B, n), generator=g)
            for f in (fwd, eager):
                f.prefill(seqs[:, :-1], list(range(B)), torch.zeros(B, dtype=torch.long), n - 1)
            ids, lengths = torch.tensor(seqs[:, -1].tolist()), torch.full((B,), n - 1)  # fresh, as the engine passes
            logits = fwd.decode(ids, lengths, n)
            assert torch.allclose(logits, eager.decode(ids, lengths, n), atol=1e-5)
    assert fwd.compile_error is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no graph built after the warm-up
    assert len(runs) == 3  # and every step ran a compiled graph, none fell back to eager


def _collector(prompt: list[int], out: list[int]):
    from scratchllm.infer.continuous import Request

    class Collect(Request):
        def on_token(self, token: int, logprob) -> bool:
            out.append(token)
            return False

    return Collect(prompt, 40, SamplingParams(temperature=0))
