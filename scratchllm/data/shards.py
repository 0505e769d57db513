"""Text files -> token shards on disk (uint16 when the vocab fits, else uint32) with a JSON header; memmap reader.

Layout of a shard: 8-byte little-endian header length, the UTF-8 JSON header, then the raw token array.
The header records the tokenizer fingerprint, so a shard built with another tokenizer is refused instead
of silently mis-read (PITFALLS.md: stale artefacts). Documents are separated by `<|endoftext|>`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from scratchllm.tokenizer.bpe import Tokenizer

MAGIC = "scratchllm-shard"
VERSION = 1
DOC_SEPARATOR = "\n\n\n"  # corpus/README.md: documents are separated by three newlines


class ShardError(ValueError):
    """A shard file is unreadable or does not belong to this tokenizer."""


def split_documents(text: str) -> list[str]:
    return [doc.strip("\n") for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def write_shard(path: Path, tokens: np.ndarray, header: dict[str, Any]) -> None:
    header_bytes = json.dumps(header).encode()
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(tokens.tobytes())
    tmp.replace(path)


def build_shard(files: list[Path], tokenizer: Tokenizer, out: Path, num_workers: int = 1) -> Path:
    """Tokenize every document of `files` into one shard; documents end with <|endoftext|>."""
    docs: list[str] = []
    for path in files:
        docs.extend(split_documents(path.read_text(encoding="utf-8")))
    encoded = tokenizer.encode_batch(docs, num_workers=num_workers)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    total = sum(len(ids) + 1 for ids in encoded)
    tokens = np.empty(total, dtype=dtype)
    pos = 0
    for ids in encoded:
        tokens[pos : pos + len(ids)] = ids
        tokens[pos + len(ids)] = tokenizer.eos_id
        pos += len(ids) + 1
    n_bytes = sum(len(d.encode()) for d in docs)
    header = {
        "magic": MAGIC, "version": VERSION, "dtype": np.dtype(dtype).name, "n_tokens": int(total),
        "n_documents": len(docs), "n_text_bytes": n_bytes, "tokenizer": tokenizer.fingerprint(),
        "files": [p.name for p in files],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shard(out, tokens, header)
    return out


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 1 << 20:
                raise ShardError(f"{path}: header length {length} is implausible; the file is not a token shard")
            header = json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: unreadable shard header ({err}); delete the file so it is rebuilt") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ShardError(f"{path}: not a scratchllm token shard (bad magic); delete it so it is rebuilt")
    if header.get("version") != VERSION:
        raise ShardError(f"{path}: shard version {header.get('version')} unsupported (expected {VERSION}); rebuild it")
    return header, 8 + length


def load_shard(path: Path, tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-map the token array; refuse a shard made with a different tokenizer."""
    header, offset = read_header(path)
    if tokenizer is not None and header["tokenizer"] != tokenizer.fingerprint():
        raise ShardError(f"{path}: built with another tokenizer ({header['tokenizer']} != {tokenizer.fingerprint()}); "
                         "delete it so it is rebuilt")
    tokens = np.memmap(path, dtype=np.dtype(header["dtype"]), mode="r", offset=offset, shape=(header["n_tokens"],))
    return tokens, header
