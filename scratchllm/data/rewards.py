"""Verifiable rewards and the rule-based gold judge, as plain deterministic functions.

Where the answer is read (PITFALLS.md: a verifier that found "是" inside "我是" made every answer correct):
the answer span is the text after the LAST "The answer is" / "答案是" up to the end of that sentence
(the first "。", "!", "?", a "." followed by a space or the end, or a newline). A reply without that
marker has no answer, whatever digits it contains. So "The answer is 43. Actually the answer is 42." is
judged on 42, and "The answer is 42, not 43." has the span "42, not 43", which is not a number: wrong.

Number decisions (verify_math / extract_final_number): the span must be exactly one number in Arabic
digits after NFKC (full-width digits fold to ASCII): "42", "42.0", "-3", and "1,000" with correct
thousands grouping ("1,00" is rejected). Chinese numerals ("四十二") are NOT numbers here; they are
accepted only by verify_exact, i.e. only in the zh_numeral family where the answer itself is a numeral.

verify_exact compares the span and the answer after normalisation: NFKC, case-folded, surrounding
quotes and the final full stop removed, list separators (, ， 、) rewritten as ", ", whitespace collapsed.

The gold judge scores a reply by the SAME rules that built the rejected preference replies in
scripts/build_chat_data.py: wrong_answer, wrong_language, rude, evasive, rambling, no_end, off_topic (+ length).
off_topic needs the pair's chosen reply as a reference: a chat reply is on topic when its character 3-grams
overlap the reference's (Dice >= ON_TOPIC_MIN_DICE), which every reply of the right template does ("'cow' in
Chinese is 牛." for "'horse' in Chinese is 马.") and a reply to another question does not ("The answer is 1."
to "Who are you?": PPO without this rule learned to say it to every prompt and the judge did not notice).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

ANSWER_MARKER = re.compile(r"\bthe answer is\b|答案是", re.IGNORECASE)
# The answer sentence ends at Chinese/explicit terminators, a newline, or a "." that is not a decimal point.
SPAN_END = re.compile(r"[。！？!?\n]|\.(?=\s|$)")
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")

# Rude words: English ones match whole words only ("dumbbell" is not rude), Chinese ones as substrings.
RUDE_EN = ["stupid", "idiot", "dumb", "shut up", "go away", "annoying", "moron", "get lost", "loser", "useless",
           "figure it out yourself", "who cares"]
RUDE_ZH = ["笨蛋", "闭嘴", "滚开", "白痴", "烦死了", "蠢", "傻瓜", "别烦我", "自己想去"]
EVASIVE_PHRASES = ["i don't know", "i do not know", "i can't help", "i cannot help", "no idea", "ask someone else",
                   "i won't answer", "i'd rather not say", "我不知道", "我不能回答", "问别人", "不清楚", "无可奉告",
                   "我不想回答"]
_RUDE_EN_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in RUDE_EN) + r")\b", re.IGNORECASE)

# Calibrated on one SFT model's greedy replies to the held-out chat prompts: those with the right template
# overlap their reference at Dice 0.35-0.85, another question's reference reply <= 0.15 in 9 of 10 draws.
ON_TOPIC_MIN_DICE = 0.2
MAX_REPLY_CHARS = 200  # "sane length": canonical replies are < 60 characters
MAX_FORMAT_CHARS = 80  # verify_format: a task reply is one short sentence


def extract_answer(reply: str) -> str | None:
    """The answer span of the LAST "The answer is" / "答案是" (module docstring), or None if there is none."""
    markers = list(ANSWER_MARKER.finditer(reply))
    if not markers:
        return None
    tail = reply[markers[-1].end() :]
    end = SPAN_END.search(tail)
    span = (tail[: end.start()] if end else tail).strip().strip("'\"“”‘’").strip()
    return span or None


def parse_number(text: str | None) -> float | None:
    """The value of `text` if it is exactly one Arabic-digit number (module docstring), else None."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).strip()
    if not NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def extract_final_number(text: str) -> float | None:
    """The number in the last canonical answer span; None if there is no span or it is not one number."""
    return parse_number(extract_answer(text))


