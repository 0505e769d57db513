"""Verifiers are the ground truth of RL: adversarial strings must not pass (PITFALLS.md)."""

from __future__ import annotations

import pytest

from scratchllm.data.rewards import (
    char_ngram_dice,
    composite_reward,
    detect_language,
    extract_final_number,
    gold_score,
    is_on_topic,
    score_task,
    verify_exact,
    verify_format,
    verify_math,
)

MATH = {"id": "t", "family": "add", "lang": "en", "prompt": [{"role": "user", "content": "What is 40 + 2?"}],
        "answer": "42", "verifier": "math"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The answer is 42.", 1.0),
        ("The answer is 42.0.", 1.0),
        ("答案是 42。", 1.0),
        ("the answer is 42", 1.0),
        ("The answer is 43.", 0.0),
        ("The answer is 42, not 43.", 0.0),  # the answer span must be exactly a number
        ("The answer is 43. Actually the answer is 42.", 1.0),  # the LAST answer counts
        ("The answer is 42. No wait, the answer is 41.", 0.0),
        ("42", 0.0),  # no canonical answer sentence
        ("I think 42 is right", 0.0),
        ("The answer is 四十二.", 0.0),  # Chinese numerals are not digits (documented)
        ("The answer is 420.", 0.0),
        ("", 0.0),
    ],
)
def test_verify_math_adversarial(reply: str, expected: float) -> None:
    assert verify_math(reply, "42") == expected


def test_keyword_inside_another_word_is_not_an_answer() -> None:
    assert verify_exact("我是", "是") == 0.0
    assert verify_exact("答案是 是。", "是") == 1.0
    assert verify_exact("The answer is c, b, a.", "c, b, a") == 1.0
    assert verify_exact("The answer is c,b,a", "c, b, a") == 1.0
    assert verify_exact("The answer is c, b, a, d.", "c, b, a") == 0.0
    assert verify_exact("答案是 一百二十三。", "一百二十三") == 1.0


def test_numbers_with_separators_and_signs() -> None:
    assert extract_final_number("The answer is 1,000.") == 1000.0
    assert extract_final_number("The answer is -3.") == -3.0
    assert extract_final_number("The answer is 1,00.") is None


def test_score_task_and_unknown_verifier() -> None:
    assert score_task("The answer is 42.", MATH) == 1.0
    with pytest.raises(ValueError, match="unknown verifier"):
        score_task("x", {**MATH, "verifier": "magic"})


def test_format_and_composite() -> None:
    assert verify_format("The answer is 42.", "en") == 1.0
    assert verify_format("答案是 42。", "en") == 0.0
    assert verify_format("The answer is 42 42 42 42 42 42 42.", "en") == 0.0
    assert composite_reward("The answer is 42.", MATH) == pytest.approx(1.1)
    assert composite_reward("The answer is 41.", MATH) == pytest.approx(0.1)


def test_language_detection() -> None:
    assert detect_language("The answer is 42.") == "en"
    assert detect_language("答案是 42。") == "zh"
    assert detect_language("42") == "mixed"


def test_gold_judge_prefers_the_good_reply_over_every_rejection_rule() -> None:
    prompt = MATH["prompt"]
    good = gold_score(prompt, "The answer is 42.", MATH)
    assert good == 1.0
    for bad, ended in [
        ("The answer is 41.", True),  # wrong answer
        ("答案是 42。", True),  # wrong language
        ("That is a stupid question. The answer is 42.", True),  # rude
        ("I don't know.", True),  # evasive
        ("The answer is 42 and so on and so on and so on and so on.", True),  # rambling
        ("The answer", False),  # no end
    ]:
        assert gold_score(prompt, bad, MATH, ended=ended) < good, bad


def test_char_ngram_dice_hand_computed() -> None:
    assert char_ngram_dice("abcd", "abcd") == 1.0
    # " abcd ": { ab, abc, bcd, cd } vs " bcde ": { bc, bcd, cde, de }: one shared of 4 + 4
    assert char_ngram_dice("abcd", "bcde") == pytest.approx(2 * 1 / (4 + 4))
    assert char_ngram_dice("ab", "abcd") == pytest.approx(2 * 1 / (2 + 4))  # " ab" is shared
    assert char_ngram_dice("猫。", "猫。") == 1.0 and char_ngram_dice("Dog.", "Red.") == 0.0
    assert char_ngram_dice("ABC  d", "abc d") == 1.0  # case and whitespace are folded
    assert char_ngram_dice("", "abc") == 0.0


def test_off_topic_replies_lose_gold_score_on_chat_prompts() -> None:
    prompt = [{"role": "user", "content": "What is 'horse' in Chinese?"}]
    reference = "'horse' in Chinese is 马."
    assert is_on_topic("'cow' in Chinese is 牛.", reference)  # right template, wrong word: on topic
    for reply in ("The answer is 1.", "I am scratchllm, a small language model trained from scratch."):
        assert not is_on_topic(reply, reference)
        assert gold_score(prompt, reply, reference=reference) < gold_score(prompt, reference, reference=reference) == 1.0
    assert gold_score(prompt, "The answer is 1.") == 1.0  # without a reference the rule is not applied
