"""Read and validate JSONL data (conversations, preference pairs, verifiable tasks) before any compute starts.

A malformed line raises DataFormatError naming file:line (1-based), the field and the fix. Nothing is
dropped silently: with skip_bad_lines=True bad lines are counted and reported instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
VERIFIER_NAMES = ("math", "exact")


class DataFormatError(ValueError):
    """A data record is malformed; the message names file:line, the field and the fix."""


def _check_messages(messages: Any, field: str, last_role: str | None = None) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{\"role\", \"content\"}} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"'{field}[{i}]' must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"'{field}[{i}].role' is {m['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"'{field}[{i}].content' must be a non-empty string"
    if last_role and messages[-1]["role"] != last_role:
        return f"'{field}' must end with a {last_role} message"
    return None


def _check_conversation(r: dict[str, Any]) -> str | None:
    problem = _check_messages(r.get("messages"), "messages")
    if problem is None and not any(m["role"] == "assistant" for m in r["messages"]):
        return "'messages' has no assistant message, so nothing would be trained"
    return problem


def _check_preference(r: dict[str, Any]) -> str | None:
    problem = _check_messages(r.get("prompt"), "prompt", last_role="user")
    if problem:
        return problem
    for key in ("chosen", "rejected"):
        if not isinstance(r.get(key), str) or not r[key].strip():
            return f"'{key}' must be a non-empty string"
    return None


def _check_task(r: dict[str, Any]) -> str | None:
    for key in ("id", "family", "answer"):
        if not isinstance(r.get(key), str) or not r[key]:
            return f"'{key}' must be a non-empty string"
    if r.get("lang") not in ("en", "zh"):
        return "'lang' must be \"en\" or \"zh\""
    if r.get("verifier") not in VERIFIER_NAMES:
        return f"'verifier' is {r.get('verifier')!r}; use one of {', '.join(VERIFIER_NAMES)}"
    return _check_messages(r.get("prompt"), "prompt", last_role="user")


def read_jsonl(
    path: str | Path, check: Callable[[dict[str, Any]], str | None], skip_bad_lines: bool = False
) -> tuple[list[dict[str, Any]], int]:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    records, bad = [], 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else "each line must be a JSON object"
            problem = problem or check(record)
        except json.JSONDecodeError as err:
            problem = f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
        if problem:
            if not skip_bad_lines:
                raise DataFormatError(f"{path}:{line_no}: {problem}")
            bad += 1
            continue
        records.append(record)
    if bad:
        print(f"warning: {path}: skipped {bad} malformed line(s) (--skip-bad-lines)")
    return records, bad


def read_conversations(path: str | Path, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    return read_jsonl(path, _check_conversation, skip_bad_lines)[0]


def read_preferences(path: str | Path, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    return read_jsonl(path, _check_preference, skip_bad_lines)[0]


def read_tasks(path: str | Path, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    return read_jsonl(path, _check_task, skip_bad_lines)[0]
