"""Read and validate JSONL or Parquet data (conversations, preference pairs, verifiable tasks) before any compute.

Every record is checked when the file is read, so a bad line fails in a second rather than an hour into
training. A malformed line raises DataFormatError naming `file:line` (1-based), the field and the fix.
Nothing is dropped silently: with `skip_bad_lines=True` bad lines are counted, reported on stderr with
their first error, and the count is returned beside the records.

A path ending in .jsonl is read as Parquet when only `<stem>.parquet` exists (data/sources.py reads both), so
every stage's `sft_train.jsonl` & co. can be Parquet files. Records in the Hugging Face / TRL shapes are
completed before checking: a string `prompt` becomes one user message; a `chosen`/`rejected` given as a single
assistant message becomes its text; a pair without `rule` gets "unlabelled"; a `prompt`/`answer` task without
`id`, `family`, `lang`, `verifier` gets `<file>:<row>`, "custom", zh/en by its characters, math/exact by its answer.

Schemas (corpus/README.md, "Post-training data"):
  conversations  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preferences    {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str, "rule": str,
                  optional "rejected_truncated": bool, optional "task": <task record>}
  tasks          {"id": str, "family": str, "lang": "en"|"zh", "prompt": [messages ending with a user turn],
                  "answer": str, "verifier": "math"|"exact"}
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

from scratchllm.data.sources import DataFormatError, iter_rows
from scratchllm.runtime import bundled

ROLES = ("system", "user", "assistant")
VERIFIER_NAMES = ("math", "exact")  # must equal data/rewards.VERIFIERS (a test checks it)
LANGS = ("en", "zh")

Record = dict[str, Any]
Check = Callable[[Record], "str | None"]
Normalize = Callable[[Record, str], Record]
RECORD_SUFFIXES = (".jsonl", ".parquet")


def _user_prompt(prompt: Any) -> Any:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _has_han(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_preference(record: Record, where: str) -> Record:
    """TRL's shapes -> ours: prompt string -> [user message]; reply [{assistant message}] -> its text."""
    record = {**record, "prompt": _user_prompt(record.get("prompt"))} if "prompt" in record else dict(record)
    for side in ("chosen", "rejected"):
        reply = record.get(side)
        if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict) and reply[0].get("role") == "assistant":
            record[side] = reply[0].get("content")
    record.setdefault("rule", "unlabelled")  # the reward stage reports accuracy per rule
    return record


def normalize_task(record: Record, where: str) -> Record:
    """`{"prompt", "answer"}` -> a full task record; fields already given are kept as they are."""
    record = {**record, "prompt": _user_prompt(record.get("prompt"))} if "prompt" in record else dict(record)
    if isinstance(record.get("answer"), (int, float)) and not isinstance(record["answer"], bool):
        record["answer"] = str(record["answer"])  # Parquet/JSON numbers: the verifiers compare text
    record.setdefault("id", where)
    record.setdefault("family", "custom")
    prompt = record["prompt"] if isinstance(record.get("prompt"), list) else []
    text = " ".join(m.get("content") or "" for m in prompt if isinstance(m, dict))
    record.setdefault("lang", "zh" if _has_han(text) else "en")
    answer = record.get("answer")
    record.setdefault("verifier", "math" if isinstance(answer, str) and _is_number(answer) else "exact")
    return record


def resolve_record_file(path: str | Path) -> Path:
    """`path` if it exists, else the one file with the same stem and the other record suffix (x.jsonl -> x.parquet)."""
    path = bundled(path)
    if path.is_file():
        return path
    others = [path.with_suffix(s) for s in RECORD_SUFFIXES if path.with_suffix(s) != path and path.with_suffix(s).is_file()]
    if len(others) == 1:
        return others[0]
    raise DataFormatError(f"{path}: file not found (nor {path.stem}.parquet); rebuild the bundled data with "
                          "`python scripts/build_chat_data.py` or point --data-dir at your own files")


def _check_messages(messages: Any, field: str, last_role: str | None = None) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects"
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            return f"'{where}' must be an object like {{\"role\": \"user\", \"content\": \"...\"}}"
        for key in ("role", "content"):
            if key not in m:
                return f"'{where}' is missing '{key}'; add it"
        if m["role"] not in ROLES:
            return f"'{where}.role' is {m['role']!r}; use one of {', '.join(ROLES)}"
        if m["role"] == "system" and i != 0:
            return f"'{where}.role' is 'system' but a system message may only come first; move it to the start"
        if not isinstance(m["content"], str):
            return f"'{where}.content' is a {type(m['content']).__name__}; it must be a string"
        if not m["content"].strip():
            return f"'{where}.content' is empty; write the message text or remove the message"
    if last_role and messages[-1]["role"] != last_role:
        return f"'{field}' ends with a {messages[-1]['role']} message; it must end with a {last_role} message"
    return None


def _check_string(record: Record, key: str) -> str | None:
    if key not in record:
        return f"missing key '{key}'; add a non-empty string"
    if not isinstance(record[key], str):
        return f"'{key}' is a {type(record[key]).__name__}; it must be a string"
    if not record[key].strip():
        return f"'{key}' is empty; it must be a non-empty string"
    return None


