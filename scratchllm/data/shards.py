"""Text (.txt, .jsonl, .parquet; data/sources.py) -> token shards (uint16/uint32) + JSON header; memmap reader.

Layout of a shard: 8-byte little-endian header length, the UTF-8 JSON header, then the raw token array.
The header records the tokenizer fingerprint, so a shard built with another tokenizer is refused instead
of silently mis-read (PITFALLS.md: stale artefacts). Documents are separated by `<|endoftext|>`.
Corpora larger than memory: `build_shards` streams the files into several shards of at most `shard_tokens`
tokens each, and `ShardSet` reads them back, memory-mapping each shard only when a window is drawn from it.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scratchllm.data import sources
from scratchllm.data.sources import iter_text_documents
from scratchllm.errors import UserError
from scratchllm.tokenizer.bpe import Tokenizer

# The .txt reading moved to data/sources.py (one reader per file format); these names stay for existing callers.
DOC_SEPARATOR = sources.DOC_SEPARATOR
split_documents = sources.split_documents
iter_documents = sources.iter_documents

MAGIC = "scratchllm-shard"
VERSION = 1


class ShardError(UserError, ValueError):
    """A shard file is unreadable or does not belong to this tokenizer."""


def write_shard(path: Path, tokens: np.ndarray, header: dict[str, Any]) -> None:
    header_bytes = json.dumps(header).encode()
    # subtle: one temporary name per process, so torchrun ranks building the same cache never write one file
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(tokens.tobytes())
    tmp.replace(path)


def build_shard(files: list[Path], tokenizer: Tokenizer, out: Path, num_workers: int = 1,
                data: str | None = None) -> Path:
    """Tokenize every document of `files` (.txt, .jsonl or .parquet) into one shard; documents end with
    <|endoftext|>. `data` (sources.data_fingerprint of the files) goes into the header for cache checks."""
    docs: list[str] = []
    for path in files:
        before = len(docs)
        docs.extend(iter_text_documents(path))
        _warn_if_empty(path, len(docs) - before)
    _refuse_no_text(files, len(docs))
    encoded = tokenizer.encode_batch(docs, num_workers=num_workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shard(out, *_shard_array(encoded, docs, tokenizer, [p.name for p in files], data))
    return out


def _warn_if_empty(path: Path, n_docs: int) -> None:
    if not n_docs:
        print(f"warning: {path}: no text in this file (empty or whitespace only); skipped", file=sys.stderr)


def _refuse_no_text(files: Sequence[Path], n_docs: int) -> None:
    if not n_docs:
        raise ShardError(f"{', '.join(map(str, files))}: no text in any of these files (empty?); a split needs at "
                         "least one document")


def _shard_array(encoded: list[list[int]], docs: list[str], tokenizer: Tokenizer,
                 files: list[str], data: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Documents' ids, each followed by <|endoftext|>, as one array + the shard header."""
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
        "files": files,
    }
    if data is not None:
        header["data"] = data
    return tokens, header


def build_shards(files: list[Path], tokenizer: Tokenizer, out_dir: Path, shard_tokens: int, prefix: str = "shard",
                 num_workers: int = 1, batch_chars: int = 1 << 25, data: str | None = None) -> list[Path]:
    """Stream `files` (in order) into `out_dir/{prefix}_00000.bin`, … of at most `shard_tokens` tokens each.

    Documents are never split, so a document longer than `shard_tokens` gets a shard of its own. Memory holds
    one shard plus `batch_chars` characters of text, which are tokenized by `num_workers` processes at a time.
    The output is a pure function of the files and the tokenizer: every process building it writes the same bytes.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    held_ids: list[list[int]] = []
    held_docs: list[str] = []
    held_files: list[str] = []
    held_tokens = 0

    def flush() -> None:
        nonlocal held_ids, held_docs, held_files, held_tokens
        path = out_dir / f"{prefix}_{len(paths):05d}.bin"
        write_shard(path, *_shard_array(held_ids, held_docs, tokenizer, held_files, data))
        paths.append(path)
        held_ids, held_docs, held_files, held_tokens = [], [], [], 0

    def add(docs: list[str], name: str) -> None:
        nonlocal held_tokens
        for doc, ids in zip(docs, tokenizer.encode_batch(docs, num_workers=num_workers)):
            if held_ids and held_tokens + len(ids) + 1 > shard_tokens:
                flush()
            held_ids.append(ids)
            held_docs.append(doc)
            held_tokens += len(ids) + 1
            if not held_files or held_files[-1] != name:
                held_files.append(name)

    total_docs = 0
    for path in files:
        batch: list[str] = []
        n_chars = n_docs = 0
        for doc in iter_text_documents(path):
            batch.append(doc)
            n_chars += len(doc)
            n_docs += 1
            if n_chars >= batch_chars:
                add(batch, path.name)
                batch, n_chars = [], 0
        if batch:
            add(batch, path.name)
        _warn_if_empty(path, n_docs)
        total_docs += n_docs
    _refuse_no_text(files, total_docs)
    if held_ids:
        flush()
    return paths


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


class ShardSet:
    """Several shards read as one corpus; each is memory-mapped on first use and never read whole.

    Opening reads only the headers, and checks that every shard is whole and built with one tokenizer, so a
    truncated, foreign or stale file is named before training starts rather than mis-read halfway through.
    At most `max_open` shards stay mapped (least recently used closed first): each mapping holds a file handle.
    """

    def __init__(self, paths: Sequence[Path | str], tokenizer: Tokenizer | None = None, max_open: int = 64) -> None:
        if not paths:
            raise ShardError("no shard files given; build them with scratchllm.data.shards.build_shards")
        self.paths = [Path(p) for p in paths]
        self.headers: list[dict[str, Any]] = []
        self.offsets: list[int] = []
        expected = tokenizer.fingerprint() if tokenizer is not None else None
        for path in self.paths:
            header, offset = read_header(path)
            expected = expected or header["tokenizer"]
            if header["tokenizer"] != expected:
                raise ShardError(f"{path}: built with another tokenizer ({header['tokenizer']} != {expected}) than "
                                 f"{'this one' if tokenizer is not None else self.paths[0]}; rebuild the shards together")
            size = offset + header["n_tokens"] * np.dtype(header["dtype"]).itemsize
            if path.stat().st_size != size:
                raise ShardError(f"{path}: {path.stat().st_size} bytes, but its header promises {size}; the file is "
                                 "truncated or corrupt; delete it so it is rebuilt")
            self.headers.append(header)
            self.offsets.append(offset)
        self.sizes = np.array([h["n_tokens"] for h in self.headers], dtype=np.int64)
        self.max_open = max_open
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def from_dir(cls, directory: Path, tokenizer: Tokenizer | None = None) -> ShardSet:
        """Every `*.bin` of `directory`, in name order (the order `build_shards` numbers them in)."""
        paths = sorted(Path(directory).glob("*.bin"))
        if not paths:
            raise ShardError(f"{directory}: no *.bin shards; build them with scratchllm.data.shards.build_shards")
        return cls(paths, tokenizer)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_tokens(self) -> int:
        return int(self.sizes.sum())

    def __getitem__(self, i: int) -> np.ndarray:
        """Shard i's tokens as a read-only np.memmap (pages are read by the OS as windows touch them)."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        header = self.headers[i]
        tokens = np.memmap(self.paths[i], dtype=np.dtype(header["dtype"]), mode="r", offset=self.offsets[i],
                           shape=(header["n_tokens"],))
        self._open[i] = tokens
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return tokens