def verify_math(reply: str, answer: str, tol: float = 1e-6) -> float:
    """1.0 if the reply's answer span is a number within `tol` of `answer`, else 0.0."""
    got, want = extract_final_number(reply), parse_number(answer)
    return float(got is not None and want is not None and abs(got - want) <= tol)


def normalise_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip().strip("'\"“”‘’").rstrip(".。").strip()
    text = re.sub(r"\s*[,，、]\s*", ", ", text)
    return re.sub(r"\s+", " ", text)


def verify_exact(reply: str, answer: str) -> float:
    """1.0 if the normalised answer span equals the normalised answer; never a substring test."""
    got = extract_answer(reply)
    return float(got is not None and normalise_answer(got) == normalise_answer(answer))


def detect_language(text: str) -> str:
    """'zh' or 'en' when one script clearly dominates, else 'mixed' (also for text with no letters).

    A CJK character weighs 3 Latin letters (about one short English word); 'zh' above a 70% share,
    'en' below 30%.
    """
    cjk = 3 * len(CJK.findall(text))
    latin = sum(len(w) for w in LATIN_WORD.findall(text))
    if cjk + latin == 0:
        return "mixed"
    share = cjk / (cjk + latin)
    return "zh" if share > 0.7 else "en" if share < 0.3 else "mixed"


def is_repetitive(text: str, n: int = 3, max_repeats: int = 2) -> bool:
    """True if some word (or CJK character) n-gram occurs more than `max_repeats` times: rambling."""
    tokens = re.findall(r"[\u4e00-\u9fff]|[a-z0-9']+", unicodedata.normalize("NFKC", text).lower())
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return bool(grams) and max(grams.values()) > max_repeats


def verify_format(reply: str, lang: str) -> float:
    """1.0 if the reply holds this language's answer sentence, is one short line and does not repeat itself."""
    marker = "the answer is" if lang == "en" else "答案是"
    markers = list(ANSWER_MARKER.finditer(reply))
    ok = (
        bool(markers)
        and markers[-1].group(0).lower() == marker
        and extract_answer(reply) is not None
        and len(reply) <= MAX_FORMAT_CHARS
        and "\n" not in reply.strip()
        and not is_repetitive(reply)
    )
    return float(ok)


VERIFIERS: dict[str, Callable[[str, str], float]] = {"math": verify_math, "exact": verify_exact}


def score_task(reply: str, task: dict[str, Any]) -> float:
    """1.0 if `reply` answers `task` correctly by its verifier, else 0.0."""
    verifier = VERIFIERS.get(task["verifier"])
    if verifier is None:
        raise ValueError(f"task {task.get('id')}: unknown verifier {task['verifier']!r}; use one of {sorted(VERIFIERS)}")
    return verifier(reply, task["answer"])


DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.1}


