"""Seeded generators of verifiable tasks (English and Chinese) that a ~5M-parameter model can partly learn.

Every item has one canonical reply — "The answer is X." / "答案是 X。" — so a verifier can extract the answer
from a fixed place instead of guessing (PITFALLS.md: a keyword verifier made every answer a false positive).
Same seed, same items: the bundled files in corpus/chat/ are rebuilt byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

ZH_DIGITS = "零一二三四五六七八九"


def canonical_reply(answer: str, lang: str) -> str:
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
    total, current = 0, 0
    for c in text:
        if c in digits:
            current = digits[c]
        else:
            total += (current or (1 if c == "十" else 0)) * units[c]
            if current == 0 and c != "十":
                return None
            current = 0
    return total + current


Item = dict[str, Any]
Generator = Callable[[random.Random, str], tuple[str, str, str]]  # (question, answer, verifier)


def _add(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    en = [f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}.", f"What do you get if you add {a} to {b}?"]
    zh = [f"{a} 加 {b} 等于多少？", f"计算 {a} + {b}。", f"{a} 和 {b} 的和是多少？", f"请算一下 {a} 加上 {b}。"]
    return rng.choice(en if lang == "en" else zh), str(a + b), "math"


def _subtract(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a = rng.randint(5, 60)
    b = rng.randint(0, a)
    en = [f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Compute {a} minus {b}."]
    zh = [f"{a} 减 {b} 等于多少？", f"计算 {a} - {b}。", f"{a} 减去 {b} 是多少？"]
    return rng.choice(en if lang == "en" else zh), str(a - b), "math"


def _multiply(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    en = [f"What is {a} * {b}?", f"Multiply {a} by {b}.", f"What is {a} times {b}?"]
    zh = [f"{a} 乘 {b} 等于多少？", f"计算 {a} × {b}。", f"{a} 乘以 {b} 是多少？"]
    return rng.choice(en if lang == "en" else zh), str(a * b), "math"


def _two_step(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    c = rng.randint(0, a + b)
    en = [f"What is {a} + {b} - {c}?", f"Compute {a} plus {b} minus {c}."]
    zh = [f"{a} + {b} - {c} 等于多少？", f"计算 {a} 加 {b} 再减 {c}。"]
    return rng.choice(en if lang == "en" else zh), str(a + b - c), "math"


def _compare(rng: random.Random, lang: str) -> tuple[str, str, str]:
    a, b = rng.sample(range(0, 100), 2)
    if rng.random() < 0.5:
        en = [f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?"]
        zh = [f"{a} 和 {b} 哪个更大？", f"{a} 与 {b} 中较大的数是哪个？"]
        answer = max(a, b)
    else:
        en = [f"Which is smaller, {a} or {b}?", f"Which number is less: {a} or {b}?"]
        zh = [f"{a} 和 {b} 哪个更小？", f"{a} 与 {b} 中较小的数是哪个？"]
        answer = min(a, b)
    return rng.choice(en if lang == "en" else zh), str(answer), "math"


WORDS = ["banana", "apple", "letter", "coffee", "pepper", "hello", "mississippi", "balloon", "cherry", "little",
         "summer", "bottle", "rabbit", "paper", "kitten", "yellow", "tomato", "puppy", "dinner", "butter"]


def _count_letters(rng: random.Random, lang: str) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    en = [f"How many times does the letter '{letter}' appear in '{word}'?", f"Count the letter '{letter}' in '{word}'."]
    zh = [f"单词 '{word}' 里有几个字母 '{letter}'？", f"数一数 '{word}' 中字母 '{letter}' 出现了几次。"]
    return rng.choice(en if lang == "en" else zh), str(word.count(letter)), "math"


def _reverse(rng: random.Random, lang: str) -> tuple[str, str, str]:
    items = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 4))
    listed = ", ".join(items)
    en = [f"Reverse the list: {listed}", f"Write this list backwards: {listed}"]
    zh = [f"把这个列表倒过来：{listed}", f"请反转列表：{listed}"]
    return rng.choice(en if lang == "en" else zh), ", ".join(reversed(items)), "exact"


def _sort(rng: random.Random, lang: str) -> tuple[str, str, str]:
    nums = rng.sample(range(0, 30), rng.randint(3, 4))
    listed = ", ".join(map(str, nums))
    en = [f"Sort these numbers from smallest to largest: {listed}", f"Put in increasing order: {listed}"]
    zh = [f"把这些数从小到大排序：{listed}", f"按从小到大的顺序排列：{listed}"]
    return rng.choice(en if lang == "en" else zh), ", ".join(map(str, sorted(nums))), "exact"


def _units(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(1, 9)
    table = [
        (f"How many centimeters are in {n} meters?", f"{n} 米等于多少厘米？", n * 100),
        (f"How many grams are in {n} kilograms?", f"{n} 千克等于多少克？", n * 1000),
        (f"How many minutes are in {n} hours?", f"{n} 小时等于多少分钟？", n * 60),
        (f"How many seconds are in {n} minutes?", f"{n} 分钟等于多少秒？", n * 60),
        (f"How many days are in {n} weeks?", f"{n} 周有多少天？", n * 7),
    ]
    en, zh, answer = rng.choice(table)
    return (en if lang == "en" else zh), str(answer), "math"


def _zh_numeral(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    if rng.random() < 0.5:
        en = [f"Write the Chinese numeral {to_chinese_numeral(n)} in digits.", f"What number is {to_chinese_numeral(n)}?"]
        zh = [f"把 {to_chinese_numeral(n)} 写成阿拉伯数字。", f"{to_chinese_numeral(n)} 是多少？"]
        return rng.choice(en if lang == "en" else zh), str(n), "math"
    en = [f"Write {n} in Chinese numerals.", f"How do you write {n} in Chinese characters?"]
    zh = [f"把 {n} 写成中文数字。", f"用汉字写出 {n}。"]
    return rng.choice(en if lang == "en" else zh), to_chinese_numeral(n), "exact"


def _next_number(rng: random.Random, lang: str) -> tuple[str, str, str]:
    n = rng.randint(0, 98)
    en = [f"What number comes after {n}?", f"What is the next number after {n}?"]
    zh = [f"{n} 的下一个数是多少？", f"{n} 后面的数是几？"]
    return rng.choice(en if lang == "en" else zh), str(n + 1), "math"


FAMILIES: dict[str, Generator] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "two_step": _two_step,
    "compare": _compare,
    "count_letters": _count_letters,
    "reverse": _reverse,
    "sort": _sort,
    "units": _units,
    "zh_numeral": _zh_numeral,
    "next_number": _next_number,
}


def make_task(rng: random.Random, family: str, lang: str, index: int) -> Item:
    question, answer, verifier = FAMILIES[family](rng, lang)
    return {
        "id": f"{family}-{lang}-{index}",
        "family": family,
        "lang": lang,
        "prompt": [{"role": "user", "content": question}],
        "answer": answer,
        "verifier": verifier,
    }


def generate_tasks(n: int, seed: int) -> list[Item]:
    """n items cycling through every family and both languages, in a seeded order."""
    rng = random.Random(seed)
    families = sorted(FAMILIES)
    return [make_task(rng, families[i % len(families)], ("en", "zh")[(i // len(families)) % 2], i) for i in range(n)]
