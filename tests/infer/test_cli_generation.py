"""`scratchllm generate`/`chat` text: --temperature 0 is plain argmax (no hidden penalty), stop strings never print,
and the exported generation_config.json stops on every id our generation stops on."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.infer.generate_cli import add_sampling_args, sampling_from_args, stream_text
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import reply_stop_ids


@pytest.fixture(scope="module")
def world() -> tuple[GPT, Tokenizer]:
    tok = Tokenizer.train(["hello world, the answer is 42. user assistant\n" * 30], 256 + 60 + 4, progress=False)
    torch.manual_seed(1)
    # init_std 0.3: confident, varied logits, where a 1.1 penalty flips the argmax (at 0.02 every token ties low)
    return GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128, init_std=0.3)).eval(), tok


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    return parser.parse_args(list(flags))


@torch.no_grad()
def _argmax_text(model: GPT, tok: Tokenizer, ids: list[int], n: int) -> str:
    """Greedy by full recompute, the way transformers' greedy search defines it."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt in reply_stop_ids(tok):
            break
        out.append(nxt)
    return tok.decode(out)


def test_temperature_zero_is_plain_argmax_unless_a_penalty_is_asked_for(world) -> None:
    model, tok = world
    assert sampling_from_args(_args("--temperature", "0")).repetition_penalty == 1.0
    assert sampling_from_args(_args("--temperature", "0", "--repetition-penalty", "1.3")).repetition_penalty == 1.3
    assert sampling_from_args(_args()).repetition_penalty == 1.1  # sampling keeps its mild default
    prompt = tok.encode("hello world")
    greedy = stream_text(model, tok, prompt, _args("--temperature", "0", "--max-new-tokens", "24"), io.StringIO())
    assert greedy == _argmax_text(model, tok, prompt, 24)
    penalised = stream_text(model, tok, prompt, _args("--temperature", "0", "--max-new-tokens", "24",
                                                      "--repetition-penalty", "1.1"), io.StringIO())
    assert penalised != greedy  # the old hidden default changed greedy output on this model


def test_stop_string_across_tokens_never_prints(world) -> None:
    model, tok = world
    flags = ("--temperature", "1.0", "--seed", "4", "--max-new-tokens", "40")
    full = stream_text(model, tok, tok.encode("hello"), _args(*flags), io.StringIO())
    stop = full[10:14]  # four characters from the middle of the reply: they span tokens on this small vocabulary
    out = io.StringIO()
    shown = stream_text(model, tok, tok.encode("hello"), _args(*flags, "--stop", stop), out)
    assert shown == out.getvalue() == full[: full.index(stop)]


def test_exported_generation_config_stops_on_every_reply_stop_id(world, tmp_path) -> None:
    from scratchllm.export.hf import export_hf

    model, tok = world
    export_hf(model, tok, tmp_path)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    assert set(config["eos_token_id"]) == set(reply_stop_ids(tok)) and tok.im_start_id in config["eos_token_id"]
