"""Seeded generators of verifiable tasks (English and Chinese) that a small model can partly learn, once it has
seen enough of them to read its prompt (docs/grpo.md: the 15-minute pipeline's SFT is not enough; a longer drill is).

Canonical reply, one per language (the verifiers in data/rewards.py read the answer only from here):

    English: "The answer is X."        Chinese: "答案是 X。"

X is Arabic digits for numeric answers ("42", "-3"), "a, b, c" (comma + space) for lists, and Chinese
numerals ("一百二十三") only in the `zh_numeral` family's digits -> characters direction.

Operands are single digits (0-9; 0-20 for next_number and zh_numeral). The tokenizer gives each
digit its own token, so reading such an operand is attending to one token of the prompt; a two-digit operand
has to be copied as a pair in order, the induction skill the CPU model does not have (docs/grpo.md: copy
accuracy 0.000). With single digits a ~1,200-step task drill (`--sft.train_data=tasks`) makes the CPU model
read its prompt (held-out compare 0.875, sort 0.625, against 0.100 and 0.000 for never reading).

Families (each with several templates per language, so no single wording can be memorised):
add, subtract, multiply, double, two_step (a + b - c), compare (larger/smaller), count_letters (in a spaced-out
list), reverse (3-4 letters or words), sort (3 numbers), units (m<->cm, kg<->g, h<->min, min<->s, week<->day),
zh_numeral (一百二十三 <-> 123), next_number (the number after / before n).

Where a family allows it the answer is drawn first, uniformly, and the question built around it: a model that
answers each family's commonest answer without reading (the report's reference column) then scores little,
so a pass@1 above it is reading, not a better guess.

Same seed, same items: `generate_tasks(n, seed)` is a pure function of its arguments.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

ZH_DIGITS = "零一二三四五六七八九"
LANGS = ("en", "zh")


def canonical_reply(answer: str, lang: str) -> str:
    """The one reply format the verifiers accept: "The answer is X." / "答案是 X。"."""
    if lang not in LANGS:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    return f"The answer is {answer}." if lang == "en" else f"答案是 {answer}。"


def to_chinese_numeral(n: int) -> str:
    """0..9999 -> 一千二百三十四 (standard reading: 10-19 as 十X, inner zeros as a single 零)."""
    if not 0 <= n <= 9999:
        raise ValueError(f"{n} is outside 0..9999")
    if n < 10:
        return ZH_DIGITS[n]
    if n < 20:
        return "十" + (ZH_DIGITS[n - 10] if n > 10 else "")
    out, zero_pending = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // value % 10
        if digit == 0:
            zero_pending = bool(out)
            continue
        if zero_pending:
            out += "零"
            zero_pending = False
        out += ZH_DIGITS[digit] + unit
    return out


def from_chinese_numeral(text: str) -> int | None:
    """Inverse of `to_chinese_numeral` (also accepts 两 for 2); None if `text` is not such a numeral."""
    digits = {c: i for i, c in enumerate(ZH_DIGITS)} | {"两": 2}
    units = {"十": 10, "百": 100, "千": 1000}
    if not text or any(c not in digits and c not in units for c in text):
        return None
    total, current, last_unit = 0, 0, 10_000
    for c in text:
        if c in digits:
            current = digits[c]
            continue
        unit = units[c]
        if unit >= last_unit or (current == 0 and c != "十"):
            return None  # "百百", "十百", "零百": not a numeral
        total += (current or 1) * unit
        current, last_unit = 0, unit
    return total + current


def task_conversation(task: dict[str, Any]) -> dict[str, Any]:
    """A task as an SFT conversation: its prompt, then the canonical reply with its answer."""
    return {"messages": [*task["prompt"], {"role": "assistant", "content": canonical_reply(task["answer"], task["lang"])}]}


def question_key(text: str) -> str:
    """Normalised question text used to dedupe splits: case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def prompt_key(prompt: list[dict[str, Any]]) -> str:
    """Key of a rendered prompt: its user turns, normalised. Two prompts asking the same question collide."""
    return " || ".join(question_key(m["content"]) for m in prompt if m["role"] == "user")


Item = dict[str, Any]
Generator = Callable[[random.Random, str], tuple[str, str, str]]  # (question, answer, verifier)


def _pick(rng: random.Random, lang: str, en: list[str], zh: list[str]) -> str:
    return rng.choice(en if lang == "en" else zh)


