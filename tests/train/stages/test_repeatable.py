"""One seed, one result: a stage run twice from the same inputs gives the same weights, whatever the global
random state was before (the pipeline's promise of the same model on every machine starts here)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from scratchllm.train.stages import pretrain, reward
from tests.conftest import FAST

TINY = FAST + ["--loop.max_steps=3", "--loop.batch_size=2", "--loop.seq_len=32", "--loop.eval_batches=1",
               "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "final" / "model.safetensors"))


def test_pretrain_twice_with_one_seed_gives_equal_weights(tiny_world, tmp_path: Path) -> None:
    data, base = tiny_world
    tokenizer = base / "tokenizer.json"
    runs = []
    for i, disturbance in enumerate((1, 2)):
        torch.manual_seed(disturbance)  # whatever ran before (tests, a notebook) must not leak into the model
        torch.rand(disturbance)
        pretrain.run(tmp_path / str(i), preset="tiny", tokenizer=tokenizer, data_dir=data.parent / "pretrain",
                     overrides=TINY)
        runs.append(_weights(tmp_path / str(i) / "pretrain"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    torch.manual_seed(3)
    pretrain.run(tmp_path / "other", preset="tiny", tokenizer=tokenizer, data_dir=data.parent / "pretrain",
                 overrides=TINY + ["--loop.seed=7"])
    other = _weights(tmp_path / "other" / "pretrain")
    assert not all(torch.equal(runs[0][k], other[k]) for k in other)  # the seed is what decides


def test_reward_head_initialisation_follows_the_seed(tiny_world, tmp_path: Path) -> None:
    data, base = tiny_world
    heads = []
    for i in range(2):
        torch.manual_seed(10 + i)
        reward.run(tmp_path / str(i), base, data, FAST + ["--loop.max_steps=1", "--loop.batch_size=2"])
        heads.append(_weights(tmp_path / str(i) / "reward"))
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_pretrain_from_jsonl_text_alone_trains_its_own_tokenizer_on_the_documents(tmp_path: Path) -> None:
    import json

    from scratchllm.tokenizer.bpe import Tokenizer

    source = (Path(__file__).resolve().parents[3] / "corpus" / "pretrain" / "train" / "shakespeare.txt")
    text = source.read_text(encoding="utf-8")[:30_000]
    for split, part in (("train", text[:24_000]), ("val", text[24_000:])):
        (tmp_path / "data" / split).mkdir(parents=True)
        docs = [p for p in part.split("\n\n") if p.strip()]
        (tmp_path / "data" / split / "docs.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    pretrain.run(tmp_path / "run", preset="tiny", data_dir=tmp_path / "data", overrides=TINY)
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    assert tok.metadata["files"] == [str(tmp_path / "data" / "train" / "docs.jsonl")]
    assert '{"text"' not in tok.decode(list(range(tok.vocab_size - 8)))  # merges learned from documents, not JSON
    assert (tmp_path / "run" / "pretrain" / "final" / "model.safetensors").exists()