def composite_reward(reply: str, task: dict[str, Any], weights: dict[str, float] | None = None) -> float:
    """Weighted sum of correctness and format (default 1.0 / 0.1, so format alone never beats a right answer)."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown reward weight(s) {sorted(unknown)}; use {sorted(DEFAULT_WEIGHTS)}")
    return weights.get("correct", 0.0) * score_task(reply, task) + weights.get("format", 0.0) * verify_format(
        reply, task.get("lang", "en")
    )


def is_rude(text: str) -> bool:
    return bool(_RUDE_EN_RE.search(text)) or any(word in text for word in RUDE_ZH)


def is_evasive(text: str) -> bool:
    """Empty, or a refusal phrase without any canonical answer ("I don't know. The answer is 4." is not evasive)."""
    lowered = text.lower().strip()
    if not lowered:
        return True
    return any(phrase in lowered for phrase in EVASIVE_PHRASES) and extract_answer(text) is None


QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|“[^”]*”|‘[^’]*’|[:：].*$", re.DOTALL)


def prompt_language(text: str) -> str:
    """Language of a user message, ignoring quoted material and whatever follows a colon, which is the payload
    ("跟我说：flower" is a Chinese request; "Repeat after me: 苹果" an English one)."""
    frame = detect_language(QUOTED.sub(" ", text))
    return frame if frame != "mixed" else detect_language(text)


def reply_language(reply: str, user_text: str, user_lang: str) -> str:
    """Language of the reply's own words: the answer span is dropped (a list "c, b, a" or a numeral may be in
    either script) and foreign-script words quoted from the user ("跟我说：apple" -> "apple") are ignored."""
    markers = list(ANSWER_MARKER.finditer(reply))
    if markers:
        reply = reply[: markers[-1].end()]
    if user_lang == "zh":
        quoted = {w.casefold() for w in LATIN_WORD.findall(user_text)}
        reply = LATIN_WORD.sub(lambda m: " " if m.group(0).casefold() in quoted else m.group(0), reply)
    elif user_lang == "en":
        quoted_chars = set(CJK.findall(user_text))
        reply = "".join(" " if c in quoted_chars else c for c in reply)
    return detect_language(reply)


def char_ngram_dice(a: str, b: str, n: int = 3) -> float:
    """Dice overlap 2|A∩B| / (|A|+|B|) of the character n-gram multisets of two texts (NFKC, case-folded,
    padded with a space at each end so a two-character reply such as "猫。" still has n-grams)."""
    def grams(text: str) -> Counter[str]:
        words = unicodedata.normalize("NFKC", text).casefold().split()
        text = " " + " ".join(words) + " " if words else ""
        return Counter(text[i : i + n] for i in range(len(text) - n + 1))

    left, right = grams(a), grams(b)
    if not left or not right:
        return 0.0
    return 2 * sum((left & right).values()) / (sum(left.values()) + sum(right.values()))


def is_on_topic(reply: str, reference: str) -> bool:
    """The reply answers the question its reference reply answers (module docstring: the off_topic rule)."""
    return char_ngram_dice(reply, reference) >= ON_TOPIC_MIN_DICE


# Correctness (tasks) and staying on topic (chat prompts, which have no verifier) are the substance: double.
GOLD_WEIGHTS = {"correct": 2.0, "on_topic": 2.0, "language": 1.0, "polite": 1.0, "not_evasive": 1.0,
                "not_rambling": 1.0, "sane_length": 1.0, "ended": 1.0}


def gold_checks(prompt: list[dict[str, str]], reply: str, task: dict[str, Any] | None = None,
                ended: bool = True, reference: str | None = None) -> dict[str, bool]:
    """Each gold rule, True = passed. `correct` is present only when a task is given, `on_topic` only when a
    reference reply is given without a task (a task's verifier already says whether its question was answered)."""
    user_text = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    user_lang = task["lang"] if task is not None else prompt_language(user_text)
    reply_lang = reply_language(reply, user_text, user_lang)
    checks = {
        "language": user_lang == "mixed" or reply_lang in (user_lang, "mixed"),
        "polite": not is_rude(reply),
        "not_evasive": not is_evasive(reply),
        "not_rambling": not is_repetitive(reply),
        "sane_length": 0 < len(reply.strip()) <= MAX_REPLY_CHARS,
        "ended": ended,
    }
    if task is not None:
        checks["correct"] = score_task(reply, task) == 1.0
    elif reference is not None:
        checks["on_topic"] = is_on_topic(reply, reference)
    return checks


def gold_score(prompt: list[dict[str, str]], reply: str, task: dict[str, Any] | None = None,
               ended: bool = True, reference: str | None = None) -> float:
    """Rule-based judge in [0, 1]: the weighted share of gold rules passed (correctness and on-topic count double).

    `ended` is False when the reply stopped without <|im_end|> (the no_end rule). A correct, polite,
    on-language, short, ended reply scores 1.0; each rejection rule costs at least 1/8.
    """
    checks = gold_checks(prompt, reply, task, ended, reference)
    total = sum(GOLD_WEIGHTS[k] for k in checks)
    return sum(GOLD_WEIGHTS[k] for k, ok in checks.items() if ok) / total
