"""Byte-level BPE tokenizer: train / encode / decode / save / load (versioned JSON, never pickle).

First step of the data flow: text -> token ids. Bytes 0..255 are the base vocabulary, so there is no
<unk> and any byte string round-trips. Training follows Sennrich et al. 2016 (arXiv:1508.07909) on
GPT-2/4-style regex pre-tokens; encoding merges the lowest-ranked adjacent pair first, which is exactly
tiktoken's rule (a test checks our ids against tiktoken's cl100k_base).

Worked example: "aaabdaaabac" -> pair counts {aa:4, ab:2, ...}; merge (a,a)->256 gives "256 a b d 256 a b a c";
then (256,a)->257 ... each merge adds one token and shortens the sequence.
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Literal

import regex

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# GPT-4-style split, with two deliberate changes:
# - Han characters form their own chunks of at most 4 (`\p{Han}{1,4}`): a Chinese sentence has no spaces,
#   so `\p{L}+` would make each clause one giant "word"; short chunks let BPE learn common 2-4 character words.
# - every run is capped ({1,64}, {1,32}), so a 1 MB run of one letter becomes many identical, cached chunks
#   instead of one chunk whose merging is quadratic. The cap lives in the pattern, so HF `tokenizers`,
#   running the same pattern, splits identically.
NOT_HAN_LETTER = r"(?:(?!\p{Han})\p{L})"
SPLIT_PATTERN = (
    r"\p{Han}{1,4}"
    r"|'(?i:[sdmt]|ll|ve|re)"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{NOT_HAN_LETTER}{{1,64}}"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]{1,32}[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s{1,32}(?!\S)"
    r"|\s{1,32}"
)

FORMAT_NAME = "scratchllm-bpe"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer file or argument is unusable; the message says which and how to fix it."""


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _count_chunks(args: tuple[list[str], str]) -> Counter[bytes]:
    texts, pattern = args
    compiled = regex.compile(pattern)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(m.encode("utf-8", "surrogatepass") for m in compiled.findall(text))
    return counts


