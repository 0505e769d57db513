"""GGUF export, checked by llama.cpp itself (llama-cpp-python builds it from source) and by the gguf reader.

Tolerances for the lossy types leave headroom over what was measured on this tiny model (docs/benchmarks.md):
F16 weights (llama.cpp also rounds the activations to F16 in those matmuls) and Q8_0 (8-bit blocks of 32).
llama.cpp runs on one thread: its OpenMP threads spin-wait after each call and, beside torch's own OpenMP
pool on a 2-core machine, made this file 80x slower (163 s against 2 s).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp  # in the dev extra (it compiles llama.cpp once): a missing package must fail here, not skip
import numpy as np
import pytest
import torch
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from scratchllm.export.gguf import export_gguf, open_in_llama_cpp, permute_for_llama_rope
from scratchllm.export.hf import CHAT_TEMPLATE
from scratchllm.export.hf import main as export_main
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.io import save_model
from scratchllm.tokenizer.chat import render_for_completion, render_text, reply_stop_ids

PROMPTS = ["Hello, world! The quick", "床前明月光，疑是", "😀🎉 def f(x):"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 你好 😀"}]
LOGIT_TOLERANCE = {"f16": 0.02, "q8_0": 0.25}


def open_llama(path: Path, dtype: str) -> llama_cpp.Llama:
    """llama.cpp on the file, as a user would open it, except that Q8_0 skips the CPU's "extra buffer types": on
    an AMX-capable CPU llama.cpp routes Q8_0 matmuls to ggml_backend_amx_mul_mat, which segfaults on this machine
    kind (gdb backtrace; llama.cpp's own quantizer's Q8_0 file crashes the same way)."""
    return open_in_llama_cpp(path, extra_buffers=dtype != "q8_0", n_ctx=256, logits_all=True, verbose=False,
                             n_threads=1)


@pytest.fixture(scope="module")
def gguf_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    model, tok = tiny_model
    root = tmp_path_factory.mktemp("gguf")
    return {dtype: export_gguf(model, tok, root / f"model-{dtype}.gguf", dtype) for dtype in ("f32", "f16", "q8_0")}


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # (T, V)


def test_gguf_file_holds_our_weights_and_tokenizer(tiny_model, gguf_files) -> None:
    model, tok = tiny_model
    reader = gguf.GGUFReader(gguf_files["f32"])
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["token_embd.weight"], state["embed_tokens.weight"].numpy())
    q = state["layers.1.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"], permute_for_llama_rope(q, model.config.n_heads))
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_cpp_tokenizes_and_decodes_greedily_like_us(tiny_model, gguf_files, prompt: str) -> None:
    model, tok = tiny_model
    llm = open_llama(gguf_files["f32"], "f32")
    ids = tok.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    n_new = 16
    ours, _ = generate_batch(model, [ids], n_new, SamplingParams(temperature=0))
    llm.reset()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == n_new:
            break
    assert theirs == ours[0]
    assert llm.detokenize(theirs).decode("utf-8", errors="replace") == tok.decode(ours[0])


def test_f32_logits_match_ours(tiny_model, gguf_files) -> None:
    model, tok = tiny_model
    ids = tok.encode(" ".join(PROMPTS))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(open_llama(gguf_files["f32"], "f32"), ids)
    assert np.abs(theirs - ours).max() < 1e-3


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_lossy_types_logits_within_tolerance(tiny_model, gguf_files, dtype: str) -> None:
    model, tok = tiny_model
    ids = tok.encode(" ".join(PROMPTS))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(open_llama(gguf_files[dtype], dtype), ids)
    err = np.abs(theirs - ours).max()
    assert 0 < err < LOGIT_TOLERANCE[dtype]  # > 0: the file really is lossy, so the bound is a bound on something
    # where our top choice leads by more than twice the bound, llama.cpp makes the same choice
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * LOGIT_TOLERANCE[dtype]
    assert clear.any() and (theirs.argmax(-1)[clear] == ours.argmax(-1)[clear]).all()


def test_llama_cpp_renders_our_chat_template(tiny_model, gguf_files) -> None:
    model, tok = tiny_model
    llm = open_llama(gguf_files["f32"], "f32")
    template = llm.metadata["tokenizer.chat_template"]
    expected = render_text(MESSAGES, add_generation_prompt=True)
    # llama.cpp's C++ renderer (llama_chat_apply_template), as llama-cli and llama-server use it
    chat = (llama_cpp.llama_chat_message * len(MESSAGES))()
    encoded = [(m["role"].encode(), m["content"].encode()) for m in MESSAGES]
    for slot, (role, content) in zip(chat, encoded):
        slot.role, slot.content = role, content
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(MESSAGES), True, buf, len(buf))
    assert buf.raw[:n].decode() == expected
    # llama-cpp-python's create_chat_completion (Jinja over the same metadata), down to the token ids
    prompt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|endoftext|>")(messages=MESSAGES).prompt
    assert prompt == expected
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == render_for_completion(tok, MESSAGES)
    # and the reply it generates is ours, ending where ours ends (<|im_end|> is the file's end-of-generation)
    reply = llm.create_chat_completion(MESSAGES, temperature=0.0, top_k=1, max_tokens=24, repeat_penalty=1.0)
    ours, _ = generate_batch(model, [render_for_completion(tok, MESSAGES)], 24, SamplingParams(temperature=0),
                             stop_ids=reply_stop_ids(tok))
    text = tok.decode([t for t in ours[0] if t not in reply_stop_ids(tok)])
    assert reply["choices"][0]["message"]["content"] == text


def test_export_command_writes_gguf_and_model_card(tiny_model, tmp_path: Path) -> None:
    model, tok = tiny_model
    save_model(tmp_path / "final", model, tok, {})
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--format", "gguf", "--dtype", "q8_0",
                        "--out", str(tmp_path / "out")]) == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "model-q8_0.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}  # norms stay F32
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{model.num_params():,}" in card and "model-q8_0.gguf" in card


@pytest.mark.parametrize("overrides", [{"tie_embeddings": False}, {"n_kv_heads": 4}, {"n_kv_heads": 1}])
def test_untied_and_other_head_layouts_give_our_logits(tmp_path: Path, overrides: dict) -> None:
    from tests.export.conftest import trained_tiny

    model, tok = trained_tiny(steps=10, **overrides)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    ids = tok.encode(" ".join(PROMPTS))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(llama_logits(open_llama(path, "f32"), ids) - ours).max() < 1e-3
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (not model.config.tie_embeddings)
