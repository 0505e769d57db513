"""The CLI entry (scratchllm/__main__.py): a user's mistake is one line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scratchllm.__main__ import main
from scratchllm.data.sources import split_files
from scratchllm.tokenizer.bpe import Tokenizer


def test_a_bad_setting_is_one_line_and_exit_code_2() -> None:
    result = subprocess.run([sys.executable, "-m", "scratchllm", "pretrain", "--loop.log_every=0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "scratchllm pretrain: error: --loop.log_every=0 is out of range: allowed >= 1 (--debug shows the traceback)"]


def test_a_bad_model_setting_in_model_info_is_the_same_one_line(capsys) -> None:
    """`model info` used to print argparse's usage block before the error; now it goes the one way every command does."""
    assert main(["model", "info", "--model.d_model=100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["scratchllm model: error: --model.d_model=100 must be divisible by --model.n_heads=12 "
                   "(--debug shows the traceback)"]


def test_debug_shows_the_traceback() -> None:
    from scratchllm.config import ConfigError

    with pytest.raises(ConfigError, match="log_every"):
        main(["pretrain", "--loop.log_every=0", "--debug"])


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys) -> None:
    import scratchllm.train.stages.pretrain as pretrain

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt  # as the loop re-raises it after saving its checkpoint

    monkeypatch.setattr(pretrain, "main", interrupted)
    assert main(["pretrain"]) == 130
    assert capsys.readouterr().err.strip() == "scratchllm pretrain: interrupted"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(["hello world, hello text"], 256 + 4 + 4, progress=False).save(path)
    return path


def _pretrain_on(tmp_path: Path, tokenizer_file: Path, train_files: dict[str, bytes], capsys) -> tuple[int, str]:
    data = tmp_path / "data"
    for split, files in (("train", train_files), ("val", {"v.txt": b"some held-out text\n"})):
        (data / split).mkdir(parents=True)
        for name, content in files.items():
            (data / split / name).write_bytes(content)
    rc = main(["pretrain", "--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--tokenizer",
               str(tokenizer_file), "--preset", "tiny", "--loop.max_steps=1"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("content, line", [
    ("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"), 3),  # Latin-1
    (b"text\n" + bytes(range(256)) * 4, 3),  # binary: byte 10 ends line 2; 0x80 is on line 3
])
def test_undecodable_text_names_file_and_line(tmp_path: Path, tokenizer_file: Path, capsys, content, line) -> None:
    rc, err = _pretrain_on(tmp_path, tokenizer_file, {"a.txt": b"fine text\n", "b.txt": content}, capsys)
    assert rc == 2 and f"b.txt:{line}: not valid UTF-8" in err and "Traceback" not in err


def test_an_empty_text_split_names_its_files(tmp_path: Path, tokenizer_file: Path, capsys) -> None:
    rc, err = _pretrain_on(tmp_path, tokenizer_file, {"empty.txt": b""}, capsys)
    assert rc == 2 and "empty.txt: no text in any of these files" in err


def test_default_data_paths_work_outside_the_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # `scratchllm pretrain` run from another folder: corpus/ is not here
    files = split_files(Path("corpus/pretrain/train"))
    assert files and all(f.is_absolute() and f.is_file() for f in files)
    from scratchllm.data.jsonl import resolve_record_file

    assert resolve_record_file("corpus/chat/tasks_val.jsonl").is_file()
