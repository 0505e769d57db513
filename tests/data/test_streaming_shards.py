"""The streaming data path: several shards on disk, read lazily, windows a pure function of (seed, batch, rank).

Covers data/shards.py `build_shards`, `iter_documents`, `ShardSet` and data/batches.py `LMWindows` over a
`ShardSet`, then the pretrain stage with --data.shard_tokens end to end (tiny model, a few steps, resumed).
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchllm import runtime
from scratchllm.data.batches import LMWindows, sequential_windows
from scratchllm.data.shards import (
    ShardError,
    ShardSet,
    build_shard,
    build_shards,
    iter_documents,
    load_shard,
    read_header,
    split_documents,
    write_shard,
)
from scratchllm.tokenizer.bpe import Tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "pretrain"
FINGERPRINT = "test-tokenizer"


def _write(path: Path, tokens: np.ndarray, fingerprint: str = FINGERPRINT) -> Path:
    header = {"magic": "scratchllm-shard", "version": 1, "dtype": np.dtype(tokens.dtype).name,
              "n_tokens": len(tokens), "n_documents": 1, "n_text_bytes": 0, "tokenizer": fingerprint, "files": []}
    write_shard(path, tokens, header)
    return path


@pytest.fixture
def three_shards(tmp_path: Path) -> list[Path]:
    """Three shards of different lengths whose tokens say where they are: shard i holds i*10000 + position."""
    sizes = (3000, 500, 1700)
    return [_write(tmp_path / f"s_{i:05d}.bin", (i * 10_000 + np.arange(n)).astype(np.uint32))
            for i, n in enumerate(sizes)]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[list[Path], Tokenizer]:
    """Two small slices of the bundled corpus as separate files, and a throwaway tokenizer trained on them."""
    root = tmp_path_factory.mktemp("text")
    files = []
    for i, source in enumerate(sorted((CORPUS / "train").glob("*.txt"))[:2]):
        text = source.read_text(encoding="utf-8")[:20_000]
        files.append(root / f"part{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    tok = Tokenizer.train([f.read_text(encoding="utf-8") for f in files], vocab_size=256 + 100 + 4, progress=False)
    return files, tok


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return torch.equal(a["ids"], b["ids"]) and torch.equal(a["targets"], b["targets"])


# ---- building ---------------------------------------------------------------------------------------------------
def test_iter_documents_reads_in_chunks_and_splits_as_the_whole_file_does(tmp_path: Path) -> None:
    text = "one\n\n\ntwo\nlines\n\n\n\n\nthree\n\n\n\n\n\nfour\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    for chunk_chars in (1, 2, 3, 5, 1000):  # every way the separator can straddle a chunk boundary
        assert list(iter_documents(path, chunk_chars)) == split_documents(text)


def test_build_shards_caps_each_shard_and_together_equals_the_single_shard(text_files, tmp_path: Path) -> None:
    files, tok = text_files
    single, _ = load_shard(build_shard(files, tok, tmp_path / "one.bin"), tok)
    cap = len(single) // 5
    paths = build_shards(files, tok, tmp_path / "many", shard_tokens=cap, prefix="train", num_workers=2,
                         batch_chars=3000)  # several tokenizer batches per file, tokenized by 2 processes
    assert len(paths) >= 5 and [p.name for p in paths] == [f"train_{i:05d}.bin" for i in range(len(paths))]
    shards = ShardSet(paths, tok)
    assert all(n <= cap or h["n_documents"] == 1 for n, h in zip(shards.sizes, shards.headers))  # documents stay whole
    assert sum(n <= cap for n in shards.sizes) >= 3
    assert np.array_equal(np.concatenate([shards[i] for i in range(len(shards))]), single)  # no token lost or moved
    first, last = read_header(paths[0])[0], read_header(paths[-1])[0]
    assert first["tokenizer"] == tok.fingerprint() and first["files"] == ["part0.txt"] and last["files"] == ["part1.txt"]
    assert sum(read_header(p)[0]["n_documents"] for p in paths) == read_header(tmp_path / "one.bin")[0]["n_documents"]


# ---- reading ----------------------------------------------------------------------------------------------------
def test_one_shard_draws_exactly_the_windows_of_a_plain_array(three_shards) -> None:
    tokens = load_shard(three_shards[0])[0]
    plain, sharded = LMWindows(np.array(tokens), 16, 4, seed=3), LMWindows(ShardSet(three_shards[:1]), 16, 4, seed=3)
    for k in range(20):
        rng = np.random.default_rng([3, k])  # the draw LMWindows made before shard sets existed
        starts = rng.integers(0, len(tokens) - 16 - 1, size=4)
        expected = torch.from_numpy(np.stack([tokens[s : s + 17] for s in starts]).astype(np.int64))
        assert torch.equal(plain.batch(k)["ids"], expected[:, :-1]) and _equal(plain.batch(k), sharded.batch(k))


def test_two_readers_with_one_seed_draw_the_same_windows_across_shards(three_shards) -> None:
    a, b = LMWindows(ShardSet(three_shards), 16, 8, seed=7), LMWindows(ShardSet(three_shards), 16, 8, seed=7)
    other = LMWindows(ShardSet(three_shards), 16, 8, seed=8)
    for k in range(30):
        assert _equal(a.batch(k), b.batch(k))
    assert not all(_equal(a.batch(k), other.batch(k)) for k in range(5))
    rows = torch.cat([a.batch(k)["ids"] for k in range(30)])
    # every window lies inside one shard (consecutive tokens of one shard) and every shard is drawn from
    assert bool(((rows[:, 1:] - rows[:, :-1]) == 1).all())
    assert {int(r[0]) // 10_000 for r in rows} == {0, 1, 2}


def test_resume_at_position_k_continues_the_uninterrupted_stream(three_shards) -> None:
    uninterrupted = iter(LMWindows(ShardSet(three_shards), 16, 4, seed=1))
    expected = [next(uninterrupted) for _ in range(9)]
    first = LMWindows(ShardSet(three_shards), 16, 4, seed=1)
    stream = iter(first)
    for k in range(4):
        assert _equal(next(stream), expected[k])
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint's JSON stores it
    assert state == {"position": 4, "n_shards": 3, "n_tokens": 5200}
    resumed = LMWindows(ShardSet(three_shards), 16, 4, seed=1)
    resumed.load_state_dict(state)
    stream = iter(resumed)
    for k in range(4, 9):
        assert _equal(next(stream), expected[k])


def test_two_ranks_draw_disjoint_batches_that_together_are_the_one_process_stream(three_shards, monkeypatch) -> None:
    one = iter(LMWindows(ShardSet(three_shards), 16, 4, seed=5))
    single = [next(one) for _ in range(10)]
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    per_rank, indices = [], []
    for r in (0, 1):
        monkeypatch.setattr(runtime, "rank", lambda r=r: r)
        stream = iter(LMWindows(ShardSet(three_shards), 16, 4, seed=5))
        per_rank.append([next(stream) for _ in range(5)])
        indices.append({p * 2 + r for p in range(5)})  # the global batch indices rank r drew
    assert not indices[0] & indices[1] and indices[0] | indices[1] == set(range(10))
    for k in range(10):  # rank k % 2 drew global batch k, exactly as one process does
        assert _equal(per_rank[k % 2][k // 2], single[k])
    assert not any(_equal(x, y) for x in per_rank[0] for y in per_rank[1])


@pytest.mark.parametrize("damage", ["truncated", "foreign tokenizer", "garbage"])
def test_a_corrupt_or_foreign_shard_among_several_is_named(three_shards, damage: str) -> None:
    bad = three_shards[1]
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-10])
        message = "truncated or corrupt"
    elif damage == "foreign tokenizer":
        _write(bad, np.arange(500, dtype=np.uint32), fingerprint="another-tokenizer")
        message = "another tokenizer"
    else:
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
        message = "unreadable shard header"
    with pytest.raises(ShardError, match=message) as err:
        ShardSet(three_shards)
    assert str(bad) in str(err.value)


def test_a_shard_of_another_tokenizer_than_the_runs_is_named(text_files, tmp_path: Path) -> None:
    files, tok = text_files
    paths = build_shards(files, tok, tmp_path / "shards", shard_tokens=10**9)
    foreign = _write(tmp_path / "shards" / "shard_00001.bin", np.arange(100, dtype=np.uint16))
    with pytest.raises(ShardError, match=f"{foreign}: built with another tokenizer"):
        ShardSet([*paths, foreign], tok)


def test_the_reader_maps_shards_lazily_and_never_reads_one_whole(tmp_path: Path) -> None:
    n = 1 << 21  # 4 MiB of uint16 per shard
    paths = [_write(tmp_path / f"big_{i}.bin", np.full(n, i, dtype=np.uint16)) for i in range(3)]
    tracemalloc.start()
    try:
        shards = ShardSet(paths, max_open=2)
        assert not shards._open  # opening read the headers only
        windows = LMWindows(shards, 64, 8, seed=0)
        for k in range(20):
            windows.batch(k)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n // 4, f"drawing windows allocated {peak} bytes; one shard is {2 * n}"
    assert all(isinstance(shards[i], np.memmap) for i in range(3))
    assert len(shards._open) == 2  # the least recently used mapping was closed


def test_sequential_windows_over_shards_match_a_plain_array_and_never_cross_a_boundary(three_shards) -> None:
    tokens = load_shard(three_shards[0])[0]
    for plain, sharded in zip(sequential_windows(tokens, 32, 4, 5), sequential_windows(ShardSet(three_shards[:1]), 32, 4, 5)):
        assert _equal(plain, sharded)
    batches = list(sequential_windows(ShardSet(three_shards), 100, 8, 100))
    rows = torch.cat([b["ids"] for b in batches])
    assert len(rows) == 29 + 4 + 16  # (n - 1) // seq_len windows per shard
    assert bool(((rows[:, 1:] - rows[:, :-1]) == 1).all())


# ---- the pretrain stage -----------------------------------------------------------------------------------------
def test_pretrain_streams_several_shards_and_resumes_as_if_never_stopped(text_files, tmp_path: Path) -> None:
    from scratchllm.train.stages import pretrain

    files, tok = text_files
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        for f in files:
            (data / split / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    tok.save(tmp_path / "tokenizer.json")
    flags = ["--loop.batch_size=2", "--loop.seq_len=32", "--loop.eval_batches=2", "--loop.device=cpu",
             "--loop.max_time_s=0", "--loop.eval_every=0", "--loop.checkpoint_every=2", "--data.shard_tokens=3000"]

    def run(name: str, resume: bool = False) -> dict:
        return pretrain.run(tmp_path / name, preset="tiny", tokenizer=tmp_path / "tokenizer.json", data_dir=data,
                            overrides=[*flags, "--loop.max_steps=4"], resume=resume)

    whole = run("whole")
    cache = tmp_path / "whole" / "pretrain" / "shards" / "train-3000"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3 and manifest["tokenizer"] == tok.fingerprint()
    # the same run stopped after step 2: its last checkpoint is step 2's, which records the data position
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    checkpoints = tmp_path / "stopped" / "pretrain" / "checkpoints"
    shutil.rmtree(checkpoints / "step_000004")
    (checkpoints / "latest").write_text("step_000002")
    stage_state = json.loads((checkpoints / "step_000002" / "state.json").read_text())["stage"]
    assert stage_state == {"position": 2, "n_shards": len(manifest["shards"]), "n_tokens": stage_state["n_tokens"]}
    resumed = run("stopped", resume=True)
    assert resumed["val_loss"] == whole["val_loss"]
