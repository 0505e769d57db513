"""The chat template (ChatML) and its loss mask: the only code that knows how conversations look as tokens.

Each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`. Only assistant content and the
assistant's closing `<|im_end|>` count in the loss: the model must learn to answer *and to stop*
(TRL #1623: drop the end token from the loss and the model never stops).
"""

from __future__ import annotations

from typing import Any

from scratchllm.errors import UserError
from scratchllm.tokenizer.bpe import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatFormatError(UserError, ValueError):
    """A conversation is malformed; the message says which message and what is wrong."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i}: must be an object with 'role' and 'content' keys, got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
    return messages


def _header(tok: Tokenizer, role: str) -> list[int]:
    return [tok.im_start_id, *tok.encode(f"{role}\n")]


def render_conversation(
    tok: Tokenizer, messages: list[dict[str, str]], max_len: int | None = None
) -> tuple[list[int], list[bool]]:
    """Conversation -> (ids, loss_mask); mask is True on assistant content and its closing <|im_end|>.

    Content is encoded with specials disallowed, so a user typing "<|im_end|>" cannot inject a token.
    """
    validate_messages(messages)
    newline = tok.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for message in messages:
        trained = message["role"] == "assistant"
        header = _header(tok, message["role"])
        body = tok.encode(message["content"]) + [tok.im_end_id]
        ids += header + body + newline
        mask += [False] * len(header) + [trained] * len(body) + [False] * len(newline)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_for_completion(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt for generation: the conversation so far, then `<|im_start|>assistant\\n`."""
    validate_messages(messages)
    ids, _ = render_conversation(tok, messages)
    return ids + _header(tok, "assistant")


def reply_stop_ids(tok: Tokenizer) -> frozenset[int]:
    """Tokens that end a generated reply: <|im_end|> closes it, <|endoftext|> ends the text, and <|im_start|>
    opens the next turn, so a model that emits it has finished its reply without closing it."""
    return frozenset({tok.im_end_id, tok.eos_id, tok.im_start_id})


def render_text(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The same template as text (what HF `apply_chat_template` must reproduce on export)."""
    validate_messages(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
