"""Verifiable rewards and the rule-based gold judge, as plain deterministic functions.

Verifiers read the answer only from the canonical place — the LAST "The answer is X." / "答案是 X。" in the
reply — never by searching for a keyword anywhere (PITFALLS.md: "是" inside "我是" was scored correct).
Decisions: numbers are Arabic digits ("42", "42.0", "-3"; thousands separators "1,000" accepted);
Chinese numerals ("四十二") count only where the task's answer is itself a Chinese numeral (exact match).
The gold judge scores replies by the same rules that built the rejected preference replies.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

ANSWER_MARKER = re.compile(r"the answer is|答案是", re.IGNORECASE)
NUMBER = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^-?\d+(?:\.\d+)?$")
RUDE_WORDS = ["stupid", "idiot", "shut up", "dumb", "go away", "annoying", "笨蛋", "闭嘴", "滚", "白痴", "烦死了"]
EVASIVE_PHRASES = ["i don't know", "i do not know", "i can't help", "i cannot help", "no idea", "ask someone else",
                   "我不知道", "我不能回答", "问别人", "不清楚"]


def extract_answer(reply: str) -> str | None:
    """Text after the LAST "The answer is" / "答案是" up to the end of its line, minus the final period."""
    markers = list(ANSWER_MARKER.finditer(reply))
    if not markers:
        return None
    tail = reply[markers[-1].end() :].split("\n", 1)[0].strip()
    tail = re.sub(r"[.。]$", "", tail).strip()
    return tail or None


def parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip().rstrip(".。")
    if not NUMBER.match(text):
        return None
    return float(text.replace(",", ""))


def extract_final_number(reply: str) -> float | None:
    return parse_number(extract_answer(reply))


def verify_math(reply: str, answer: str, tol: float = 1e-6) -> float:
    got, want = extract_final_number(reply), parse_number(answer)
    return float(got is not None and want is not None and abs(got - want) <= tol)


def _normalise(text: str) -> str:
    text = text.strip().rstrip(".。").lower()
    text = re.sub(r"\s*[,，、]\s*", ", ", text)
    return re.sub(r"\s+", " ", text)


def verify_exact(reply: str, answer: str) -> float:
    got = extract_answer(reply)
    return float(got is not None and _normalise(got) == _normalise(answer))


def detect_language(text: str) -> str:
    """'zh' or 'en' when one script clearly dominates, else 'mixed'. A CJK character weighs like a 3-letter word."""
    cjk = 3 * sum("\u4e00" <= c <= "\u9fff" for c in text)
    latin = sum(c.isascii() and c.isalpha() for c in text)
    if cjk + latin == 0:
        return "mixed"
    share = cjk / (cjk + latin)
    return "zh" if share > 0.7 else "en" if share < 0.3 else "mixed"


def verify_format(reply: str, lang: str) -> float:
    """1.0 if the reply is one short line holding the canonical answer sentence in the right language."""
    marker = "the answer is" if lang == "en" else "答案是"
    short = len(reply) <= 80 and "\n" not in reply.strip()
    return float(marker in reply.lower() and extract_answer(reply) is not None and short and not is_repetitive(reply))


VERIFIERS: dict[str, Callable[[str, str], float]] = {"math": verify_math, "exact": verify_exact}


def score_task(reply: str, task: dict[str, Any]) -> float:
    """1.0 if `reply` answers `task` correctly by its verifier, else 0.0."""
    verifier = VERIFIERS.get(task["verifier"])
    if verifier is None:
        raise ValueError(f"task {task.get('id')}: unknown verifier {task['verifier']!r}; use one of {sorted(VERIFIERS)}")
    return verifier(reply, task["answer"])


def composite_reward(reply: str, task: dict[str, Any], weights: dict[str, float] | None = None) -> float:
    """Weighted sum of correctness and format (default 1.0 / 0.1) for GRPO."""
    weights = weights or {"correct": 1.0, "format": 0.1}
    return weights.get("correct", 0.0) * score_task(reply, task) + weights.get("format", 0.0) * verify_format(
        reply, task.get("lang", "en")
    )


def is_repetitive(text: str, n: int = 3, max_repeats: int = 2) -> bool:
    """True if some word (or CJK character) n-gram occurs more than `max_repeats` times: rambling."""
    tokens = re.findall(r"[\u4e00-\u9fff]|[A-Za-z0-9']+", text.lower())
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return bool(grams) and max(grams.values()) > max_repeats


def is_rude(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in RUDE_WORDS)


def is_evasive(text: str) -> bool:
    lowered = text.lower().strip()
    return not lowered or any(phrase in lowered for phrase in EVASIVE_PHRASES)


def gold_score(prompt: list[dict[str, str]], reply: str, task: dict[str, Any] | None = None, ended: bool = True) -> float:
    """Rule-based judge in [0, 1]: the mean of the checks that built the rejected preference replies.

    correct (tasks only), same language as the user, polite, not evasive, not rambling, sane length, ended.
    """
    user_lang = detect_language(next((m["content"] for m in reversed(prompt) if m["role"] == "user"), ""))
    reply_lang = detect_language(reply)
    checks = [
        user_lang == "mixed" or reply_lang in (user_lang, "mixed"),
        not is_rude(reply),
        not is_evasive(reply),
        not is_repetitive(reply),
        0 < len(reply) <= 200,
        ended,
    ]
    if task is not None:
        checks.append(score_task(reply, task) == 1.0)
    return sum(map(float, checks)) / len(checks)
