"""Bring your own data: .txt / .jsonl / .parquet give the same tokens, bad rows are named, changed data is noticed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scratchllm.data.chat_batches import render_sft, render_sft_counted
from scratchllm.data.jsonl import DataFormatError, read_conversations, read_preferences, read_tasks
from scratchllm.data.shards import build_shard, build_shards, load_shard
from scratchllm.data.sources import data_fingerprint, iter_text_documents, split_files, text_prefix
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.stages.pretrain import shard_for, shard_set_for

CHAT = Path(__file__).resolve().parents[2] / "corpus" / "chat"
DOCS = ["First document.\nWith two lines.", "第二篇：床前明月光，疑是地上霜。", "Third 😀 one\n\nwith a blank line", "4"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["\n".join(DOCS) * 10], 256 + 40 + 4, progress=False)


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def test_txt_jsonl_and_parquet_give_the_same_shard(tok: Tokenizer, tmp_path: Path) -> None:
    txt = write_txt(tmp_path / "a.txt", DOCS)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "source": "x"} for d in DOCS])
    parquet = write_parquet(tmp_path / "a.parquet", [{"text": d, "id": i} for i, d in enumerate(DOCS)], row_group_size=2)
    shards = {f.suffix: load_shard(build_shard([f], tok, tmp_path / f"{f.suffix[1:]}.bin"), tok) for f in (txt, jsonl, parquet)}
    reference, header = shards[".txt"]
    assert header["n_documents"] == len(DOCS)
    for suffix in (".jsonl", ".parquet"):
        tokens, other = shards[suffix]
        assert np.array_equal(tokens, reference) and other["n_documents"] == header["n_documents"]


def test_streamed_shards_from_parquet_equal_those_from_txt(tok: Tokenizer, tmp_path: Path) -> None:
    docs = DOCS * 50
    txt = write_txt(tmp_path / "t.txt", docs)
    parquet = write_parquet(tmp_path / "t.parquet", [{"text": d} for d in docs], row_group_size=7)
    a = build_shards([txt], tok, tmp_path / "a", shard_tokens=300, batch_chars=500)
    b = build_shards([parquet], tok, tmp_path / "b", shard_tokens=300, batch_chars=500)
    assert len(a) == len(b) > 2
    for x, y in zip(a, b):
        assert np.array_equal(load_shard(x)[0], load_shard(y)[0])


def test_a_split_may_be_one_file_beside_the_folder_it_replaces(tok: Tokenizer, tmp_path: Path) -> None:
    write_parquet(tmp_path / "train.parquet", [{"text": d} for d in DOCS])
    assert split_files(tmp_path / "train") == [tmp_path / "train.parquet"]
    tokens = shard_for(tmp_path / "train", tok, tmp_path / "cache")
    reference, _ = load_shard(build_shard([write_txt(tmp_path / "ref.txt", DOCS)], tok, tmp_path / "ref.bin"), tok)
    assert np.array_equal(tokens, reference)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}])
    with pytest.raises(DataFormatError, match="train.parquet and train.jsonl|train.jsonl and train.parquet"):
        split_files(tmp_path / "train")


@pytest.mark.parametrize("shard_tokens", [0, 200])
def test_changed_data_under_the_same_names_rebuilds_the_shard_cache(tok: Tokenizer, tmp_path: Path,
                                                                    shard_tokens: int, capsys) -> None:
    split = tmp_path / "train"
    split.mkdir()
    write_txt(split / "a.txt", DOCS)

    def tokens() -> np.ndarray:
        if shard_tokens:
            shards = shard_set_for(split, tok, tmp_path / "cache", shard_tokens)
            return np.concatenate([np.asarray(shards[i]) for i in range(len(shards))])
        return np.asarray(shard_for(split, tok, tmp_path / "cache"))

    first = tokens()
    assert np.array_equal(tokens(), first) and "rebuilding" not in capsys.readouterr().out  # same data: reused
    write_txt(split / "a.txt", DOCS[::-1])  # same file name and size, other content
    second = tokens()
    assert "rebuilding" in capsys.readouterr().out
    assert not np.array_equal(second, first) and sorted(second.tolist()) == sorted(first.tolist())


def test_pretrain_into_a_run_folder_built_from_other_data_trains_on_the_new_data(tok: Tokenizer, tmp_path: Path) -> None:
    from scratchllm.train.stages import pretrain

    tok.save(tmp_path / "tokenizer.json")
    flags = ["--loop.batch_size=2", "--loop.seq_len=16", "--loop.eval_batches=1", "--loop.device=cpu", "--loop.max_steps=1",
             "--loop.max_time_s=0", "--loop.eval_every=0", "--loop.checkpoint_every=0"]
    for name, docs in (("A", DOCS), ("B", [d.upper() + " more text here" for d in DOCS])):
        data = tmp_path / name
        data.mkdir()
        write_txt(data / "train.txt", docs * 20)  # the split as one file: data/train.txt
        write_jsonl(data / "val.jsonl", [{"text": d} for d in docs * 5])
        pretrain.run(tmp_path / "run", preset="tiny", tokenizer=tmp_path / "tokenizer.json", data_dir=data, overrides=flags)
        _, header = load_shard(tmp_path / "run" / "pretrain" / "shards" / "train.bin")
        assert header["data"] == data_fingerprint([data / "train.txt"]) and header["files"] == ["train.txt"]


def test_bad_text_rows_name_their_file_and_row(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "ok"}\n\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"t\.jsonl:3: missing key 'text'"):
        list(iter_text_documents(jsonl))
    parquet = write_parquet(tmp_path / "t.parquet", [{"text": "ok"}, {"text": None}, {"text": "fine"}])
    with pytest.raises(DataFormatError, match=r"t\.parquet:2: 'text' is a NoneType"):
        list(iter_text_documents(parquet))
    no_column = write_parquet(tmp_path / "n.parquet", [{"content": "x"}])
    with pytest.raises(DataFormatError, match=r"n\.parquet: no column 'text' \(columns: content\)"):
        list(iter_text_documents(no_column))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="broken.parquet: not a readable Parquet file"):
        list(iter_text_documents(tmp_path / "broken.parquet"))


def test_empty_texts_are_skipped_and_counted(tmp_path: Path, capsys) -> None:
    docs = list(iter_text_documents(write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": " \n"}, {"text": "b"}])))
    assert docs == ["a", "b"]
    assert "e.jsonl: skipped 1 empty 'text' row(s), first at row 2" in capsys.readouterr().err


def test_fingerprint_follows_content_not_names_order_or_times(tmp_path: Path) -> None:
    a = write_txt(tmp_path / "a.txt", DOCS)
    before = data_fingerprint([a])
    write_txt(a, DOCS)  # rewritten, same bytes
    assert data_fingerprint([a]) == before == data_fingerprint([tmp_path])
    write_txt(a, DOCS[:-1])
    assert data_fingerprint([a]) != before
    corpus = data_fingerprint([tmp_path])
    (tmp_path / "chat").mkdir()
    write_jsonl(tmp_path / "chat" / "sft_train.jsonl", [{"messages": []}])
    assert data_fingerprint([tmp_path]) != corpus  # a folder covers the files below it, as a pipeline's corpus


# ---- post-training records -----------------------------------------------------------------------------------
def test_sft_from_parquet_equals_sft_from_the_same_jsonl(tmp_path: Path) -> None:
    from scratchllm.config import model_preset
    from scratchllm.model.gpt import GPT
    from scratchllm.model.io import load_model, save_model
    from scratchllm.train.stages import sft

    sizes = {"sft_train": 64, "sft_val": 16, "tasks_val": 8}
    records = {name: [json.loads(line) for line in (CHAT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
               for name, n in sizes.items()}
    for fmt in ("jsonl", "parquet"):
        (tmp_path / fmt).mkdir()
        for name, rows in records.items():
            (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / fmt / f"{name}.{fmt}", rows)
    assert read_conversations(tmp_path / "parquet" / "sft_train.parquet") == records["sft_train"]
    text = "\n".join(m["content"] for r in records["sft_train"] for m in r["messages"])
    tok = Tokenizer.train([text], 256 + 100 + 4, progress=False)
    base = save_model(tmp_path / "base", GPT(model_preset("tiny", vocab_size=tok.vocab_size)), tok, {})
    flags = ["--loop.max_steps=2", "--loop.batch_size=8", "--loop.eval_every=0", "--loop.checkpoint_every=0",
             "--loop.device=cpu", "--loop.max_time_s=0", "--sft.eval_prompts=1", "--sft.eval_tasks=1",
             "--sft.pretrain_rows=0", f"--sft.pretrain_data={tmp_path / 'none'}"]
    # the stage asks for sft_train.jsonl; in the parquet folder only sft_train.parquet exists, and is read instead
    summaries = {fmt: sft.run(tmp_path / f"run-{fmt}", base, tmp_path / fmt, flags) for fmt in ("jsonl", "parquet")}
    assert summaries["jsonl"]["val_loss"] == summaries["parquet"]["val_loss"]
    a, b = (load_model(tmp_path / f"run-{fmt}" / "sft" / "final")[0] for fmt in ("jsonl", "parquet"))
    assert all(np.array_equal(x.detach().numpy(), y.detach().numpy()) for x, y in zip(a.parameters(), b.parameters()))


def test_hugging_face_preference_and_task_records_are_completed(tmp_path: Path) -> None:
    standard = [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}]  # TRL's "standard" preference shape
    conversational = [{"prompt": [{"role": "user", "content": "你好"}], "chosen": [{"role": "assistant", "content": "你好！"}],
                       "rejected": [{"role": "assistant", "content": "走开"}]}]  # TRL's "conversational" shape
    pairs = read_preferences(write_parquet(tmp_path / "standard.parquet", standard))
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Say hi"}] and pairs[0]["rule"] == "unlabelled"
    pairs = read_preferences(write_parquet(tmp_path / "conversational.parquet", conversational))
    assert pairs[0]["chosen"] == "你好！" and pairs[0]["rejected"] == "走开"
    tasks = read_tasks(write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "What is 2+3?", "answer": 5},
                                                             {"prompt": "法国的首都是哪里？", "answer": "巴黎"}]))
    assert tasks[0] | {} == {"prompt": [{"role": "user", "content": "What is 2+3?"}], "answer": "5", "id": "tasks.jsonl:1",
                             "family": "custom", "lang": "en", "verifier": "math"}
    assert (tasks[1]["lang"], tasks[1]["verifier"]) == ("zh", "exact")
    bundled = read_tasks(CHAT / "tasks_val.jsonl")[:5]  # complete records pass through unchanged
    assert bundled == [json.loads(line) for line in (CHAT / "tasks_val.jsonl").read_text(encoding="utf-8").splitlines()[:5]]


def test_bad_post_training_rows_name_file_and_row(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}]
    with pytest.raises(DataFormatError, match=r"c\.parquet:2: 'messages\[1\]\.role' is 'robot'"):
        read_conversations(write_parquet(tmp_path / "c.parquet", rows))
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: 'chosen' and 'rejected' are identical"):
        read_preferences(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(DataFormatError, match=r"missing\.jsonl: file not found \(nor missing\.parquet\)"):
        read_tasks(tmp_path / "missing.jsonl")


def test_sft_truncation_drop_is_counted_and_printed(tok: Tokenizer, capsys) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    rows, dropped = render_sft_counted(tok, [long_prompt, short, long_prompt], max_len=40)
    assert (len(rows), dropped) == (1, 2)
    assert render_sft(tok, [long_prompt, short, long_prompt], 40, label="sft train") == rows
    assert "[sft train] dropped 2 of 3 conversations" in capsys.readouterr().out


def test_text_prefix_samples_documents_of_any_format(tmp_path: Path) -> None:
    txt = write_txt(tmp_path / "s.txt", DOCS)
    parquet = write_parquet(tmp_path / "s.parquet", [{"text": d} for d in DOCS])
    assert text_prefix(parquet, 0) == "\n\n\n".join(DOCS) == text_prefix(txt, 0).rstrip("\n")
    assert text_prefix(parquet, 10) == DOCS[0]  # whole documents, stopping once n_bytes are reached
