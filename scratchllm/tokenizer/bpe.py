"""Byte-level BPE tokenizer: train / encode / decode / save / load (versioned JSON, never pickle).

First step of the data flow: text -> token ids. Bytes 0..255 are the base vocabulary, so there is no
<unk> and any byte string round-trips. Training follows Sennrich et al. 2016 (arXiv:1508.07909) on
GPT-2/4-style regex pre-tokens; encoding merges the lowest-ranked adjacent pair first, which is exactly
tiktoken's rule (a test checks our ids against tiktoken's cl100k_base).

Worked example: "aaabdaaabac" -> pair counts {aa:4, ab:2, ...}; merge (a,a)->256 gives "256 a b d 256 a b a c";
there (256,a) and (a,b) both count 2, and a tie goes to the smaller pair, (97, 98), so (a,b)->257; then
(256,257) counts 2 -> 258. Each merge adds one token and shortens the sequence (tests/test_doctests.py runs this):

>>> tok = Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 3, special_tokens=[], progress=False)
>>> tok.merges
[(97, 97), (97, 98), (256, 257)]
>>> tok.encode("aaabdaaabac")  # 258 = "aaab", 100 = "d", 97 = "a", 99 = "c"
[258, 100, 258, 97, 99]
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Literal

import regex

from scratchllm.errors import UserError

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# GPT-4-style split, with three deliberate changes:
# - Han characters form their own chunks of at most 4 (`\p{Han}{1,4}`): a Chinese sentence has no spaces,
#   so `\p{L}+` would make each clause one giant "word"; short chunks let BPE learn common 2-4 character words.
# - every run is capped ({1,64}, {1,32}), so a 1 MB run of one letter becomes many identical, cached chunks
#   instead of one chunk whose merging is quadratic. The cap lives in the pattern, so HF `tokenizers`,
#   running the same pattern, splits identically.
# - every digit is its own chunk (`\p{N}`, as Llama and PaLM split digits): with GPT-4's groups of up to three,
#   BPE trained on number-rich text made "52" one token but "1234" -> "12" "3" "4", so the same digit got a
#   different token by position, which makes arithmetic harder for a small model to learn.
NOT_HAN_LETTER = r"(?:(?!\p{Han})\p{L})"
SPLIT_PATTERN = (
    r"\p{Han}{1,4}"
    r"|'(?i:[sdmt]|ll|ve|re)"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{NOT_HAN_LETTER}{{1,64}}"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]{1,32}[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s{1,32}(?!\S)"
    r"|\s{1,32}"
)

NO_RANK = float("inf")  # rank of a byte pair that is not in the vocabulary: never merged
MAX_CACHED_CHUNKS = 500_000  # bounds the encoder's memory on corpora with very many unique pre-tokens

FORMAT_NAME = "scratchllm-bpe"
FORMAT_VERSION = 1


class TokenizerError(UserError, ValueError):
    """A tokenizer file or argument is unusable; the message says which and how to fix it."""


def _apply_merge(
    pair: tuple[int, int],
    new_id: int,
    words: list[list[int]],
    counts: list[int],
    where: defaultdict[tuple[int, int], set[int]],
) -> defaultdict[tuple[int, int], int]:
    """Merge `pair` -> `new_id` in every word that holds it; return how much each pair's count changed.

    Only the neighbours of a merged occurrence change, each by the word's count. Worked example,
    merging (a, b) -> Z in the word "x a b a b" (left to right, no overlaps):
      at i=1: left (x, a) -1, (x, Z) +1; right (b, a) -1, (Z, a) +1   -> "x Z a b"
      at i=3: the left neighbour is now Z: (Z, a) -1, (Z, Z) +1         -> "x Z Z"
    Net: (x, a) -1, (b, a) -1, (x, Z) +1, (Z, Z) +1; the provisional (Z, a) cancels out.
    `where` (pair -> ids of words that may hold it) gains the new pairs; it is never pruned.
    """
    a, b = pair
    delta: defaultdict[tuple[int, int], int] = defaultdict(int)
    for w in where.pop(pair):
        word, count = words[w], counts[w]
        out: list[int] = []
        i, n = 0, len(word)
        while i < n:
            if i < n - 1 and word[i] == a and word[i + 1] == b:
                if out:  # subtle: the left neighbour comes from `out`, so it may already be new_id
                    delta[out[-1], a] -= count
                    delta[out[-1], new_id] += count
                    where[out[-1], new_id].add(w)
                if i + 2 < n:
                    delta[b, word[i + 2]] -= count
                    delta[new_id, word[i + 2]] += count
                    where[new_id, word[i + 2]].add(w)
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        words[w] = out  # unchanged if an earlier merge already took the pair from this word
    delta.pop(pair, None)  # the merged pair itself can appear as a neighbour (in "a a a"); it is retired
    return delta


def _count_chunks(args: tuple[list[str], str]) -> Counter[bytes]:
    """Frequency of every pre-token (regex chunk) as UTF-8 bytes; lone surrogates pass through."""
    texts, pattern = args
    compiled = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    # Encode each unique chunk once, not every occurrence.
    return Counter({chunk.encode("utf-8", "surrogatepass"): n for chunk, n in counts.items()})


COUNT_BATCH_CHARS = 1_000_000  # texts counted per batch while training: bounds the memory for the raw text


def _text_batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts grouped until a group holds at least `max_chars` characters (one long text is one group)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
        self._cache: dict[str, list[int]] = {}  # pre-token -> ids
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
        # Stream the texts in batches of ~COUNT_BATCH_CHARS, so the corpus is never held in memory at once.
        batches = ((batch, pattern) for batch in _text_batches(texts, COUNT_BATCH_CHARS))
        chunk_counts: Counter[bytes] = Counter()
        if num_workers > 1:
            with Pool(num_workers) as pool:  # a few batches in flight at a time (Pool.imap would read ahead)
                while window := list(itertools.islice(batches, 2 * num_workers)):
                    for part in pool.map(_count_chunks, window):
                        chunk_counts.update(part)
        else:
            for batch in batches:
                chunk_counts.update(_count_chunks(batch))
        words = [list(chunk) for chunk in chunk_counts]
        counts = list(chunk_counts.values())

        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) contain it
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
            new_id = len(vocab)
            vocab.append(vocab[pair[0]] + vocab[pair[1]])
            merges.append(pair)
            # subtle: a merge touches only the words that hold the pair, and inside them only the
            # neighbours of each occurrence, so it costs O(occurrences), not O(corpus).
            delta = _apply_merge(pair, new_id, words, counts, where)
            del pair_counts[pair]
            for p, d in delta.items():
                if d == 0:
                    continue
                n = pair_counts[p] + d
                if n > 0:
                    pair_counts[p] = n
                    heapq.heappush(heap, (-n, p))
                else:
                    del pair_counts[p]
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
        """Merge one pre-token: join the adjacent pair whose bytes have the lowest rank, leftmost on ties.

        `pair_ranks[i]` is the rank of `parts[i] + parts[i + 1]`; a merge changes only its two neighbours,
        so each step is one `min` (in C) plus two lookups instead of a rescan of every pair.
        """
        ranks = self.ranks
        parts = [chunk[i : i + 1] for i in range(len(chunk))]
        pair_ranks = [ranks.get(left + right, NO_RANK) for left, right in zip(parts, parts[1:])]
        while pair_ranks:
            best = min(pair_ranks)
            if best == NO_RANK:
                break
            i = pair_ranks.index(best)  # leftmost
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], NO_RANK)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], NO_RANK)
        return [ranks[p] for p in parts]

    def _encode_ordinary(
        self, text: str, errors: str = "surrogatepass", cache: dict[str, list[int]] | None = None
    ) -> list[int]:
        # The cache is keyed by the str chunk, so a hit skips UTF-8 encoding as well as merging.
        # subtle: a chunk holding surrogates encodes differently under 'surrogateescape', so `encode_bytes`
        # passes a cache of its own.
        cache = self._cache if cache is None else cache
        ids: list[int] = []
        for piece in self._compiled.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_chunk(piece.encode("utf-8", errors))
                if len(cache) < MAX_CACHED_CHUNKS:
                    cache[piece] = piece_ids
            ids += piece_ids
        return ids

    def encode(self, text: str, allowed_special: Literal["all", "none"] | set[str] = "none") -> list[int]:
        """Text -> ids. Special-token text becomes a special id only if allowed; otherwise plain bytes.

        Lone surrogates are encoded with 'surrogatepass', so every Python str round-trips.
        """
        if allowed_special == "none" or not self._special_re:
            return self._encode_ordinary(text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any byte string -> ids; invalid UTF-8 survives via 'surrogateescape' and `decode_bytes` restores it."""
        return self._encode_ordinary(data.decode("utf-8", "surrogateescape"), "surrogateescape", cache={})

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
