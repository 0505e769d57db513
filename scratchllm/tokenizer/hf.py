"""Our BPE as a Hugging Face `tokenizer.json`: same pattern, same merges, same ids (tested against `tokenizers`).

HF's byte-level BPE works on printable stand-ins for bytes (GPT-2's bytes->unicode table), so export is a
re-spelling of our vocab and merges in that alphabet, plus our regex as a `Split` pre-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scratchllm.tokenizer.bpe import Tokenizer, TokenizerError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def to_hf_dict(tok: Tokenizer) -> dict[str, Any]:
    if tok.merges is None:
        raise TokenizerError("only tokenizers trained with merges can be exported (rank-table tokenizers cannot)")
    b2u = bytes_to_unicode()
    spell = lambda token: "".join(b2u[b] for b in token)
    vocab = {spell(token): i for i, token in enumerate(tok.vocab)}
    merges = [[spell(tok.vocab[a]), spell(tok.vocab[b])] for a, b in tok.merges]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def save_hf_tokenizer_json(tok: Tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_hf_dict(tok), ensure_ascii=False))
    return path
