"""A small trained model and its tokenizer, shared by the export tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer

# English, Chinese and emoji, so the tokenizer has merges in each script and the model has seen each.
TRAIN_TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog. 床前明月光，疑是地上霜。举头望明月。"
    "😀🎉 def f(x): return x + 1\n"
)


def trained_tiny(steps: int = 30, **overrides) -> tuple[GPT, Tokenizer]:
    """A tiny GPT trained a few steps on TRAIN_TEXT: not the symmetric init, and with clear greedy choices."""
    tok = Tokenizer.train([TRAIN_TEXT * 20 + " user assistant system"], 256 + 80 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, **overrides)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tok.encode(TRAIN_TEXT * 2)])
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_model() -> tuple[GPT, Tokenizer]:
    return trained_tiny()
