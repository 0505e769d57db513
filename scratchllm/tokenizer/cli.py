"""`scratchllm tokenizer`: train the byte-level BPE on text files and print its statistics.

The saved JSON carries a hash of the training data and settings (`metadata["data_hash"]`), so callers
can tell a stale tokenizer from a current one instead of silently reusing it (PITFALLS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from scratchllm.config import TokenizerConfig, save_json
from scratchllm.runtime import bundled
from scratchllm.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError

DEFAULTS = TokenizerConfig()


def data_hash(paths: list[Path], vocab_size: int, bytes_per_file: int) -> str:
    digest = hashlib.sha256(f"{vocab_size}:{bytes_per_file}:{DEFAULT_SPECIAL_TOKENS}".encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _read_prefix(path: Path, n_bytes: int) -> str:
    data = path.read_bytes()
    return (data[:n_bytes] if n_bytes > 0 else data).decode("utf-8", errors="ignore")


def train_tokenizer_from_files(
    paths: list[Path], vocab_size: int, out: Path, bytes_per_file: int = DEFAULTS.bytes_per_file, progress: bool = True,
    read_prefix: Callable[[Path, int], str] | None = None,
) -> Tokenizer:
    """Train (or reuse, when `out` was trained on exactly these files and settings) and save.

    `read_prefix(path, n_bytes)` gives the text to train on from each file (default: the file's raw UTF-8 prefix);
    a caller with .jsonl / .parquet data passes a reader of their documents (data/sources.text_prefix)."""
    if not paths:
        raise TokenizerError("no training files given; pass text files or build corpus/pretrain first")
    key = data_hash(paths, vocab_size, bytes_per_file)
    if out.exists():
        try:
            existing = Tokenizer.load(out)
            if existing.metadata.get("data_hash") == key:
                return existing
        except TokenizerError:
            pass  # corrupt or old: retrain below
    texts = [(read_prefix or _read_prefix)(p, bytes_per_file) for p in paths]
    start = time.perf_counter()
    tok = Tokenizer.train(texts, vocab_size, progress=progress)
    tok.metadata.update(
        data_hash=key,
        files=[str(p) for p in paths],
        train_bytes=sum(len(t.encode()) for t in texts),
        train_time_s=round(time.perf_counter() - start, 1),
    )
    tok.save(out)
    save_json(out.with_name("config.json"), {"tokenizer": {"vocab_size": vocab_size, "bytes_per_file": bytes_per_file}})
    return tok


def bytes_per_token(tok: Tokenizer, text: str) -> float:
    return len(text.encode()) / max(1, len(tok.encode(text)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm tokenizer", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="text files (default: corpus/pretrain/train/*.txt)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size)
    parser.add_argument("--bytes-per-file", type=int, default=DEFAULTS.bytes_per_file, help="0 = whole files")
    parser.add_argument("--out", type=Path, default=Path("runs/default/tokenizer/tokenizer.json"))
    args = parser.parse_args(argv)
    files = args.files or sorted(bundled("corpus/pretrain/train").glob("*.txt"))
    tok = train_tokenizer_from_files(files, args.vocab_size, args.out, args.bytes_per_file)
    print(f"tokenizer: {args.out}  vocab={tok.vocab_size}  trained on {tok.metadata.get('train_bytes', 0) / 1e6:.1f} MB"
          f" in {tok.metadata.get('train_time_s', 0)} s")
    for path in sorted(bundled("corpus/pretrain/val").glob("*.txt")):
        print(f"  {path.name:18s} {bytes_per_token(tok, path.read_text(encoding='utf-8')):.2f} bytes/token")
    sample = "To be, or not to be: that is the question. 床前明月光，疑是地上霜。"
    print("  sample:", " | ".join(tok.decode([i]) for i in tok.encode(sample)))
    return 0
