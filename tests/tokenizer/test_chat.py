"""Chat template: only assistant content and its closing <|im_end|> are trained; errors say what is wrong."""

from __future__ import annotations

import pytest

from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import ChatFormatError, render_conversation, render_for_completion, render_text


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["user assistant system hello world 你好 2+2=4\n" * 20], 256 + 40 + 4, progress=False)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "world"},
    {"role": "user", "content": "你好 <|im_end|>"},
    {"role": "assistant", "content": "2+2=4"},
]


def test_ids_equal_encoding_the_rendered_text(tok: Tokenizer) -> None:
    ids, mask = render_conversation(tok, CONVERSATION)
    assert len(ids) == len(mask)
    # The user's literal "<|im_end|>" is text, not a token: compare after re-encoding that span as bytes.
    assert tok.decode(ids) == render_text(CONVERSATION)
    assert ids.count(tok.im_end_id) == len(CONVERSATION)


def test_mask_covers_exactly_assistant_content_and_its_end_token(tok: Tokenizer) -> None:
    ids, mask = render_conversation(tok, CONVERSATION)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode("world") + [tok.im_end_id] + tok.encode("2+2=4") + [tok.im_end_id]
    assert trained == expected
    # Every assistant turn's closing <|im_end|> is trained; no user/system <|im_end|> is.
    ends = [m for i, m in zip(ids, mask) if i == tok.im_end_id]
    assert ends == [False, False, True, False, True]


def test_generation_prompt_and_truncation(tok: Tokenizer) -> None:
    prompt = render_for_completion(tok, CONVERSATION[:2])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(prompt) == render_text(CONVERSATION[:2], add_generation_prompt=True)
    ids, mask = render_conversation(tok, CONVERSATION, max_len=10)
    assert len(ids) == len(mask) == 10


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "message 0: unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "message 1: must be an object"),
    ],
)
def test_malformed_conversations(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match):
        render_conversation(tok, messages)
