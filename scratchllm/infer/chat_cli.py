"""`scratchllm chat`: an interactive multi-turn chat through the chat template.

Commands: /reset clears the conversation, /system TEXT sets a system message, /quit exits.
Ctrl-C stops the current reply, not the program; Ctrl-D (EOF) exits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scratchllm.infer.generate_cli import (
    add_inference_args,
    add_sampling_args,
    load_for_inference,
    stream_text,
)
from scratchllm.tokenizer.chat import render_for_completion


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm chat", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model directory, e.g. runs/default/grpo/final")
    add_sampling_args(parser)
    add_inference_args(parser)
    args = parser.parse_args(argv)
    model, tok = load_for_inference(args.checkpoint, args.device, args.quantize, args.lora)
    print(f"scratchllm chat — {args.checkpoint}  (/reset, /system TEXT, /quit; Ctrl-C stops a reply)")
    system: str | None = None
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = render_for_completion(tok, messages)
        if len(prompt) >= model.config.max_seq_len - 8:
            history = history[-1:]  # keep the context inside max_seq_len: drop older turns
            prompt = render_for_completion(tok, ([{"role": "system", "content": system}] if system else []) + history)
        print("bot> ", end="", flush=True)
        try:
            with torch.no_grad():
                reply = stream_text(model, tok, prompt, args)
        except KeyboardInterrupt:
            reply = "(interrupted)"
            print(" [stopped]")
        history.append({"role": "assistant", "content": reply})
        print()
