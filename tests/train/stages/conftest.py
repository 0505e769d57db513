"""A tiny world for stage tests: a tokenizer trained in-process, a small data subset, a tiny base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.checkpoint import save_model

CHAT = Path(__file__).resolve().parents[3] / "corpus" / "chat"
SIZES = {"sft_train": 400, "sft_val": 24, "tasks_train": 300, "tasks_val": 22, "prefs_train": 300, "prefs_val": 48}


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


def first_and_last_eval(stage_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    return evals[0], evals[-1]
