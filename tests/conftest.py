"""Shared fixtures: seeded tiny configs, hermetic run directories, and the tiny world (data, tokenizer, base model
and an SFT model trained from it) that the stage and evaluation tests start from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchllm.config import ModelConfig, model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.io import save_model
from scratchllm.tokenizer.bpe import Tokenizer

torch.set_num_threads(2)

CHAT = Path(__file__).resolve().parents[1] / "corpus" / "chat"
SIZES = {"sft_train": 400, "sft_val": 24, "tasks_train": 300, "tasks_val": 22, "prefs_train": 300, "prefs_val": 48}
# Stage runs in tests: CPU, no periodic evaluation or checkpoints, no time budget (steps decide).
FAST = ["--loop.eval_every=0", "--loop.checkpoint_every=0", "--loop.device=cpu", "--loop.max_time_s=0"]
SFT_ARGS = ["--loop.max_steps=80", "--loop.batch_size=16", "--optim.lr=3e-3", "--sft.eval_prompts=16", "--sft.eval_tasks=22",
            "--sft.pretrain_seq_len=64"]


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """2 layers, d_model 32, vocab ~300: big enough to exercise every code path, fast on CPU."""
    return model_preset("tiny", vocab_size=300)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> tuple[Path, Path]:
    """(data_dir with small jsonl files, model directory of a tiny random GPT + tokenizer); text in data/../pretrain."""
    root = tmp_path_factory.mktemp("world")
    data = root / "chat"
    data.mkdir()
    text = []
    for name, n in SIZES.items():
        lines = (CHAT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        text += [json.dumps(json.loads(line), ensure_ascii=False) for line in lines[:100]]
    corpus = CHAT.parent / "pretrain"
    for split, size in (("train", 60_000), ("val", 20_000)):  # a slice of real text for SFT's replay and val_bpb
        (root / "pretrain" / split).mkdir(parents=True)
        source = sorted((corpus / split).glob("*.txt"))[0].read_text(encoding="utf-8")[:size]
        (root / "pretrain" / split / "text.txt").write_text(source, encoding="utf-8")
    tok = Tokenizer.train(["\n".join(text)], vocab_size=256 + 200 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_kv_heads=2))
    base = save_model(root / "base", model, tok, {})
    return data, base


@pytest.fixture(scope="session")
def sft_model(tiny_world, tmp_path_factory) -> tuple[Path, Path]:
    """(run root holding sft/final, data_dir): the tiny base model fine-tuned until it ends its replies. Tests read
    it and write their own stages elsewhere (tmp_path), so no test depends on another's order."""
    from scratchllm.train.stages import sft

    data, base = tiny_world
    root = tmp_path_factory.mktemp("sft")
    sft.run(root, base, data, FAST + SFT_ARGS + [f"--sft.pretrain_data={data.parent / 'pretrain'}", "--sft.pretrain_rows=0"])
    return root, data