class Tokenizer:
    """Byte-level BPE. ids 0..255 are bytes, then merges in rank order, then special tokens."""

    def __init__(
        self,
        vocab: list[bytes],
        special_tokens: dict[str, int],
        pattern: str = SPLIT_PATTERN,
        merges: list[tuple[int, int]] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.vocab = vocab  # id -> bytes (special tokens excluded)
        self.ranks = {token: i for i, token in enumerate(vocab)}  # bytes -> id; lower id = earlier merge
        self.special_tokens = dict(special_tokens)
        self.special_by_id = {i: s for s, i in self.special_tokens.items()}
        self.pattern = pattern
        self.merges = merges  # (left id, right id) per merge; None for tokenizers built from rank tables
        self.metadata = dict(metadata or {})
        self._compiled = regex.compile(pattern)
        self._cache: dict[bytes, list[int]] = {}
        specials = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: list[str] = DEFAULT_SPECIAL_TOKENS,
        progress: bool = True,
        pattern: str = SPLIT_PATTERN,
        num_workers: int = 1,
    ) -> Tokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts`.

        Memory is bounded by the number of *unique* pre-tokens, not the corpus size: we count chunk
        frequencies once, then every merge updates pair counts only in the words that contain it.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise TokenizerError(f"vocab_size={vocab_size} is smaller than 256 bytes + {len(special_tokens)} specials")
        texts = list(texts)
        if num_workers > 1:
            shards = [(texts[i::num_workers], pattern) for i in range(num_workers)]
            with Pool(num_workers) as pool:
                chunk_counts = sum(pool.map(_count_chunks, shards), Counter())
        else:
            chunk_counts = _count_chunks((texts, pattern))
        words = [list(chunk) for chunk in chunk_counts]
        counts = list(chunk_counts.values())

        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words containing it
        for w, (word, count) in enumerate(zip(words, counts)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
                where[pair].add(w)
        # Max-heap by count with lazy deletion; ties go to the smallest pair, so training is deterministic.
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        vocab = [bytes([b]) for b in range(256)]
        merges: list[tuple[int, int]] = []
        bar = _progress(n_merges, "bpe merges") if progress else None
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg:
                continue  # stale heap entry: the count changed since it was pushed
            if -neg < 1:
                break
            new_id = len(vocab)
            vocab.append(vocab[pair[0]] + vocab[pair[1]])
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for w in where.pop(pair):
                word, count = words[w], counts[w]
                new_word = _merge_pair(word, pair, new_id)
                words[w] = new_word
                # subtle: only pairs whose count inside this word changed are touched, so a merge costs
                # O(words containing it), not O(corpus).
                delta: defaultdict[tuple[int, int], int] = defaultdict(int)
                for old in zip(word, word[1:]):
                    delta[old] -= 1
                for new in zip(new_word, new_word[1:]):
                    delta[new] += 1
                for p, d in delta.items():
                    if d:
                        pair_counts[p] += d * count
                        changed.add(p)
                        if d > 0:
                            where[p].add(w)
            del pair_counts[pair]
            for p in changed:
                if p != pair and pair_counts.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(vocab, specials, pattern, merges)

    @classmethod
    def from_ranks(
        cls, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None = None
    ) -> Tokenizer:
        """Build from a tiktoken-style rank table (bytes -> rank == id), e.g. OpenAI's cl100k_base."""
        vocab = [b""] * len(mergeable_ranks)
        for token, rank in mergeable_ranks.items():
            vocab[rank] = token
        return cls(vocab, special_tokens or {}, pattern, merges=None)

    # ---- encoding -------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: bytes) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        parts = [chunk[i : i + 1] for i in range(len(chunk))]
        ranks = self.ranks
        while len(parts) > 1:
            # The adjacent pair whose merged bytes have the lowest rank merges first (leftmost on ties).
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i
            if best_rank is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        ids = [ranks[p] for p in parts]
        if len(self._cache) < 500_000:
            self._cache[chunk] = ids
        return ids

    def _encode_ordinary(self, text: str, errors: str) -> list[int]:
        ids: list[int] = []
        for piece in self._compiled.findall(text):
            ids.extend(self._encode_chunk(piece.encode("utf-8", errors)))
        return ids

    def encode(self, text: str, allowed_special: Literal["all", "none"] | set[str] = "none") -> list[int]:
        """Text -> ids. Special-token text becomes a special id only if allowed; otherwise plain bytes.

        Lone surrogates are encoded with 'surrogatepass', so every Python str round-trips.
        """
        if allowed_special == "none" or not self._special_re:
            return self._encode_ordinary(text, "surrogatepass")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part, "surrogatepass"))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any byte string -> ids; invalid UTF-8 survives via 'surrogateescape' and `decode_bytes` restores it."""
        return self._encode_ordinary(data.decode("utf-8", "surrogateescape"), "surrogateescape")

    def encode_batch(
        self,
        texts: list[str],
        num_workers: int = 1,
        allowed_special: Literal["all", "none"] | set[str] = "none",
    ) -> list[list[int]]:
        if num_workers <= 1 or len(texts) < 2:
            return [self.encode(t, allowed_special) for t in texts]
        chunk = max(1, len(texts) // (num_workers * 4))
        with Pool(num_workers, initializer=_init_worker, initargs=(self,)) as pool:
            return pool.map(_encode_in_worker, [(t, allowed_special) for t in texts], chunksize=chunk)

    # ---- decoding -------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_by_id:
            return self.special_by_id[token_id].encode()
        if not 0 <= token_id < len(self.vocab):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self.vocab[token_id]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text. Lone surrogates come back as themselves; other invalid UTF-8 becomes U+FFFD."""
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    # ---- properties -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(len(self.vocab), max(self.special_tokens.values(), default=-1) + 1)

    def _special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise TokenizerError(f"this tokenizer has no {name} token; retrain it with the default special tokens")
        return self.special_tokens[name]

    @property
    def eos_id(self) -> int:
        return self._special("<|endoftext|>")

    @property
    def pad_id(self) -> int:
        return self._special("<|pad|>")

    @property
    def im_start_id(self) -> int:
        return self._special("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._special("<|im_end|>")

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab_hex": [token.hex() for token in self.vocab],
            "merges": [list(m) for m in self.merges] if self.merges is not None else None,
            "special_tokens": self.special_tokens,
            "metadata": self.metadata,
        }

    def fingerprint(self) -> str:
        """Hash of everything that changes ids: shards record it so a stale tokenizer is detected."""
        payload = {k: v for k, v in self.to_dict().items() if k != "metadata"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no tokenizer file; train one with `scratchllm tokenizer`") from None
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{path}: corrupt tokenizer JSON ({err}); retrain it with `scratchllm tokenizer`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise TokenizerError(f"{path}: not a scratchllm tokenizer (for a HF tokenizer.json use `scratchllm import-hf`)")
        if data.get("version") != FORMAT_VERSION:
            raise TokenizerError(f"{path}: tokenizer format version {data.get('version')} is not supported "
                                 f"(this build reads version {FORMAT_VERSION})")
        merges = [tuple(m) for m in data["merges"]] if data.get("merges") is not None else None
        return cls(
            [bytes.fromhex(h) for h in data["vocab_hex"]],
            data["special_tokens"],
            data["pattern"],
            merges,  # type: ignore[arg-type]
            data.get("metadata"),
        )


class StreamDecoder:
    """Incremental decoding for streaming: yields only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(args: tuple[str, Any]) -> list[int]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode(args[0], args[1])


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="merge", mininterval=0.5)