def check_conversation(record: Record) -> str | None:
    """None if `record` is a valid conversation, else what is wrong and how to fix it."""
    if "messages" not in record:
        return "missing key 'messages'; each line must look like {\"messages\": [...]}"
    problem = _check_messages(record["messages"], "messages")
    if problem is None and not any(m["role"] == "assistant" for m in record["messages"]):
        return "'messages' has no assistant message, so nothing would be trained; add the assistant's reply"
    return problem


def check_task(record: Record) -> str | None:
    """None if `record` is a valid verifiable task, else what is wrong and how to fix it."""
    for key in ("id", "family", "answer"):
        problem = _check_string(record, key)
        if problem:
            return problem
    if record.get("lang") not in LANGS:
        return f"'lang' is {record.get('lang')!r}; use \"en\" or \"zh\""
    if record.get("verifier") not in VERIFIER_NAMES:
        return f"'verifier' is {record.get('verifier')!r}; use one of {', '.join(VERIFIER_NAMES)}"
    if "prompt" not in record:
        return "missing key 'prompt'; add the list of messages ending with the user's question"
    return _check_messages(record["prompt"], "prompt", last_role="user")


def check_preference(record: Record) -> str | None:
    """None if `record` is a valid preference pair, else what is wrong and how to fix it."""
    if "prompt" not in record:
        return "missing key 'prompt'; add the list of messages ending with a user turn"
    problem = _check_messages(record["prompt"], "prompt", last_role="user")
    for key in ("chosen", "rejected", "rule"):
        problem = problem or _check_string(record, key)
    if problem:
        return problem
    if record["chosen"] == record["rejected"]:
        return "'chosen' and 'rejected' are identical, so the pair teaches nothing; fix or remove it"
    if "rejected_truncated" in record and not isinstance(record["rejected_truncated"], bool):
        return "'rejected_truncated' must be true or false"
    if "task" in record:
        inner = check_task(record["task"]) if isinstance(record["task"], dict) else "it must be an object"
        if inner:
            return f"'task' is not a valid task record: {inner}"
    return None


def read_jsonl(path: str | Path, check: Check, skip_bad_lines: bool = False,
               normalize: Normalize | None = None) -> tuple[list[Record], int]:
    """(records, number of bad rows skipped) of a .jsonl or .parquet file. Raises DataFormatError on the first bad
    row (naming file:row) unless skipping; `normalize(record, "file:row")` completes a record before its check."""
    path = resolve_record_file(path)
    records: list[Record] = []
    bad: list[str] = []
    for row, record, problem in iter_rows(path):
        if problem is None:
            if normalize is not None:
                record = normalize(record, f"{path.name}:{row}")
            problem = check(record)
        if problem:
            if not skip_bad_lines:
                raise DataFormatError(f"{path}:{row}: {problem}")
            bad.append(f"{path}:{row}: {problem}")
            continue
        records.append(record)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} malformed record(s); first: {bad[0]}", file=sys.stderr)
    if not records:
        raise DataFormatError(f"{path}: no valid records; the file is empty or every record is malformed")
    return records, len(bad)


@overload
def read_conversations(path: str | Path, skip_bad_lines: Literal[False] = False) -> list[Record]: ...
@overload
def read_conversations(path: str | Path, skip_bad_lines: Literal[True]) -> tuple[list[Record], int]: ...
def read_conversations(path: str | Path, skip_bad_lines: bool = False) -> list[Record] | tuple[list[Record], int]:
    """SFT conversations; with skip_bad_lines=True returns (records, n_skipped)."""
    records, n_bad = read_jsonl(path, check_conversation, skip_bad_lines)
    return (records, n_bad) if skip_bad_lines else records


@overload
def read_preferences(path: str | Path, skip_bad_lines: Literal[False] = False) -> list[Record]: ...
@overload
def read_preferences(path: str | Path, skip_bad_lines: Literal[True]) -> tuple[list[Record], int]: ...
def read_preferences(path: str | Path, skip_bad_lines: bool = False) -> list[Record] | tuple[list[Record], int]:
    """Preference pairs; with skip_bad_lines=True returns (records, n_skipped)."""
    records, n_bad = read_jsonl(path, check_preference, skip_bad_lines, normalize_preference)
    return (records, n_bad) if skip_bad_lines else records


@overload
def read_tasks(path: str | Path, skip_bad_lines: Literal[False] = False) -> list[Record]: ...
@overload
def read_tasks(path: str | Path, skip_bad_lines: Literal[True]) -> tuple[list[Record], int]: ...
def read_tasks(path: str | Path, skip_bad_lines: bool = False) -> list[Record] | tuple[list[Record], int]:
    """Verifiable tasks; with skip_bad_lines=True returns (records, n_skipped)."""
    records, n_bad = read_jsonl(path, check_task, skip_bad_lines, normalize_task)
    return (records, n_bad) if skip_bad_lines else records
