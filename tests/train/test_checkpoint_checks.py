"""Loading refuses a tokenizer that does not belong to the weights, and names a truncated weights file (#29)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.io import CheckpointError, load_model, save_model
from scratchllm.tokenizer.bpe import Tokenizer

# random words over ten letters: enough distinct pairs for the few hundred merges these tests ask for
TEXT = [" ".join("".join(random.Random(i).choices("abcdefghij", k=5)) for i in range(3000))]


def _saved(tmp_path: Path, vocab: int = 300) -> Path:
    tok = Tokenizer.train(TEXT, vocab, progress=False)
    return save_model(tmp_path / "model", GPT(model_preset("tiny", vocab_size=tok.vocab_size)), tok, {})


def test_a_smaller_tokenizer_from_another_run_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    Tokenizer.train(TEXT, 280, progress=False).save(path / "tokenizer.json")  # loaded and spoke mojibake
    with pytest.raises(CheckpointError, match="not the tokenizer this model was saved with.*vocab_size 280"):
        load_model(path)


def test_a_tokenizer_larger_than_the_embedding_is_refused_even_without_a_record(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["tokenizer"]  # saved before the record existed
    (path / "config.json").write_text(json.dumps(config))
    Tokenizer.train(TEXT, 320, progress=False).save(path / "tokenizer.json")  # was a raw IndexError
    with pytest.raises(CheckpointError, match="has 320 tokens but the model's vocabulary has 300"):
        load_model(path)


def test_the_right_tokenizer_loads(tmp_path: Path) -> None:
    model, tok, _ = load_model(_saved(tmp_path))
    assert tok.vocab_size == model.config.vocab_size == 300


def test_a_truncated_weights_file_is_named(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # "SafetensorError: incomplete metadata", no path
    with pytest.raises(CheckpointError, match=f"{weights}: unreadable safetensors file"):
        load_model(path)