def _add(rng: random.Random, lang: str) -> tuple[str, str, str]:
    total = rng.randint(0, 18)  # the answer first, uniform: no sum is a better guess than another
    a = rng.randint(max(0, total - 9), min(9, total))  # one digit each: see the module docstring
    b = total - a
    en = [f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}.", f"What is the sum of {a} and {b}?"]
    zh = [f"{a} 加 {b} 等于多少？", f"计算 {a} + {b}。", f"{a} 和 {b} 的和是多少？", f"请算一下 {a} 加上 {b}。"]
    return _pick(rng, lang, en, zh), str(a + b), "math"


def _subtract(rng: random.Random, lang: str) -> tuple[str, str, str]:
    difference = rng.randint(0, 9)  # uniform answer; never negative: one less thing for a tiny model to learn
    b = rng.randint(0, 9 - difference)
    a = b + difference
    en = [f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Compute {a} minus {b}.", f"What is {a} take away {b}?"]
    zh = [f"{a} 减 {b} 等于多少？", f"计算 {a} - {b}。", f"{a} 减去 {b} 是多少？", f"从 {a} 里减掉 {b} 还剩多少？"]
    return _pick(rng, lang, en, zh), str(a - b), "math"


def _double(rng: random.Random, lang: str) -> tuple[str, str, str]:
    # One operand, one lookup: the first skill that shows a model reads its prompt rather than guessing.
    n = rng.randint(0, 9)
    en = [f"What is twice {n}?", f"Double {n}.", f"What is {n} doubled?", f"What is two times {n}?"]
    zh = [f"{n} 的两倍是多少？", f"把 {n} 乘以二。", f"{n} 翻一倍是多少？", f"两个 {n} 加起来是多少？"]
    return _pick(rng, lang, en, zh), str(2 * n), "math"


def _multiply(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    en = [f"What is {a} * {b}?", f"Multiply {a} by {b}.", f"What is {a} times {b}?", f"What is {a} x {b}?"]
    zh = [f"{a} 乘 {b} 等于多少？", f"计算 {a} × {b}。", f"{a} 乘以 {b} 是多少？", f"{a} 的 {b} 倍是多少？"]
    return _pick(rng, lang, en, zh), str(a * b), "math"


def _two_step(rng: random.Random, lang: str) -> tuple[str, str, str]:
    result = rng.randint(0, 9)  # uniform answer, single-digit operands: redraw until c is a digit
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = a + b - result
        if 0 <= c <= 9:
            break
    en = [f"What is {a} + {b} - {c}?", f"Compute {a} plus {b} minus {c}.", f"Add {a} and {b}, then subtract {c}."]
    zh = [f"{a} + {b} - {c} 等于多少？", f"计算 {a} 加 {b} 再减 {c}。", f"先算 {a} 加 {b}，再减去 {c}，结果是多少？"]
    return _pick(rng, lang, en, zh), str(a + b - c), "math"


def _compare(rng: random.Random, lang: str) -> tuple[str, str, str]:
    larger = rng.random() < 0.5
    answer = rng.randint(1, 9) if larger else rng.randint(0, 8)  # the answer first, uniform over what it can be
    other = rng.randint(0, answer - 1) if larger else rng.randint(answer + 1, 9)
    a, b = (answer, other) if rng.random() < 0.5 else (other, answer)  # and in either place
    if larger:
        en = [f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?", f"Which is greater, {a} or {b}?"]
        zh = [f"{a} 和 {b} 哪个更大？", f"{a} 与 {b} 中较大的数是哪个？", f"{a} 和 {b}，哪个数大？"]
    else:
        en = [f"Which is smaller, {a} or {b}?", f"Which number is less: {a} or {b}?", f"Which is lower, {a} or {b}?"]
        zh = [f"{a} 和 {b} 哪个更小？", f"{a} 与 {b} 中较小的数是哪个？", f"{a} 和 {b}，哪个数小？"]
    return _pick(rng, lang, en, zh), str(answer), "math"


def _count_letters(rng: random.Random, lang: str) -> tuple[str, str, str]:
    # Letters spaced out, so each is its own token (inside a word the tokenizer hides them); the count is drawn
    # first, uniform over 1-5, so no count is a good guess.
    count = rng.randint(1, 5)
    letter, *others = rng.sample("abcdefghijklmnopqrstuvwxyz", 3)
    letters = [letter] * count + [rng.choice(others) for _ in range(rng.randint(1, 7 - count))]
    rng.shuffle(letters)
    spelled = " ".join(letters)
    en = [f"How many times does '{letter}' appear in: {spelled}", f"Count the letter '{letter}' in: {spelled}",
          f"How many '{letter}' are in: {spelled}"]
    zh = [f"'{letter}' 在这里出现了几次：{spelled}", f"数一数字母 '{letter}' 的个数：{spelled}",
          f"下面有几个 '{letter}'：{spelled}"]
    return _pick(rng, lang, en, zh), str(count), "math"


SHORT_WORDS = ["cat", "dog", "sun", "red", "cup", "box", "pen", "hat", "map", "egg", "car", "bus", "sky", "tea"]


def _reverse(rng: random.Random, lang: str) -> tuple[str, str, str]:
    pool = "abcdefghijklmnopqrstuvwxyz" if rng.random() < 0.6 else SHORT_WORDS
    items = rng.sample(list(pool), rng.randint(3, 4))
    listed = ", ".join(items)
    en = [f"Reverse the list: {listed}", f"Write this list backwards: {listed}", f"Reverse the order of: {listed}"]
    zh = [f"把这个列表倒过来：{listed}", f"请反转列表：{listed}", f"把下面的顺序倒过来：{listed}"]
    return _pick(rng, lang, en, zh), ", ".join(reversed(items)), "exact"


def _sort(rng: random.Random, lang: str) -> tuple[str, str, str]:
    nums = rng.sample(range(0, 10), 3)
    listed = ", ".join(map(str, nums))
    en = [f"Sort these numbers from smallest to largest: {listed}", f"Put in increasing order: {listed}",
          f"Sort in ascending order: {listed}"]
    zh = [f"把这些数从小到大排序：{listed}", f"按从小到大的顺序排列：{listed}", f"请将下列数字升序排列：{listed}"]
    return _pick(rng, lang, en, zh), ", ".join(map(str, sorted(nums))), "exact"


# (English unit, plural, Chinese unit, English target, Chinese target, factor): n big -> n * factor small.
UNITS = [("meter", "meters", "米", "centimeters", "厘米", 100), ("kilogram", "kilograms", "千克", "grams", "克", 1000),
         ("hour", "hours", "小时", "minutes", "分钟", 60), ("minute", "minutes", "分钟", "seconds", "秒", 60),
         ("week", "weeks", "周", "days", "天", 7)]


def _units(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(1, 9)
    big, bigs, big_zh, small, small_zh, factor = rng.choice(UNITS)
    big_en = big if n == 1 else bigs
    if rng.random() < 0.6:  # big -> small: multiply
        en = [f"How many {small} are in {n} {big_en}?", f"Convert {n} {big_en} to {small}.", f"{n} {big_en} is how many {small}?"]
        zh = [f"{n} {big_zh}等于多少{small_zh}？", f"把 {n} {big_zh}换算成{small_zh}。", f"{n} {big_zh}是多少{small_zh}？"]
        return _pick(rng, lang, en, zh), str(n * factor), "math"
    m = n * factor  # small -> big: divide, always a whole number
    en = [f"How many {bigs} are in {m} {small}?", f"Convert {m} {small} to {bigs}.", f"{m} {small} is how many {bigs}?"]
    zh = [f"{m} {small_zh}等于多少{big_zh}？", f"把 {m} {small_zh}换算成{big_zh}。", f"{m} {small_zh}是多少{big_zh}？"]
    return _pick(rng, lang, en, zh), str(n), "math"


def _zh_numeral(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(0, 20)
    zh_n = to_chinese_numeral(n)
    if rng.random() < 0.5:
        en = [f"Write the Chinese numeral {zh_n} in digits.", f"What number is {zh_n}?", f"Convert {zh_n} to digits."]
        zh = [f"把 {zh_n} 写成阿拉伯数字。", f"{zh_n} 是多少？", f"{zh_n} 用数字怎么写？"]
        return _pick(rng, lang, en, zh), str(n), "math"
    en = [f"Write {n} in Chinese numerals.", f"How do you write {n} in Chinese characters?", f"Convert {n} to a Chinese numeral."]
    zh = [f"把 {n} 写成中文数字。", f"用汉字写出 {n}。", f"{n} 用中文怎么写？"]
    return _pick(rng, lang, en, zh), zh_n, "exact"


def _next_number(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(1, 19)
    if rng.random() < 0.6:
        en = [f"What number comes after {n}?", f"What is the next number after {n}?", f"Count on by one from {n}."]
        zh = [f"{n} 的下一个数是多少？", f"{n} 后面的数是几？", f"比 {n} 大 1 的数是多少？"]
        return _pick(rng, lang, en, zh), str(n + 1), "math"
    en = [f"What number comes before {n}?", f"What is the number just before {n}?", f"What is one less than {n}?"]
    zh = [f"{n} 的前一个数是多少？", f"{n} 前面的数是几？", f"比 {n} 小 1 的数是多少？"]
    return _pick(rng, lang, en, zh), str(n - 1), "math"


FAMILIES: dict[str, Generator] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "two_step": _two_step,
    "compare": _compare,
    "count_letters": _count_letters,
    "double": _double,
    "reverse": _reverse,
    "sort": _sort,
    "units": _units,
    "zh_numeral": _zh_numeral,
    "next_number": _next_number,
}


def _echo(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(0, 20)
    en = [f"Say {n}.", f"Repeat the number {n}.", f"Echo {n}.", f"Please say the number {n}."]
    zh = [f"说 {n}。", f"重复这个数：{n}", f"请说出数字 {n}。", f"跟我说：{n}"]
    return _pick(rng, lang, en, zh), str(n), "math"


def _repeat(rng: random.Random, lang: str) -> tuple[str, str, str]:
    pool = "0123456789" if rng.random() < 0.5 else "abcdefghijklmnopqrstuvwxyz"
    items = rng.sample(list(pool), rng.randint(2, 4))
    listed = ", ".join(items)
    en = [f"Repeat after me: {listed}", f"Say this list again: {listed}", f"Copy: {listed}"]
    zh = [f"跟我重复：{listed}", f"把这个列表再说一遍：{listed}", f"照抄：{listed}"]
    return _pick(rng, lang, en, zh), listed, "exact"


# Copy drills: the answer is in the question. Never evaluated (a model that copies scores on them without any
# other skill); mixed into pretraining, they train the attention that finds a token in the prompt and copies
# it, which every family above needs first (an answer prior is all a model without it can learn).
DRILLS: dict[str, Generator] = {"echo": _echo, "repeat": _repeat}


# Ways of asking, put before half the questions: families with one or two single-digit operands have only a few
# dozen questions per template, too few to hold 20 out per language and still train on hundreds.
FRAMINGS = {"en": ["Quick question: ", "Please answer: ", "Tell me: ", "Can you help? ", "Here is one: "],
            "zh": ["快问一下：", "请回答：", "告诉我：", "帮个忙：", "考考你："]}


def make_task(rng: random.Random, family: str, lang: str, index: int) -> Item:
    """One task record in the tasks_*.jsonl schema; `index` only names it."""
    generators = FAMILIES | DRILLS
    if family not in generators:
        raise ValueError(f"unknown task family {family!r}; choose one of {sorted(generators)}")
    if lang not in LANGS:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    question, answer, verifier = generators[family](rng, lang)
    if rng.random() < 0.5:
        question = rng.choice(FRAMINGS[lang]) + question
    return {
        "id": f"{family}-{lang}-{index}",
        "family": family,
        "lang": lang,
        "prompt": [{"role": "user", "content": question}],
        "answer": answer,
        "verifier": verifier,
    }


def generate_tasks(n: int, seed: int) -> list[Item]:
    """n items cycling through every (family, language) pair, so any prefix is balanced; seeded."""
    rng = random.Random(seed)
    pairs = [(f, lang) for lang in LANGS for f in sorted(FAMILIES)]
    return [make_task(rng, *pairs[i % len(pairs)], i) for i in range(n)]


def generate_unique_tasks(n_per_pair: int, seed: int, exclude: set[str] | None = None,
                          max_tries_per_item: int = 200, families: dict[str, Generator] = FAMILIES) -> list[Item]:
    """`n_per_pair` items per (family, language) with prompts unique and not in `exclude` (prompt_key),
    interleaved so any prefix is balanced. Families with a small question space may yield fewer items
    than asked; the shortfall is never filled with duplicates."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    per_pair: list[list[Item]] = []
    for lang in LANGS:
        for family in sorted(families):
            items: list[Item] = []
            tries = 0
            while len(items) < n_per_pair and tries < n_per_pair * max_tries_per_item:
                tries += 1
                task = make_task(rng, family, lang, len(items))
                key = prompt_key(task["prompt"])
                if key not in seen:
                    seen.add(key)
                    items.append(task)
            per_pair.append(items)
    out = []
    for i in range(max(map(len, per_pair))):
        out += [items[i] for items in per_pair if i < len(items)]
    return out
