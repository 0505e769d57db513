"""Stop strings are held back until they can no longer match: no piece of one ever reaches the client."""

from __future__ import annotations

import random

import pytest

from scratchllm.infer.reply_text import ReplyText, StopMatcher
from scratchllm.tokenizer.bpe import Tokenizer


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher, shown, stopped = StopMatcher(stops), [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        shown.append(text)
        if stopped:
            return shown, True
    shown.append(matcher.flush())
    return shown, stopped


def test_docstring_example_multi_token_stop_string() -> None:
    shown, stopped = _feed(["is 1"], ["The answer ", "is", " 2", " is", " 1."])
    assert shown == ["The answer ", "", "is 2", " ", ""] and stopped
    assert "".join(_feed(["is 1"], ["The answer ", "is", " 1"])[0]) == "The answer "  # the measured leak: 'The answer is'


@pytest.mark.parametrize("seed", range(200))
def test_shown_text_is_the_text_before_the_first_stop_whatever_the_split(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 2))]
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    shown, stopped = _feed(stops, pieces)
    # Earliest *completed* stop wins, as when the text grows one piece at a time (vLLM's semantics).
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(ends)[1]] if ends else text
    assert "".join(shown) == expected and stopped == bool(ends)


def test_reply_text_logprob_entries_follow_the_released_text() -> None:
    tok = Tokenizer.train(["the answer is 1, the answer is 2. " * 20], 256 + 30, progress=False)
    ids = tok.encode("the answer is 2, the answer is 1, then more")
    reply = ReplyText(tok, ["is 1"])
    text, entries = "", []
    for token in ids:
        piece, done, stopped = reply.push(token, None)
        text, entries = text + piece, entries + done
        if stopped:
            break
    assert stopped and text == "the answer is 2, the answer "
    assert tok.decode([e.token for e in entries]).startswith(text)
    assert all(e.start < len(text) for e in entries)  # no entry for the stop string's own tokens
