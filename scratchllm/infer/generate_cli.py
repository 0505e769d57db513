"""`scratchllm generate`: stream a continuation (or a chat reply with --chat) from a checkpoint.

Text is streamed through the tokenizer's incremental decoder, so a half UTF-8 character is never printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from scratchllm.infer.engine import generate
from scratchllm.infer.reply_text import StopMatcher
from scratchllm.infer.sampling import SamplingParams
from scratchllm.tokenizer.bpe import StreamDecoder
from scratchllm.tokenizer.chat import reply_stop_ids


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="CTRL penalty on tokens already generated (default: 1.1 when sampling, off at "
                             "--temperature 0, so greedy is plain argmax, as in transformers)")
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu")


SAMPLING_REPETITION_PENALTY = 1.1  # a small model sampled without it loops (docs/troubleshooting.md)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    penalty = args.repetition_penalty
    if penalty is None:  # only an explicit --repetition-penalty changes greedy decoding
        penalty = 1.0 if args.temperature == 0 else SAMPLING_REPETITION_PENALTY
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty)


def stream_text(model, tok, prompt_ids: list[int], args: argparse.Namespace, out=sys.stdout) -> str:
    """Generate, print as it comes, stop at the end tokens or a stop string; returns the text.

    Text that could be the start of a stop string is held back until it cannot (infer/reply_text.py), so no part
    of a stop string is ever printed."""
    decoder, matcher = StreamDecoder(tok), StopMatcher(args.stop)
    text = ""
    stop_ids = reply_stop_ids(tok)
    for step in generate(model, [prompt_ids], args.max_new_tokens, sampling_from_args(args), stop_ids, args.seed, tok.pad_id):
        token = int(step.tokens[0])
        if token in stop_ids:
            break
        piece, stopped = matcher.push(decoder.push(token))
        out.write(piece)
        out.flush()
        text += piece
        if stopped:
            return text
    tail = matcher.push(decoder.flush())[0] + matcher.flush()
    out.write(tail)
    return text + tail


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--quantize and --lora, shared by generate, chat and serve."""
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8: per-channel int8 weights (about 4x smaller; see docs/benchmarks.md)")
    parser.add_argument("--lora", type=Path, default=None,
                        help="a LoRA adapter directory (adapter.safetensors + adapter_config.json) to apply to --checkpoint")


def load_for_inference(checkpoint: Path, device: str, quantize: str | None = None, lora: Path | None = None):
    """Model directory -> (model in eval mode, tokenizer). --lora injects a saved adapter into the base model and
    merges it (same outputs, no extra matmuls per token); --quantize int8 then quantizes the merged weights."""
    from scratchllm.export.peft import load_any_adapter
    from scratchllm.model.io import load_model
    from scratchllm.model.lora import merge_lora

    model, tok, _ = load_model(checkpoint, device)
    if lora is not None:
        load_any_adapter(lora, model)
        merge_lora(model)
        model.to(device)
    if quantize == "int8":
        from scratchllm.infer.quantize import quantize_int8

        quantize_int8(model)
    return model.eval(), tok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm generate", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model directory, e.g. runs/default/sft/final")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    parser.add_argument("--best-of", type=int, default=1, help="sample N chat replies, print the reward model's favourite")
    parser.add_argument("--reward-model", type=Path, default=None, help="reward model directory for --best-of")
    add_sampling_args(parser)
    add_inference_args(parser)
    args = parser.parse_args(argv)
    model, tok = load_for_inference(args.checkpoint, args.device, args.quantize, args.lora)
    if args.best_of > 1:
        if args.reward_model is None:
            parser.error("--best-of needs --reward-model DIR (e.g. runs/default/reward/final)")
        from scratchllm.infer.best_of_n import best_of_n
        from scratchllm.model.heads import load_scalar_model

        reward_model, _ = load_scalar_model(args.reward_model, args.device)
        best, scored = best_of_n(model, reward_model, tok, [{"role": "user", "content": args.prompt}], args.best_of,
                                 args.max_new_tokens, sampling_from_args(args), args.seed)
        for text, score in sorted(scored, key=lambda pair: -pair[1]):
            print(f"  [{score:+.3f}] {text}")
        print(best)
        return 0
    if args.chat:
        from scratchllm.tokenizer.chat import render_for_completion

        prompt_ids = render_for_completion(tok, [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
        print(args.prompt, end="")
    with torch.no_grad():
        stream_text(model, tok, prompt_ids, args)
    print()
    return 0
