"""`scratchllm export --format gguf`: a model directory -> one GGUF file that llama.cpp, Ollama and LM Studio run.

Written with the `gguf` package (llama.cpp's own Python writer), in the layout llama.cpp's convert_hf_to_gguf.py
gives a LlamaForCausalLM: architecture "llama", tensor names from gguf's own HF->GGUF name map, the tokenizer as a
byte-level BPE ("gpt2") vocabulary + merges, and our ChatML template in `tokenizer.chat_template`.
Deviation to know about: llama.cpp has no way to take a pre-tokenizer regex from the file; it picks one of its
built-in ones by name. "qwen2" splits text as ours does except that ours cuts runs of Han characters every 4
characters, so on longer Han runs llama.cpp may choose other (still valid) tokens than ours (docs/use-elsewhere.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from scratchllm.export.hf import CHAT_TEMPLATE, check_exportable, to_hf_name
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.hf import bytes_to_unicode

# llama.cpp's closest built-in pre-tokenizer to tokenizer/bpe.py's SPLIT_PATTERN (see the module docstring)
PRE_TOKENIZER = "qwen2"
QUANT_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def permute_for_llama_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q_proj/k_proj rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one.

    Ours (and HF's) RoPE pairs channel i with i + D/2 inside each head; llama.cpp's "llama" architecture pairs
    2i with 2i + 1. Permuting the output rows of W_q and W_k makes the two the same function (the same
    transformation as convert_hf_to_gguf.py's LlamaModel.permute, applied in reverse of HF's own conversion).
    """
    rows = weight.shape[0]
    # (H, 2, D/2, d_in) -> (H, D/2, 2, d_in): row (h, half, i) moves to (h, i, half)
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's byte-level BPE reads them: GPT-2's printable byte spelling.

    The model's embedding may have more rows than the tokenizer has tokens (padding to a round number):
    those rows get unused placeholder tokens, so ids line up.
    """
    if tok.merges is None:
        raise ValueError("only tokenizers trained with merges can be exported to GGUF (rank-table tokenizers cannot)")
    b2u = bytes_to_unicode()
    spell = lambda token: "".join(b2u[b] for b in token)
    by_id = {i: s for s, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)  # parsed as one token only when the caller allows specials
        elif i < len(tok.vocab):
            tokens.append(spell(tok.vocab[i]))
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [f"{spell(tok.vocab[a])} {spell(tok.vocab[b])}" for a, b in tok.merges]
    return tokens, types, merges


def tensor_type(array: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """Norm weights stay F32 (as convert_hf_to_gguf.py keeps them); Q8_0 needs rows in blocks of 32, else F16."""
    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] != 0:
        return gguf.GGMLQuantizationType.F16
    return QUANT_TYPES[dtype]


def export_gguf(model: GPT, tok: Tokenizer, out: Path, dtype: str = "f32", name: str = "scratchllm") -> Path:
    """Write `out` (a .gguf file) atomically; returns it."""
    if dtype not in QUANT_TYPES:
        raise ValueError(f"--dtype={dtype!r} is not supported for GGUF; choose one of {', '.join(QUANT_TYPES)}")
    check_exportable(model)
    cfg = model.config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.resolved_d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.d_head)
    writer.add_value_length(cfg.d_head)
    writer.add_rope_dimension_count(cfg.d_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)

    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.eos_id)  # never prepended (add_bos_token false); set so no default id is guessed
    writer.add_eos_token_id(tok.im_end_id)  # a reply ends at <|im_end|>, as in generation_config.json
    writer.add_eot_token_id(tok.im_end_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    state = model.state_dict()
    for key, tensor in state.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(to_hf_name(key), try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for parameter {key!r}; the llama architecture has no such tensor")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            array = permute_for_llama_rope(array, cfg.n_heads)
        elif key.endswith("k_proj.weight"):
            array = permute_for_llama_rope(array, cfg.n_kv_heads)
        qtype = tensor_type(array, dtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out



def open_in_llama_cpp(path: Path, extra_buffers: bool = True, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(path, **kwargs)`; extra_buffers=False turns off llama.cpp's CPU weight repacking and AMX
    buffers (llama-cli --no-repack), whose AMX Q8_0 matmul (ggml_backend_amx_mul_mat) segfaults on this project's
    machine kind. llama-cpp-python has no argument for it, so its model-parameter defaults are patched meanwhile."""
    import llama_cpp  # optional: only the GGUF checks and benchmark need llama.cpp itself

    if extra_buffers:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    default_params = llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default_params
