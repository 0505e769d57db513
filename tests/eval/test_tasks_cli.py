"""`scratchllm eval-tasks`: per-family pass@1 of several checkpoints and each one's paired change against the first."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scratchllm.config import model_preset
from scratchllm.eval import tasks_cli
from scratchllm.eval.significance import paired_change
from scratchllm.model.gpt import GPT
from scratchllm.model.io import save_model
from scratchllm.tokenizer.bpe import Tokenizer

CHAT = Path(__file__).resolve().parents[2] / "corpus" / "chat"


def test_table_and_paired_comparison_agree_with_the_per_task_scores(tmp_path: Path, capsys) -> None:
    data = tmp_path / "chat"
    data.mkdir()
    for name in ("tasks_train", "tasks_val"):
        (data / f"{name}.jsonl").write_text((CHAT / f"{name}.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    tok = Tokenizer.train(["What is 3 + 4? The answer is 7. 你好 " * 40], vocab_size=256 + 30 + 4, progress=False)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_model(tmp_path / f"m{seed}", GPT(model_preset("tiny", vocab_size=tok.vocab_size)), tok, {}))
    out_json = tmp_path / "eval.json"
    argv = [str(p) for p in paths] + ["--data", str(data), "--limit", "24", "--max-new-tokens", "4", "--json", str(out_json)]
    assert tasks_cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    first, second = (saved["scores"][str(p)] for p in paths)
    assert len(first) == len(saved["tasks"]) == 24
    assert f"| all | 24 | {sum(first) / 24:.3f} | {sum(second) / 24:.3f} |" in printed
    expected = paired_change(first, second)
    assert saved["vs_first"][str(paths[1])] == {"won": expected.won, "lost": expected.lost, "p_value": expected.p_value}
    assert f"(2) vs (1): {expected.describe()}" in printed


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert tasks_cli.main([str(tmp_path / "nope"), "--data", str(CHAT)]) == 2
    assert "not a model directory" in capsys.readouterr().out
