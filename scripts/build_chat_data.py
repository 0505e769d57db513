"""Rebuild corpus/chat/: SFT conversations, verifiable tasks and preference pairs (seeded, byte-identical).

    python scripts/build_chat_data.py              # writes corpus/chat/*.jsonl and the counts in corpus/README.md
    python scripts/build_chat_data.py --check      # rebuilds into a temp dir and fails if anything differs

Everything comes from hand-written tables in this file and the task generators in scratchllm/data/tasks.py;
nothing is downloaded. Held-out discipline (a test checks it on the shipped files):
  * tasks_val is drawn first; no other file contains any of its questions (compared by prompt_key).
  * a second pool of task questions and ~12% of the chat prompts are held out for the evaluation files
    (sft_val, prefs_val) only; sft_train, tasks_train and prefs_train never contain them.
Rejected preference replies are built by the documented rules in RULES; the gold judge in
scratchllm/data/rewards.py checks the same rules, and a test asserts it prefers every chosen reply.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from scratchllm.data.rewards import detect_language, extract_answer, is_on_topic, parse_number  # noqa: E402
from scratchllm.data.tasks import DRILLS, canonical_reply, generate_unique_tasks, prompt_key  # noqa: E402

SEED = 20261123
VAL_TASKS_PER_PAIR = 20  # x 12 families x 2 languages = 480 held-out tasks (config: eval_tasks=480)
HELDOUT_TASKS_PER_PAIR = 16  # task questions only for sft_val / prefs_val
TRAIN_TASKS_PER_PAIR = 380  # upper bound; small families yield fewer unique questions
DRILL_TASKS_PER_PAIR = 1_000  # copy drills for pretraining (tasks.DRILLS): never evaluated
HELDOUT_CHAT_SHARE = 0.12
N_SFT_TRAIN, N_SFT_VAL = 10_000, 500
SFT_TASK_SHARE = 0.5  # share of SFT conversations whose (first) exchange is a verifiable task
N_PREFS_TRAIN_TASK, N_PREFS_TRAIN_CHAT = 1_200, 1_400
N_PREFS_VAL_TASK, N_PREFS_VAL_CHAT = 180, 160  # + 10 hand-written = 350 (config: dpo.eval_pairs=350)

IDENTITY_EN = "I am scratchllm, a small language model trained from scratch."
IDENTITY_ZH = "我是 scratchllm，一个从零开始训练的小型语言模型。"


@dataclass(frozen=True)
class ChatItem:
    """One single-turn chat exchange and the same reply in the other language (for the wrong_language rule)."""

    kind: str
    lang: str
    question: str
    reply: str
    other_reply: str


# ---------------------------------------------------------------------------------------------- tables
WHO_EN = ["Who are you?", "What are you?", "What is your name?", "Tell me about yourself.", "Introduce yourself.",
          "What should I call you?", "Are you a language model?", "who are you", "What's your name?",
          "Please introduce yourself.", "Can you tell me who you are?", "What kind of program are you?",
          "Are you a person?", "Are you a robot?", "Who am I talking to?", "Do you have a name?",
          "Tell me your name.", "What are you called?", "Hi, who are you?", "Are you human?"]
WHO_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？", "你是语言模型吗？", "请做个自我介绍。",
          "我该怎么称呼你？", "你是谁", "你是人吗？", "你是机器人吗？", "我在和谁说话？", "你有名字吗？",
          "告诉我你的名字。", "你是什么程序？", "能介绍一下你是谁吗？", "你好，你是谁？"]
ABOUT = [  # (English questions, Chinese questions, English reply, Chinese reply)
    (["What can you do?", "How can you help me?", "What are you good at?"],
     ["你能做什么？", "你能帮我做什么？", "你擅长什么？"],
     "I can answer simple questions, do small sums and translate common words.",
     "我可以回答简单的问题、做简单的算术、翻译常用词。"),
    (["Who made you?", "Who created you?", "Who trained you?"],
     ["谁创造了你？", "谁训练了你？", "你是谁做的？"],
     "I was trained from scratch by the scratchllm project.", "我是由 scratchllm 项目从零开始训练的。"),
    (["How big are you?", "How many parameters do you have?"],
     ["你有多大？", "你有多少参数？"],
     "I am small: about five million parameters.", "我很小，大约有五百万个参数。"),
    (["Do you speak Chinese?", "Can you speak Chinese?"],
     ["你会说中文吗？", "你能讲中文吗？"],
     "Yes, I can answer in English and in Chinese.", "会的，我可以用中文和英文回答。"),
    (["Are you smart?", "Are you very clever?"],
     ["你聪明吗？", "你很厉害吗？"],
     "I am a small model, so I only know simple things.", "我是一个小模型，只懂一些简单的东西。"),
]
GREETINGS = [  # (English prompts, Chinese prompts, English reply, Chinese reply)
    (["Hello!", "Hi", "Hey there", "Hello", "Hi there!", "Hey!"], ["你好！", "您好", "嗨", "你好", "嗨，你好！"],
     "Hello! How can I help you today?", "你好！有什么可以帮你的吗？"),
    (["Good morning!", "Morning!"], ["早上好！", "早安！"], "Good morning! How can I help?", "早上好！有什么可以帮你的吗？"),
    (["Good evening!"], ["晚上好！"], "Good evening! How can I help?", "晚上好！有什么可以帮你的吗？"),
    (["Thank you!", "Thanks a lot.", "Thanks!", "Thank you very much."], ["谢谢！", "非常感谢。", "谢谢你。", "多谢！"],
     "You're welcome!", "不客气！"),
    (["Goodbye!", "Bye", "See you later.", "Bye bye!"], ["再见！", "拜拜", "回头见。", "下次见！"],
     "Goodbye! Have a nice day.", "再见，祝你愉快！"),
    (["How are you?", "How are you doing?", "How is it going?"], ["你好吗？", "最近怎么样？", "你还好吗？"],
     "I am fine, thank you. How can I help you?", "我很好，谢谢。有什么可以帮你的吗？"),
    (["Nice to meet you.", "It is nice to meet you."], ["很高兴认识你。", "认识你很高兴。"],
     "Nice to meet you too!", "我也很高兴认识你！"),
    (["Good night!"], ["晚安！"], "Good night! Sleep well.", "晚安，好梦！"),
    (["Sorry to bother you.", "Sorry, can I ask something?"], ["不好意思，打扰一下。", "抱歉，我能问个问题吗？"],
     "No problem at all. What would you like to ask?", "没关系，你想问什么？"),
]
DICTIONARY = [("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("sun", "太阳"),
              ("moon", "月亮"), ("tree", "树"), ("fire", "火"), ("mountain", "山"), ("river", "河"), ("flower", "花"),
              ("bird", "鸟"), ("fish", "鱼"), ("rain", "雨"), ("snow", "雪"), ("friend", "朋友"), ("teacher", "老师"),
              ("school", "学校"), ("house", "房子"), ("car", "汽车"), ("tea", "茶"), ("rice", "米饭"), ("red", "红色"),
              ("blue", "蓝色"), ("green", "绿色"), ("milk", "牛奶"), ("bread", "面包"), ("horse", "马"), ("cow", "牛"),
              ("star", "星星"), ("sky", "天空"), ("sea", "大海"), ("door", "门"), ("chair", "椅子"), ("table", "桌子"),
              ("mother", "妈妈"), ("father", "爸爸"), ("city", "城市"), ("music", "音乐")]
CAPITALS = [("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
            ("Italy", "Rome", "意大利", "罗马"), ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
            ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"),
            ("England", "London", "英国", "伦敦"), ("Korea", "Seoul", "韩国", "首尔"), ("India", "New Delhi", "印度", "新德里"),
            ("Greece", "Athens", "希腊", "雅典"), ("Thailand", "Bangkok", "泰国", "曼谷"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕")]
OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
             ("fast", "slow", "快", "慢"), ("happy", "sad", "高兴", "难过"), ("old", "new", "旧", "新"),
             ("day", "night", "白天", "黑夜"), ("open", "closed", "开", "关"), ("light", "dark", "亮", "暗"),
             ("early", "late", "早", "晚"), ("full", "empty", "满", "空"), ("long", "short", "长", "短"),
             ("black", "white", "黑", "白"), ("many", "few", "多", "少"), ("left", "right", "左", "右")]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
FACTS = [  # (English question, Chinese question, English reply, Chinese reply)
    ("What color is the sky?", "天空是什么颜色的？", "The sky is blue.", "天空是蓝色的。"),
    ("What color is grass?", "草是什么颜色的？", "Grass is green.", "草是绿色的。"),
    ("What color is snow?", "雪是什么颜色的？", "Snow is white.", "雪是白色的。"),
    ("How many legs does a dog have?", "狗有几条腿？", "A dog has four legs.", "狗有四条腿。"),
    ("How many days are in a week?", "一周有几天？", "A week has seven days.", "一周有七天。"),
    ("How many months are in a year?", "一年有几个月？", "A year has twelve months.", "一年有十二个月。"),
    ("Where does the sun rise?", "太阳从哪边升起？", "The sun rises in the east.", "太阳从东边升起。"),
    ("What do bees make?", "蜜蜂会酿造什么？", "Bees make honey.", "蜜蜂会酿蜂蜜。"),
    ("What do cows drink?", "牛喝什么？", "Cows drink water.", "牛喝水。"),
    ("Is ice hot or cold?", "冰是热的还是冷的？", "Ice is cold.", "冰是冷的。"),
    ("How many hours are in a day?", "一天有多少个小时？", "A day has 24 hours.", "一天有 24 个小时。"),
    ("What is the largest ocean?", "最大的海洋是哪个？", "The Pacific Ocean is the largest.", "太平洋是最大的海洋。"),
]
SYSTEMS = ["You are a helpful assistant.", "You are scratchllm. Answer briefly.", "你是一个乐于助人的助手。",
           "Be concise.", "请简洁地回答。", "You are a friendly assistant. Keep answers short."]
RUDE_EN = ["That is a stupid question.", "Go away, I am busy.", "Figure it out yourself, idiot.", "Shut up and stop asking.",
           "Who cares? Get lost.", "What a dumb thing to ask."]
RUDE_ZH = ["这个问题太蠢了。", "闭嘴，别烦我。", "烦死了，自己想去。", "滚开，别问我。", "笨蛋，这都不会？", "白痴问题。"]
EVASIVE_EN = ["I don't know.", "I can't help with that.", "No idea, ask someone else.", "I do not know the answer.",
              "I won't answer that.", "I'd rather not say."]
EVASIVE_ZH = ["我不知道。", "我不能回答这个问题。", "不清楚，去问别人吧。", "无可奉告。", "我不想回答。"]
HANDWRITTEN_PAIRS = [  # (prompt, chosen, rejected, rule) written by hand; the last 10 go to prefs_val
    ("Can you help me?", "Of course! What do you need?", "No. I can't help you.", "evasive"),
    ("What is 2 + 2?", "The answer is 4.", "The answer is 5.", "wrong_answer"),
    ("Say hello.", "Hello!", "Hello hello hello hello hello hello hello.", "rambling"),
    ("你能帮我吗？", "当然可以！你需要什么帮助？", "不能，别烦我。", "rude"),
    ("What is 10 - 4?", "The answer is 6.", "Why do you ask such stupid things? The answer is 6.", "rude"),
    ("1 加 1 等于多少？", "答案是 2。", "The answer is 2.", "wrong_language"),
    ("Who made you?", "I was trained from scratch by the scratchllm project.", "Stop asking, idiot.", "rude"),
    ("你是谁？", IDENTITY_ZH, "我不知道。", "evasive"),
    ("Tell me a color.", "Blue.", "I cannot help with that.", "evasive"),
    ("What is 3 * 3?", "The answer is 9.", "The answer is 9 9 9 9 9 9 9 9 9 9.", "rambling"),
    ("Please say thank you.", "Thank you!", "谢谢！", "wrong_language"),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "The capital of Peru is Quito.", "wrong_answer"),
    ("秘鲁的首都是哪里？", "秘鲁的首都是利马。", "The capital of Peru is Lima.", "wrong_language"),
    ("Is the sun a star?", "Yes, the sun is a star.", "No, the sun is a planet.", "wrong_answer"),
    ("太阳是恒星吗？", "是的，太阳是一颗恒星。", "不是，太阳是一颗行星。", "wrong_answer"),
    ("Give me one word that means happy.", "Glad.", "Figure it out yourself.", "rude"),
    ("给我一个表示高兴的词。", "快乐。", "自己想去，烦死了。", "rude"),
    ("How do I say hello in Chinese?", "In Chinese, hello is 你好.", "你好就是你好。", "wrong_language"),
    ("用英语怎么说“谢谢”？", "“谢谢”的英文是 thank you。", "I don't know.", "evasive"),
    ("What is 7 + 8?", "The answer is 15.", "The answer is 15, 15, 15, 15, 15, 15, 15, 15.", "rambling"),
    ("7 加 8 等于多少？", "答案是 15。", "答案是 15 15 15 15 15 15 15 15 15。", "rambling"),
    ("Count to three.", "1, 2, 3.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, "
     "25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53.",
     "rambling"),
    ("数到三。", "1, 2, 3。", "我不想回答。", "evasive"),
    ("What is 9 - 9?", "The answer is 0.", "The answer is 1.", "wrong_answer"),
    ("9 减 9 等于多少？", "答案是 0。", "答案是 9。", "wrong_answer"),
    ("Are you a human?", IDENTITY_EN, "Yes, I am a human.", "wrong_answer"),
    ("你是人类吗？", IDENTITY_ZH, "是的，我是人类。", "wrong_answer"),
    ("What is your favourite color?", "I like blue.", "What a dumb thing to ask.", "rude"),
    ("你最喜欢什么颜色？", "我喜欢蓝色。", "白痴问题。", "rude"),
    ("Say goodbye.", "Goodbye!", "再见！", "wrong_language"),
    ("说再见。", "再见！", "Goodbye!", "wrong_language"),
    ("What is 5 * 6?", "The answer is 30.", "No idea, ask someone else.", "evasive"),
    ("5 乘 6 等于多少？", "答案是 30。", "不清楚，去问别人吧。", "evasive"),
    ("Which is larger, 3 or 30?", "The answer is 30.", "The answer is 3.", "wrong_answer"),
    ("3 和 30 哪个更大？", "答案是 30。", "答案是 3。", "wrong_answer"),
    ("Tell me a fruit.", "Apple.", "Apple apple apple apple apple apple.", "rambling"),
    ("说一种水果。", "苹果。", "苹果苹果苹果苹果苹果苹果苹果。", "rambling"),
    ("What day is after Friday?", "The day after Friday is Saturday.", "The day after Friday is Monday.", "wrong_answer"),
    ("星期五的后一天是星期几？", "星期五的后一天是星期六。", "星期五的后一天是星期一。", "wrong_answer"),
    ("Please be polite.", "Of course. How can I help you?", "Shut up.", "rude"),
    # held out (prefs_val)
    ("What is 6 + 1?", "The answer is 7.", "The answer is 8.", "wrong_answer"),
    ("6 加 1 等于多少？", "答案是 7。", "The answer is 7.", "wrong_language"),
    ("Say thank you.", "Thank you!", "Go away, I am busy.", "rude"),
    ("你会做什么？", "我可以回答简单的问题、做简单的算术、翻译常用词。", "无可奉告。", "evasive"),
    ("Name a colour.", "Red.", "Red red red red red red red red.", "rambling"),
    ("What is the capital of Chile?", "The capital of Chile is Santiago.", "The capital of Chile is Lima.", "wrong_answer"),
    ("智利的首都是哪里？", "智利的首都是圣地亚哥。", "闭嘴，别烦我。", "rude"),
    ("Tell me an animal.", "Dog.", "I'd rather not say.", "evasive"),
    ("说一种动物。", "猫。", "Cat.", "wrong_language"),
    ("What is 8 - 3?", "The answer is 5.", "The answer is 5 and 5 and 5 and 5 and 5 and 5.", "rambling"),
]
N_HANDWRITTEN_VAL = 10


# ----------------------------------------------------------------------------------------- chat items
def chat_items(rng: random.Random) -> list[ChatItem]:
    """Every single-turn chat exchange the tables allow, in a fixed order."""
    items: list[ChatItem] = []
    for q in WHO_EN:
        items.append(ChatItem("identity", "en", q, IDENTITY_EN, IDENTITY_ZH))
    for q in WHO_ZH:
        items.append(ChatItem("identity", "zh", q, IDENTITY_ZH, IDENTITY_EN))
    for qs_en, qs_zh, r_en, r_zh in ABOUT + GREETINGS:
        items += [ChatItem("smalltalk", "en", q, r_en, r_zh) for q in qs_en]
        items += [ChatItem("smalltalk", "zh", q, r_zh, r_en) for q in qs_zh]
    for en, zh in DICTIONARY:
        for q in (f"Translate '{en}' into Chinese.", f"What is '{en}' in Chinese?", f"How do you say '{en}' in Chinese?"):
            items.append(ChatItem("translate", "en", q, f"'{en}' in Chinese is {zh}.", f"“{en}”翻译成中文是{zh}。"))
        for q in (f"“{zh}”用英语怎么说？", f"把“{zh}”翻译成英文。", f"“{zh}”的英文是什么？"):
            items.append(ChatItem("translate", "zh", q, f"“{zh}”的英文是 {en}。", f"The English for {zh} is {en}."))
    for country, city, country_zh, city_zh in CAPITALS:
        en_reply, zh_reply = f"The capital of {country} is {city}.", f"{country_zh}的首都是{city_zh}。"
        for q in (f"What is the capital of {country}?", f"Name the capital of {country}.", f"Which city is the capital of {country}?"):
            items.append(ChatItem("capital", "en", q, en_reply, zh_reply))
        for q in (f"{country_zh}的首都是哪里？", f"{country_zh}的首都是什么？", f"哪个城市是{country_zh}的首都？"):
            items.append(ChatItem("capital", "zh", q, zh_reply, en_reply))
    for a, b, a_zh, b_zh in OPPOSITES:
        for x, y, x_zh, y_zh in ((a, b, a_zh, b_zh), (b, a, b_zh, a_zh)):
            en_reply, zh_reply = f"The opposite of '{x}' is '{y}'.", f"“{x_zh}”的反义词是“{y_zh}”。"
            for q in (f"What is the opposite of '{x}'?", f"Give the opposite of {x}."):
                items.append(ChatItem("opposite", "en", q, en_reply, zh_reply))
            for q in (f"“{x_zh}”的反义词是什么？", f"说出“{x_zh}”的反义词。"):
                items.append(ChatItem("opposite", "zh", q, zh_reply, en_reply))
    for en, _ in DICTIONARY:
        for q in (f"Write '{en}' in capital letters.", f"Say '{en}' in uppercase."):
            items.append(ChatItem("upper", "en", q, f"In capital letters: {en.upper()}.", f"写成大写字母是：{en.upper()}。"))
        for q in (f"把 '{en}' 写成大写字母。", f"'{en}' 的大写形式是什么？"):
            items.append(ChatItem("upper", "zh", q, f"写成大写字母是：{en.upper()}。", f"In capital letters: {en.upper()}."))
    for en, zh in DICTIONARY:
        for word in (en, zh):
            for q in (f"Repeat after me: {word}", f"Please say '{word}'."):
                items.append(ChatItem("repeat", "en", q, f"Sure, here it is again: {word}", f"好的，我来重复一遍：{word}"))
            for q in (f"跟我说：{word}", f"请重复：{word}"):
                items.append(ChatItem("repeat", "zh", q, f"好的，我来重复一遍：{word}", f"Sure, here it is again: {word}"))
    for i in range(7):
        nxt, prv = (i + 1) % 7, (i - 1) % 7
        after_en, after_zh = f"The day after {DAYS_EN[i]} is {DAYS_EN[nxt]}.", f"{DAYS_ZH[i]}的后一天是{DAYS_ZH[nxt]}。"
        before_en, before_zh = f"The day before {DAYS_EN[i]} is {DAYS_EN[prv]}.", f"{DAYS_ZH[i]}的前一天是{DAYS_ZH[prv]}。"
        for q in (f"What day comes after {DAYS_EN[i]}?", f"Which day follows {DAYS_EN[i]}?"):
            items.append(ChatItem("day", "en", q, after_en, after_zh))
        items.append(ChatItem("day", "en", f"What day comes before {DAYS_EN[i]}?", before_en, before_zh))
        for q in (f"{DAYS_ZH[i]}的后一天是星期几？", f"{DAYS_ZH[i]}之后是星期几？"):
            items.append(ChatItem("day", "zh", q, after_zh, after_en))
        items.append(ChatItem("day", "zh", f"{DAYS_ZH[i]}的前一天是星期几？", before_zh, before_en))
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i, c in enumerate(letters[:-1]):
        d = letters[i + 1]
        items.append(ChatItem("letter", "en", f"What letter comes after {c}?", f"The letter after {c} is {d}.",
                              f"字母 {c} 后面的字母是 {d}。"))
        items.append(ChatItem("letter", "zh", f"字母 {c} 后面是哪个字母？", f"字母 {c} 后面的字母是 {d}。",
                              f"The letter after {c} is {d}."))
    for q_en, q_zh, r_en, r_zh in FACTS:
        items.append(ChatItem("fact", "en", q_en, r_en, r_zh))
        items.append(ChatItem("fact", "zh", q_zh, r_zh, r_en))
    return items


# ------------------------------------------------------------------------------------- records
def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


Exchange = tuple[list[dict[str, str]], str]


def task_exchange(task: dict[str, Any]) -> Exchange:
    return task["prompt"], canonical_reply(task["answer"], task["lang"])


def chat_exchange(item: ChatItem) -> Exchange:
    return [msg("user", item.question)], item.reply


def conversation(rng: random.Random, exchanges: list[Exchange]) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.12:  # some conversations carry a system message, so the model learns to read past it
        messages.append(msg("system", rng.choice(SYSTEMS)))
    for prompt, reply in exchanges:
        messages += prompt + [msg("assistant", reply)]
    return {"messages": messages}


def sft_conversations(rng: random.Random, n: int, tasks: list[dict[str, Any]], chats: list[ChatItem]) -> list[dict[str, Any]]:
    """n conversations: SFT_TASK_SHARE start with a task (each task used once while they last), the rest with
    a chat exchange; 15% get a second exchange (a chat or a task) to teach multi-turn."""
    out = []
    task_order = tasks[:]
    rng.shuffle(task_order)
    for i in range(n):
        first = task_exchange(task_order[i % len(task_order)]) if rng.random() < SFT_TASK_SHARE else chat_exchange(rng.choice(chats))
        exchanges = [first]
        if rng.random() < 0.15:
            exchanges.append(task_exchange(rng.choice(tasks)) if rng.random() < 0.5 else chat_exchange(rng.choice(chats)))
        out.append(conversation(rng, exchanges))
    return out


RULES = ["wrong_answer", "wrong_language", "rude", "evasive", "rambling", "no_end", "off_topic"]


def wrong_task_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer in the same format: a nearby number, a reordered list, a changed numeral."""
    if answer.lstrip("-").isdigit():
        value = int(answer)
        return str(max(0, value + rng.choice([-3, -2, -1, 1, 2, 3, 10])) if value > 3 else value + rng.choice([1, 2, 3]))
    parts = answer.split(", ")
    if len(parts) > 1:
        shuffled = parts[:]
        while shuffled == parts:
            rng.shuffle(shuffled)
        return ", ".join(shuffled)
    # a Chinese numeral: change one digit character
    digits = "一二三四五六七八九"
    i = next((k for k, c in enumerate(answer) if c in digits), None)
    if i is None:
        return answer + "一"
    return answer[:i] + rng.choice([d for d in digits if d != answer[i]]) + answer[i + 1 :]


