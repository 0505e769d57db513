"""Data validation names file:line; task generators are deterministic and their held-out split is clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scratchllm.data.jsonl import DataFormatError, read_conversations, read_preferences, read_tasks
from scratchllm.data.rewards import gold_score, score_task
from scratchllm.data.tasks import canonical_reply, from_chinese_numeral, generate_tasks, to_chinese_numeral

CHAT = Path(__file__).resolve().parents[2] / "corpus" / "chat"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("{not json", r":2: invalid JSON"),
        (json.dumps({"messages": []}), r":2: 'messages' must be a non-empty list"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r":2: 'messages\[0\].role' is 'bot'"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), r":2: 'messages\[0\].content' is a int; it must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), r":2: 'messages' has no assistant"),
        ("[1, 2]", r":2: each line must be a JSON object"),
    ],
)
def test_bad_conversation_line_names_file_and_line(tmp_path: Path, bad: str, match: str) -> None:
    path = _write(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataFormatError, match=match) as err:
        read_conversations(path)
    assert str(path) in str(err.value)


def test_skip_bad_lines_counts_instead_of_failing(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "data.jsonl", [GOOD, "{oops", GOOD])
    records, n_skipped = read_conversations(path, skip_bad_lines=True)
    assert len(records) == 2 and n_skipped == 1
    assert "data.jsonl:2: invalid JSON" in capsys.readouterr().err  # the warning names the first bad line


def test_preference_and_task_validation(tmp_path: Path) -> None:
    pair = {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataFormatError, match="must end with a user message"):
        read_preferences(_write(tmp_path / "p.jsonl", [json.dumps(pair)]))
    task = {"id": "1", "family": "add", "lang": "en", "prompt": [{"role": "user", "content": "1+1"}], "answer": "2",
            "verifier": "guess"}
    with pytest.raises(DataFormatError, match=r"t.jsonl:1: 'verifier' is 'guess'"):
        read_tasks(_write(tmp_path / "t.jsonl", [json.dumps(task)]))


def test_generators_are_deterministic_and_self_consistent() -> None:
    a, b = generate_tasks(300, seed=5), generate_tasks(300, seed=5)
    assert a == b and a != generate_tasks(300, seed=6)
    for task in a:
        assert score_task(canonical_reply(task["answer"], task["lang"]), task) == 1.0
        assert score_task(canonical_reply(task["answer"] + "9", task["lang"]), task) == 0.0


@pytest.mark.parametrize(("n", "text"), [(0, "零"), (10, "十"), (15, "十五"), (20, "二十"), (105, "一百零五"), (123, "一百二十三"), (1001, "一千零一"), (2030, "二千零三十")])
def test_chinese_numerals(n: int, text: str) -> None:
    assert to_chinese_numeral(n) == text and from_chinese_numeral(text) == n


def test_shipped_held_out_tasks_never_seen_in_training_files() -> None:
    held = {json.dumps(t["prompt"], ensure_ascii=False) for t in read_tasks(CHAT / "tasks_val.jsonl")}
    assert len(held) >= 400
    seen = set()
    for conv in read_conversations(CHAT / "sft_train.jsonl") + read_conversations(CHAT / "sft_val.jsonl"):
        for m in conv["messages"]:
            if m["role"] == "user":
                seen.add(json.dumps([m], ensure_ascii=False))
    seen |= {json.dumps(t["prompt"], ensure_ascii=False) for t in read_tasks(CHAT / "tasks_train.jsonl")}
    seen |= {json.dumps(p["prompt"], ensure_ascii=False) for p in read_preferences(CHAT / "prefs_train.jsonl")}
    seen |= {json.dumps(p["prompt"], ensure_ascii=False) for p in read_preferences(CHAT / "prefs_val.jsonl")}
    assert not held & seen


def test_shipped_chat_data_is_exactly_what_the_build_script_makes() -> None:
    # The data is generated, not curated by hand: a stale file (tasks.py changed, data not rebuilt) fails here.
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_chat_data.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gold_judge_scores_every_shipped_chosen_reply_1_and_every_rejected_reply_lower() -> None:
    # The judge checks the rules the pairs were built by; a rule it cannot see would let PPO hack the reward model.
    for name in ("prefs_train.jsonl", "prefs_val.jsonl"):
        for line, pair in enumerate(read_preferences(CHAT / name), start=1):
            task, chosen = pair.get("task"), pair["chosen"]
            assert gold_score(pair["prompt"], chosen, task, True, chosen) == 1.0, (name, line)
            if pair["rule"] == "wrong_answer" and task is None:  # a hand-written fact ("the capital of Peru")
                assert pair.get("source") == "handwritten", (name, line)  # has no verifier: the judge cannot see it
                continue
            rejected = gold_score(pair["prompt"], pair["rejected"], task, not pair["rejected_truncated"], chosen)
            assert rejected < 1.0, (name, line, pair["rule"], pair["rejected"])


def test_copy_drills_are_shipped_for_pretraining_only_and_answer_from_the_question() -> None:
    from scratchllm.data.tasks import DRILLS, FAMILIES

    drills = read_tasks(CHAT / "drills_train.jsonl")
    assert {t["family"] for t in drills} == set(DRILLS) and not set(DRILLS) & set(FAMILIES)
    assert not {t["family"] for t in read_tasks(CHAT / "tasks_val.jsonl")} & set(DRILLS)  # never evaluated
    for task in drills:
        assert task["answer"] in task["prompt"][-1]["content"]  # a copy of part of the question
        assert score_task(canonical_reply(task["answer"], task["lang"]), task) == 1.0
