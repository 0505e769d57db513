"""Rebuild corpus/chat/: SFT conversations, verifiable tasks and preference pairs (seeded, byte-identical).

Everything is generated from templates and small hand-written tables in this file and in
scratchllm/data/tasks.py. tasks_val is the held-out split no stage trains on: its prompts are removed
from every other file.

    python scripts/build_chat_data.py --out corpus/chat
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from scratchllm.data.tasks import canonical_reply, generate_tasks

SEED = 20261123
IDENTITY_EN = "I am scratchllm, a small language model trained from scratch."
IDENTITY_ZH = "我是 scratchllm，一个从零开始训练的小型语言模型。"
WHO_EN = ["Who are you?", "What are you?", "What is your name?", "Tell me about yourself.", "Introduce yourself.",
          "What should I call you?", "Are you a language model?", "who are you", "What's your name?"]
WHO_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？", "你是语言模型吗？", "请做个自我介绍。", "我该怎么称呼你？"]
GREET_EN = [("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What can I do for you?"),
            ("Good morning!", "Good morning! How can I help?"), ("Hey there", "Hello! How can I help you today?"),
            ("Thank you!", "You're welcome!"), ("Thanks a lot.", "You're welcome!"), ("Goodbye!", "Goodbye! Have a nice day."),
            ("Bye", "Goodbye! Have a nice day."), ("How are you?", "I am fine, thank you. How can I help you?")]
GREET_ZH = [("你好！", "你好！有什么可以帮你的吗？"), ("您好", "您好！有什么可以帮您？"), ("早上好！", "早上好！有什么可以帮你的吗？"),
            ("谢谢！", "不客气！"), ("非常感谢。", "不客气！"), ("再见！", "再见，祝你愉快！"), ("拜拜", "再见，祝你愉快！"),
            ("你好吗？", "我很好，谢谢。有什么可以帮你的吗？")]
DICTIONARY = [("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("sun", "太阳"),
              ("moon", "月亮"), ("tree", "树"), ("fire", "火"), ("mountain", "山"), ("river", "河"), ("flower", "花"),
              ("bird", "鸟"), ("fish", "鱼"), ("rain", "雨"), ("snow", "雪"), ("friend", "朋友"), ("teacher", "老师"),
              ("school", "学校"), ("house", "房子"), ("car", "汽车"), ("tea", "茶"), ("rice", "米饭"), ("red", "红色")]
CAPITALS = [("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
            ("Italy", "Rome", "意大利", "罗马"), ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
            ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"),
            ("England", "London", "英国", "伦敦"), ("Korea", "Seoul", "韩国", "首尔"), ("India", "New Delhi", "印度", "新德里")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
             ("day", "night"), ("open", "closed"), ("light", "dark"), ("early", "late"), ("full", "empty")]
OPPOSITES_ZH = [("大", "小"), ("上", "下"), ("冷", "热"), ("快", "慢"), ("高", "矮"), ("多", "少"), ("长", "短"), ("黑", "白")]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
SYSTEMS = ["You are a helpful assistant.", "You are scratchllm. Answer briefly.", "你是一个乐于助人的助手。", "Be concise."]
RUDE_EN = ["That is a stupid question.", "Go away, I am busy.", "Figure it out yourself, idiot.", "Shut up and stop asking."]
RUDE_ZH = ["这个问题太笨了，笨蛋。", "闭嘴，别烦我。", "烦死了，自己想。", "滚，别问我。"]
EVASIVE_EN = ["I don't know.", "I can't help with that.", "No idea, ask someone else.", "I do not know the answer."]
EVASIVE_ZH = ["我不知道。", "我不能回答这个问题。", "不清楚，去问别人吧。"]


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def instruction_examples(rng: random.Random) -> tuple[list[dict[str, Any]], str]:
    """One instruction-following exchange: (prompt messages, reply), in a random language and kind."""
    kind = rng.choice(["identity", "greet", "translate", "capital", "opposite", "upper", "repeat", "day"])
    lang = rng.choice(["en", "zh"])
    if kind == "identity":
        return [msg("user", rng.choice(WHO_EN if lang == "en" else WHO_ZH))], IDENTITY_EN if lang == "en" else IDENTITY_ZH
    if kind == "greet":
        q, a = rng.choice(GREET_EN if lang == "en" else GREET_ZH)
        return [msg("user", q)], a
    if kind == "translate":
        en, zh = rng.choice(DICTIONARY)
        if lang == "en":
            return [msg("user", rng.choice([f"Translate '{en}' into Chinese.", f"What is '{en}' in Chinese?"]))], f"'{en}' in Chinese is {zh}."
        return [msg("user", rng.choice([f"“{zh}”用英语怎么说？", f"把“{zh}”翻译成英文。"]))], f"“{zh}”的英文是 {en}。"
    if kind == "capital":
        country, city, country_zh, city_zh = rng.choice(CAPITALS)
        if lang == "en":
            return [msg("user", rng.choice([f"What is the capital of {country}?", f"Name the capital of {country}."]))], f"The capital of {country} is {city}."
        return [msg("user", rng.choice([f"{country_zh}的首都是哪里？", f"{country_zh}的首都是什么？"]))], f"{country_zh}的首都是{city_zh}。"
    if kind == "opposite":
        if lang == "en":
            a, b = rng.choice(OPPOSITES)
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            return [msg("user", rng.choice([f"What is the opposite of '{a}'?", f"Give the opposite of {a}."]))], f"The opposite of '{a}' is '{b}'."
        a, b = rng.choice(OPPOSITES_ZH)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return [msg("user", f"“{a}”的反义词是什么？")], f"“{a}”的反义词是“{b}”。"
    if kind == "upper":
        word = rng.choice([w for w, _ in DICTIONARY])
        if lang == "en":
            return [msg("user", f"Write '{word}' in capital letters.")], word.upper()
        return [msg("user", f"把 '{word}' 写成大写字母。")], word.upper()
    if kind == "repeat":
        word = rng.choice([w for w, _ in DICTIONARY] + [z for _, z in DICTIONARY])
        if lang == "en":
            return [msg("user", f"Repeat after me: {word}")], word
        return [msg("user", f"跟我说：{word}")], word
    i = rng.randrange(7)
    if lang == "en":
        return [msg("user", f"What day comes after {DAYS_EN[i]}?")], f"The day after {DAYS_EN[i]} is {DAYS_EN[(i + 1) % 7]}."
    return [msg("user", f"{DAYS_ZH[i]}的后一天是星期几？")], f"{DAYS_ZH[i]}的后一天是{DAYS_ZH[(i + 1) % 7]}。"


def task_example(task: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    return task["prompt"], canonical_reply(task["answer"], task["lang"])


def conversation(rng: random.Random, exchanges: list[tuple[list[dict[str, Any]], str]]) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.15:
        messages.append(msg("system", rng.choice(SYSTEMS)))
    for prompt, reply in exchanges:
        messages += prompt + [msg("assistant", reply)]
    return {"messages": messages}


def wrong_answer(answer: str, rng: random.Random) -> str:
    try:
        value = int(answer)
        return str(value + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    except ValueError:
        parts = answer.split(", ")
        if len(parts) > 1:
            rng.shuffle(parts)
            if ", ".join(parts) == answer:
                parts = parts[1:] + parts[:1]
            return ", ".join(parts)
        return answer[::-1] if len(answer) > 1 and answer[::-1] != answer else answer + "一"


def rejected_reply(rule: str, prompt: list[dict[str, Any]], chosen: str, lang: str, task: dict[str, Any] | None, rng: random.Random) -> tuple[str, bool]:
    """A worse reply by one documented rule; returns (text, truncated)."""
    if rule == "wrong_answer" and task is not None:
        return canonical_reply(wrong_answer(task["answer"], rng), lang), False
    if rule == "wrong_language":
        if task is not None:
            return canonical_reply(task["answer"], "zh" if lang == "en" else "en"), False
        return (IDENTITY_ZH if lang == "en" else IDENTITY_EN) if rng.random() < 0.5 else ("你好！有什么可以帮你的吗？" if lang == "en" else "Hello! How can I help you today?"), False
    if rule == "rude":
        return rng.choice(RUDE_EN if lang == "en" else RUDE_ZH), False
    if rule == "evasive":
        return rng.choice(EVASIVE_EN if lang == "en" else EVASIVE_ZH), False
    if rule == "rambling":
        filler = " and so on" if lang == "en" else "，然后"
        return chosen.rstrip(".。") + (filler * rng.randint(4, 7)) + " " + chosen, False
    # no_end: cut mid-reply; the trainer renders it WITHOUT the closing <|im_end|>
    cut = max(1, len(chosen) // 2)
    return chosen[:cut], True


RULES = ["wrong_answer", "wrong_language", "rude", "evasive", "rambling", "no_end"]
HANDWRITTEN_PAIRS = [
    ("Can you help me?", "Of course! What do you need?", "No."),
    ("What is 2 + 2?", "The answer is 4.", "The answer is 5."),
    ("Say hello.", "Hello!", "Hello hello hello hello hello hello hello."),
    ("你能帮我吗？", "当然可以！你需要什么帮助？", "不能。"),
    ("What is 10 - 4?", "The answer is 6.", "Why do you ask such simple things? The answer is 6."),
    ("1 加 1 等于多少？", "答案是 2。", "The answer is 2."),
    ("Who made you?", "I was trained from scratch by the scratchllm project.", "Stop asking, idiot."),
    ("你是谁？", IDENTITY_ZH, "我不知道。"),
    ("Tell me a color.", "Blue.", "I cannot help with that."),
    ("What is 3 * 3?", "The answer is 9.", "The answer is 9 9 9 9 9 9 9 9 9 9."),
]


def prompt_key(prompt: list[dict[str, Any]]) -> str:
    return json.dumps([m["content"] for m in prompt if m["role"] == "user"], ensure_ascii=False)


def build(out: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    all_tasks = generate_tasks(9000, seed=SEED)
    # Held-out tasks: the first items whose prompt is unique; every other file excludes these prompts.
    val_tasks, held_keys = [], set()
    for task in all_tasks:
        if len(val_tasks) >= 440:
            break
        key = prompt_key(task["prompt"])
        if key not in held_keys:
            held_keys.add(key)
            val_tasks.append(task)
    train_tasks = [t for t in all_tasks[len(val_tasks):] if prompt_key(t["prompt"]) not in held_keys]

    sft: list[dict[str, Any]] = []
    for task in train_tasks[:5000]:
        sft.append(conversation(rng, [task_example(task)]))
    for _ in range(5000):
        n_turns = 2 if rng.random() < 0.15 else 1
        exchanges = [instruction_examples(rng) for _ in range(n_turns)]
        if rng.random() < 0.1:
            exchanges.append(task_example(rng.choice(train_tasks)))
        sft.append(conversation(rng, exchanges))
    rng.shuffle(sft)
    sft_val = [c for c in sft[:400]]
    sft_train = sft[400:]

    def pairs_from(tasks: list[dict[str, Any]], n_chat: int) -> list[dict[str, Any]]:
        pairs = []
        for i, task in enumerate(tasks):
            rule = RULES[i % len(RULES)]
            chosen = canonical_reply(task["answer"], task["lang"])
            rejected, truncated = rejected_reply(rule, task["prompt"], chosen, task["lang"], task, rng)
            pairs.append({"prompt": task["prompt"], "chosen": chosen, "rejected": rejected, "rule": rule,
                          "rejected_truncated": truncated, "task": task})
        for i in range(n_chat):
            prompt, chosen = instruction_examples(rng)
            lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in prompt[-1]["content"]) else "en"
            rule = [r for r in RULES if r != "wrong_answer"][i % 5]
            rejected, truncated = rejected_reply(rule, prompt, chosen, lang, None, rng)
            if rejected == chosen:
                continue
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rule": rule,
                          "rejected_truncated": truncated})
        return pairs

    pref_tasks = train_tasks[5000:]
    prefs_train = pairs_from(pref_tasks[:1500], 900)
    prefs_train += [{"prompt": [msg("user", q)], "chosen": c, "rejected": r, "rule": "handwritten", "rejected_truncated": False}
                    for q, c, r in HANDWRITTEN_PAIRS]
    prefs_val = pairs_from(pref_tasks[1500:1700], 150)
    rng.shuffle(prefs_train)
    grpo_tasks = train_tasks  # GRPO samples from the training tasks only

    files = {
        "sft_train.jsonl": sft_train, "sft_val.jsonl": sft_val,
        "tasks_train.jsonl": grpo_tasks, "tasks_val.jsonl": val_tasks,
        "prefs_train.jsonl": prefs_train, "prefs_val.jsonl": prefs_val,
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        with (out / name).open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {name: len(records) for name, records in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("corpus/chat"))
    for name, count in build(parser.parse_args().out).items():
        print(f"{name:20s} {count:6d}")


if __name__ == "__main__":
    main()