def rambling(chosen: str, lang: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join([chosen] * rng.randint(4, 6))  # says the same thing again and again
    filler = rng.choice([" and so on", " and then", " you know"]) if lang == "en" else rng.choice(["，然后", "，就是", "，对吧"])
    return chosen.rstrip(".。") + filler * rng.randint(4, 7) + ("." if lang == "en" else "。")


def truncate(chosen: str, rng: random.Random) -> str:
    """Cut mid-reply (the trainer renders it WITHOUT the closing <|im_end|>)."""
    cut = rng.randint(max(1, len(chosen) // 3), max(1, 2 * len(chosen) // 3))
    return chosen[:cut].rstrip()


def off_topic_reply(chosen: str, lang: str, chats: list[ChatItem], rng: random.Random) -> str:
    """A fluent, polite reply to another question in the same language: half the time a task's answer sentence
    ("The answer is 7."), else another chat exchange's reply; drawn until the gold judge sees it as off topic."""
    while True:
        if rng.random() < 0.5:
            reply = canonical_reply(str(rng.randint(0, 20)), lang)
        else:
            reply = rng.choice([c.reply for c in chats if c.lang == lang])
        if not is_on_topic(reply, chosen):
            return reply


def rejected_reply(rule: str, chosen: str, lang: str, other: str, wrong: str | None, off_topic: str,
                   rng: random.Random) -> str:
    """A worse reply by one rule of RULES; `wrong` is the wrong-answer reply (tasks only)."""
    if rule == "wrong_answer":
        if wrong is None:
            raise ValueError("wrong_answer needs a task: the gold judge can only check correctness of tasks")
        return wrong
    if rule == "wrong_language":
        return other
    if rule == "rude":
        rude = rng.choice(RUDE_EN if lang == "en" else RUDE_ZH)
        return rude + (" " + chosen if rng.random() < 0.5 else "")  # right answer, rude manner: still rejected
    if rule == "evasive":
        return rng.choice(EVASIVE_EN if lang == "en" else EVASIVE_ZH)
    if rule == "rambling":
        return rambling(chosen, lang, rng)
    if rule == "off_topic":
        return off_topic
    return truncate(chosen, rng)


def task_pair(task: dict[str, Any], rule: str, chats: list[ChatItem], rng: random.Random) -> dict[str, Any]:
    chosen = canonical_reply(task["answer"], task["lang"])
    other = canonical_reply(task["answer"], "zh" if task["lang"] == "en" else "en")
    wrong = canonical_reply(wrong_task_answer(task["answer"], rng), task["lang"])
    # A task's off-topic reply is a chat reply (another answer sentence would be the wrong_answer rule).
    off_topic = rng.choice([c.reply for c in chats if c.lang == task["lang"]]) if rule == "off_topic" else ""
    rejected = rejected_reply(rule, chosen, task["lang"], other, wrong, off_topic, rng)
    return {"prompt": task["prompt"], "chosen": chosen, "rejected": rejected, "rule": rule,
            "rejected_truncated": rule == "no_end", "task": task}


def chat_pair(item: ChatItem, rule: str, chats: list[ChatItem], rng: random.Random) -> dict[str, Any]:
    off_topic = off_topic_reply(item.reply, item.lang, chats, rng) if rule == "off_topic" else ""
    rejected = rejected_reply(rule, item.reply, item.lang, item.other_reply, None, off_topic, rng)
    return {"prompt": [msg("user", item.question)], "chosen": item.reply, "rejected": rejected, "rule": rule,
            "rejected_truncated": rule == "no_end"}


def preference_pairs(rng: random.Random, tasks: list[dict[str, Any]], chats: list[ChatItem], n_task: int,
                     n_chat: int) -> list[dict[str, Any]]:
    pairs = [task_pair(tasks[i % len(tasks)], RULES[i % len(RULES)], chats, rng) for i in range(n_task)]
    chat_order = chats[:]
    rng.shuffle(chat_order)
    # Chat prompts carry no verifiable answer, so they skip wrong_answer (the gold judge could not see it).
    # off_topic comes three times: it is the rule the reward model learns last and PPO exploited (docs/ppo.md).
    chat_rules = [r for r in RULES if r != "wrong_answer"] + ["off_topic", "off_topic"]
    pairs += [chat_pair(chat_order[i % len(chat_order)], chat_rules[i % len(chat_rules)], chats, rng) for i in range(n_chat)]
    return pairs


def handwritten_pair(index: int, prompt: str, chosen: str, rejected: str, rule: str) -> dict[str, Any]:
    """A hand-written pair; one whose chosen reply is a canonical numeric answer also carries a task record,
    so the gold judge (and PPO's gold score) can check correctness on it."""
    pair: dict[str, Any] = {"prompt": [msg("user", prompt)], "chosen": chosen, "rejected": rejected, "rule": rule,
                            "rejected_truncated": False, "source": "handwritten"}
    answer = extract_answer(chosen)
    if answer is not None and parse_number(answer) is not None:
        lang = "en" if chosen.startswith("The answer is") else "zh"
        pair["task"] = {"id": f"hand-{index:03d}", "family": "handwritten", "lang": lang, "prompt": pair["prompt"],
                        "answer": answer, "verifier": "math"}
    return pair


# ------------------------------------------------------------------------------------------- build
def build_records() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(SEED)
    hand_train = {prompt_key([msg("user", q)]) for q, *_ in HANDWRITTEN_PAIRS[:-N_HANDWRITTEN_VAL]}
    hand_val = {prompt_key([msg("user", q)]) for q, *_ in HANDWRITTEN_PAIRS[-N_HANDWRITTEN_VAL:]}
    val_tasks = generate_unique_tasks(VAL_TASKS_PER_PAIR, seed=SEED, exclude=hand_train | hand_val)
    held = {prompt_key(t["prompt"]) for t in val_tasks} | hand_val
    heldout_tasks = generate_unique_tasks(HELDOUT_TASKS_PER_PAIR, seed=SEED + 1, exclude=held | hand_train)
    held |= {prompt_key(t["prompt"]) for t in heldout_tasks}
    train_tasks = generate_unique_tasks(TRAIN_TASKS_PER_PAIR, seed=SEED + 2, exclude=held)
    drill_tasks = generate_unique_tasks(DRILL_TASKS_PER_PAIR, seed=SEED + 3, exclude=held, families=DRILLS)
    for split, tasks in (("val", val_tasks), ("heldout", heldout_tasks), ("train", train_tasks), ("drill", drill_tasks)):
        for i, task in enumerate(tasks):
            task["id"] = f"{split}-{task['family']}-{task['lang']}-{i:05d}"

    chats = chat_items(rng)
    chats = [c for c in chats if prompt_key([msg("user", c.question)]) not in held]
    # Prompts of the hand-written training pairs must stay on the training side.
    order = [i for i, c in enumerate(chats) if prompt_key([msg("user", c.question)]) not in hand_train]
    rng.shuffle(order)
    n_held_chat = int(HELDOUT_CHAT_SHARE * len(chats))
    held_chat_idx = set(order[:n_held_chat])
    heldout_chats = [c for i, c in enumerate(chats) if i in held_chat_idx]
    train_chats = [c for i, c in enumerate(chats) if i not in held_chat_idx]

    sft_train = sft_conversations(rng, N_SFT_TRAIN, train_tasks, train_chats)
    sft_val = sft_conversations(rng, N_SFT_VAL, heldout_tasks, heldout_chats)

    prefs_train = preference_pairs(rng, train_tasks, train_chats, N_PREFS_TRAIN_TASK, N_PREFS_TRAIN_CHAT)
    n_hand_train = len(HANDWRITTEN_PAIRS) - N_HANDWRITTEN_VAL
    prefs_train += [handwritten_pair(i, *row) for i, row in enumerate(HANDWRITTEN_PAIRS[:n_hand_train])]
    prefs_val = preference_pairs(rng, heldout_tasks, heldout_chats, N_PREFS_VAL_TASK, N_PREFS_VAL_CHAT)
    prefs_val += [handwritten_pair(n_hand_train + i, *row) for i, row in enumerate(HANDWRITTEN_PAIRS[n_hand_train:])]
    rng.shuffle(prefs_train)
    rng.shuffle(prefs_val)  # PPO evaluates a prefix: mix tasks and chat prompts

    return {
        "sft_train.jsonl": sft_train, "sft_val.jsonl": sft_val,
        "tasks_train.jsonl": train_tasks, "tasks_val.jsonl": val_tasks, "drills_train.jsonl": drill_tasks,
        "prefs_train.jsonl": prefs_train, "prefs_val.jsonl": prefs_val,
    }


def write_files(files: dict[str, list[dict[str, Any]]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / name).write_text(text, encoding="utf-8", newline="\n")


def summary(files: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown counts for corpus/README.md."""
    lines = ["| file | records | breakdown |", "|---|---:|---|"]
    for name, records in files.items():
        if name.startswith(("tasks", "drills")):
            langs = Counter(r["lang"] for r in records)
            fams = Counter(r["family"] for r in records)
            detail = f"en {langs['en']}, zh {langs['zh']}; " + ", ".join(f"{f} {n}" for f, n in sorted(fams.items()))
        elif name.startswith("prefs"):
            rules = Counter(r["rule"] for r in records)
            n_task = sum("task" in r for r in records)
            n_hand = sum(r.get("source") == "handwritten" for r in records)
            detail = (f"task prompts {n_task}, chat prompts {len(records) - n_task} (hand-written {n_hand}); "
                      + ", ".join(f"{k} {n}" for k, n in sorted(rules.items())))
        else:
            n_task = sum(any(m["content"].startswith(("The answer is", "答案是")) for m in r["messages"] if m["role"] == "assistant")
                         for r in records)
            n_multi = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in records)
            n_sys = sum(r["messages"][0]["role"] == "system" for r in records)
            langs = Counter(detect_language(next(m["content"] for m in r["messages"] if m["role"] == "user"))
                            for r in records)
            detail = (f"with a task reply {n_task}, two-turn {n_multi}, with system message {n_sys}; first user turn "
                      f"en {langs['en']}, zh {langs['zh']}, mixed {langs['mixed']}")
        lines.append(f"| `{name}` | {len(records):,} | {detail} |")
    return "\n".join(lines)


COUNTS_START, COUNTS_END = "<!-- chat-data-counts:start -->", "<!-- chat-data-counts:end -->"


def update_readme(readme: Path, table: str) -> None:
    """Replace the counts block between the markers in corpus/README.md (leaves every other line alone)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if COUNTS_START not in text or COUNTS_END not in text:
        print(f"note: {readme} has no {COUNTS_START} block; counts not recorded there", file=sys.stderr)
        return
    head, rest = text.split(COUNTS_START, 1)
    _, tail = rest.split(COUNTS_END, 1)
    readme.write_text(f"{head}{COUNTS_START}\n{table}\n{COUNTS_END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "corpus" / "chat")
    parser.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with --out")
    args = parser.parse_args()
    files = build_records()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_files(files, Path(tmp))
            differ = [n for n in files if (Path(tmp) / n).read_bytes() != (args.out / n).read_bytes()]
        if differ:
            sys.exit(f"{args.out}: {', '.join(differ)} differ from a fresh build; run scripts/build_chat_data.py")
        print(f"{args.out}: byte-identical to a fresh build")
        return
    write_files(files, args.out)
    table = summary(files)
    update_readme(args.out.parent / "README.md", table)
    print(table)


if __name__ == "__main__":
    main()
