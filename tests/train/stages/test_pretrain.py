"""Pretraining's command line, and chat-format rows in its batches: the batch keeps its size, the rows come from the
rendered conversations, and batch k is the same whether the run was interrupted or not."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from scratchllm.config import ConfigError, LoopConfig
from scratchllm.data.chat_batches import (
    chat_token_stream,
)
from scratchllm.data.jsonl import read_tasks
from scratchllm.data.tasks import task_conversation
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.stages import pretrain
from scratchllm.train.stages.pretrain import PretrainStage, chat_pretraining_tokens


def test_pretrain_help_lists_init(capsys) -> None:
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    assert re.search(r"^\s+--init INIT\b", capsys.readouterr().out, re.M)  # an option, not just the description


def _stage(tok: Tokenizer, chat: np.ndarray | None, rows: int, mask: np.ndarray | None = None) -> PretrainStage:
    text = np.arange(5_000, dtype=np.int64) % 200  # text tokens never above 200: rows tell their source
    loop = LoopConfig(batch_size=6, seq_len=16, seed=3)
    return PretrainStage(text, text, tok, loop, chat, rows, chat_mask=mask)


def test_chat_rows_fill_the_end_of_every_batch_and_resume_exactly(tiny_world) -> None:
    data, base = tiny_world
    tok = Tokenizer.load(base / "tokenizer.json")
    chat, _ = chat_pretraining_tokens(str(data / "tasks_train.jsonl"), tok, seed=3)
    assert tok.im_start_id in chat and tok.im_end_id in chat  # rendered with the chat template
    stage = _stage(tok, chat, rows=2)
    batches = stage.batches("train")
    first = [next(batches) for _ in range(4)]
    assert all(b["ids"].shape == (6, 16) for b in first)
    stream = set(chat.tolist())
    for batch in first:  # rows 4-5 are windows of the chat stream, rows 0-3 of the text
        assert (batch["ids"][:4] < 200).all()
        assert all(set(row.tolist()) <= stream for row in batch["ids"][4:])
    resumed = _stage(tok, chat, rows=2)
    resumed.load_state_dict({"position": 2})
    again = resumed.batches("train")
    for expected in first[2:]:
        got = next(again)
        assert torch.equal(got["ids"], expected["ids"]) and torch.equal(got["targets"], expected["targets"])


def test_chat_stream_is_every_conversation_once_in_a_seeded_order(tiny_world) -> None:
    data, base = tiny_world
    tok = Tokenizer.load(base / "tokenizer.json")
    conversations = [task_conversation(t) for t in read_tasks(data / "tasks_train.jsonl")]
    (a, mask), (b, _) = chat_token_stream(tok, conversations, 1), chat_token_stream(tok, conversations, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, chat_token_stream(tok, conversations, 2)[0])
    assert mask.shape == a.shape and 0 < mask.sum() < len(a) / 2  # replies are the short half of a task
    assert (a == tok.im_end_id).sum() == 2 * len(conversations)  # user and assistant turn of each, once


def test_chat_rows_must_leave_text_rows(tiny_world) -> None:
    tok = Tokenizer.load(tiny_world[1] / "tokenizer.json")
    with pytest.raises(ConfigError, match="--data.chat_rows=6 must be below --loop.batch_size=6"):
        _stage(tok, np.arange(100, dtype=np.int64), rows=6)


def test_chat_rows_from_parquet_equal_those_from_jsonl(tiny_world, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, base = tiny_world
    tok = Tokenizer.load(base / "tokenizer.json")
    tasks = read_tasks(data / "tasks_train.jsonl")
    pq.write_table(pa.Table.from_pylist(tasks), tmp_path / "tasks.parquet")
    from_jsonl = chat_pretraining_tokens(str(data / "tasks_train.jsonl"), tok, seed=3)[0]
    assert np.array_equal(chat_pretraining_tokens(str(tmp_path / "tasks.parquet"), tok, seed=3)[0], from_jsonl)
    with pytest.raises(ValueError, match="file not found"):
        chat_pretraining_tokens(str(tmp_path / "missing.jsonl"), tok, seed=3)


def test_reply_only_chat_loss_counts_text_and_assistant_replies_only(tiny_world) -> None:
    """--data.chat_loss=replies: a chat row's loss counts the targets inside assistant replies (their <|im_end|>
    included) and nothing of the question; text rows count every token; the windows are the same as without."""
    data, base = tiny_world
    tok = Tokenizer.load(base / "tokenizer.json")
    chat, mask = chat_pretraining_tokens(str(data / "tasks_train.jsonl"), tok, seed=3)
    plain = next(_stage(tok, chat, rows=2).batches("train"))
    batch = next(_stage(tok, chat, rows=2, mask=mask).batches("train"))
    assert "mask" not in plain and torch.equal(plain["ids"], batch["ids"])
    assert batch["mask"][:4].all()  # text rows
    counted, skipped = batch["targets"][4:][batch["mask"][4:]], batch["targets"][4:][~batch["mask"][4:]]
    assert 0 < len(counted) < len(skipped)
    assert tok.im_start_id not in counted.tolist() and tok.im_start_id in skipped.tolist()
    # each counted target is a reply token of the stream: find a row's window and compare with the mask there
    stage = _stage(tok, chat, rows=2, mask=mask)
    for row, (_, start) in enumerate(stage.chat_windows.draws(0)):
        assert torch.equal(batch["mask"][4 + row], torch.from_numpy(mask[start + 1 : start + 17]))
    logits = torch.randn(*batch["ids"].shape, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    loss = stage.loss(lambda ids, logits_at=None: logits if logits_at is None else logits[logits_at], batch)[0]
    assert torch.allclose(loss, per_token[batch["mask"].flatten()].mean())
    assert not torch.allclose(loss, per_token.mean())
