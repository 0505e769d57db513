"""Read and validate JSONL data (conversations, preference pairs, verifiable tasks) before any compute starts.

Every record is checked when the file is read, so a bad line fails in a second rather than an hour into
training. A malformed line raises DataFormatError naming `file:line` (1-based), the field and the fix.
Nothing is dropped silently: with `skip_bad_lines=True` bad lines are counted, reported on stderr with
their first error, and the count is returned beside the records.

Schemas (corpus/README.md, "Post-training data"):
  conversations  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preferences    {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str, "rule": str,
                  optional "rejected_truncated": bool, optional "task": <task record>}
  tasks          {"id": str, "family": str, "lang": "en"|"zh", "prompt": [messages ending with a user turn],
                  "answer": str, "verifier": "math"|"exact"}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

ROLES = ("system", "user", "assistant")
VERIFIER_NAMES = ("math", "exact")  # must equal train/rewards.VERIFIERS (a test checks it)
LANGS = ("en", "zh")

Record = dict[str, Any]
Check = Callable[[Record], "str | None"]


class DataFormatError(ValueError):
    """A data record is malformed; the message names file:line, the field and the fix."""


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


def read_jsonl(path: str | Path, check: Check, skip_bad_lines: bool = False) -> tuple[list[Record], int]:
    """(records, number of bad lines skipped). Raises DataFormatError on the first bad line unless skipping."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; rebuild it with `python scripts/build_chat_data.py`")
    records: list[Record] = []
    bad: list[str] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            problem: str | None = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = f"not valid UTF-8 (byte {err.start}); save the file as UTF-8"
            else:
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) carry no record
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
                else:
                    problem = check(record) if isinstance(record, dict) else (
                        f"each line must be a JSON object, got a {type(record).__name__}")
            if problem:
                if not skip_bad_lines:
                    raise DataFormatError(f"{path}:{line_no}: {problem}")
                bad.append(f"{path}:{line_no}: {problem}")
                continue
            records.append(record)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} malformed line(s); first: {bad[0]}", file=sys.stderr)
    if not records:
        raise DataFormatError(f"{path}: no valid records; the file is empty or every line is malformed")
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
    records, n_bad = read_jsonl(path, check_preference, skip_bad_lines)
    return (records, n_bad) if skip_bad_lines else records


@overload
def read_tasks(path: str | Path, skip_bad_lines: Literal[False] = False) -> list[Record]: ...
@overload
def read_tasks(path: str | Path, skip_bad_lines: Literal[True]) -> tuple[list[Record], int]: ...
def read_tasks(path: str | Path, skip_bad_lines: bool = False) -> list[Record] | tuple[list[Record], int]:
    """Verifiable tasks; with skip_bad_lines=True returns (records, n_skipped)."""
    records, n_bad = read_jsonl(path, check_task, skip_bad_lines)
    return (records, n_bad) if skip_bad_lines else records
