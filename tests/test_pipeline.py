"""The whole pipeline at toy scale: every stage runs, every artefact and report row exists and is finite."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from scratchllm.eval.report import COMPARISON_ROWS
from scratchllm.pipeline import TOY_STEPS, main
from scratchllm.train.stages.pretrain import PretrainStage

CORPUS = Path(__file__).resolve().parents[1] / "corpus"


def test_toy_pipeline_end_to_end_and_resumes(tmp_path: Path, capsys) -> None:
    assert main(["--toy", "--runs-dir", str(tmp_path), "--name", "toy", "--corpus", str(CORPUS)]) == 0
    root = tmp_path / "toy"
    for stage in ("pretrain", "sft", "dpo", "ppo", "grpo"):
        assert (root / stage / "final" / "model.safetensors").exists(), stage
        assert (root / stage / "DONE.json").exists()
    assert (root / "reward" / "final" / "model.safetensors").exists()
    comparison = json.loads((root / "comparison.json").read_text())
    assert set(comparison) == {"pretrain", "sft", "dpo", "ppo", "grpo", "reference"}
    reference = comparison.pop("reference")
    assert 0 <= reference["pass_at_1"] <= 1 and 0 <= reference["sampled_pass_at_1"] <= 1
    for stage, row in comparison.items():
        for key in ("val_bpb", "copy_accuracy", "end_rate", "pass_at_1", "learned_reward", "gold_score", "kl_to_sft"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (stage, key)
        if stage != "pretrain":  # replies sampled at PPO's temperature: a chat policy's metric
            for key in ("learned_reward_sampled", "gold_score_sampled", "judge_pairs_sampled", "sampled_pass_at_1"):
                assert isinstance(row[key], float) and math.isfinite(row[key]), (stage, key)
            if row["judge_pairs_sampled"] > 0:  # toy replies the judge tells apart: the reward model's agreement
                assert 0 <= row["rm_judge_agreement_sampled"] <= 1, stage
        if stage != "sft":  # paired with SFT's answers on the same prompts: "+won −lost, p=…"
            chat = ("gold_sampled_vs_sft", "sampled_pass_at_1_vs_sft") if stage != "pretrain" else ()
            for key in ("pass_at_1_vs_sft", "gold_vs_sft") + chat:
                assert re.fullmatch(r"\+\d+ −\d+, p=\S+", row[key]), (stage, key, row[key])
    assert isinstance(comparison["sft"]["rm_accuracy"], float) and 0 <= comparison["sft"]["rm_accuracy"] <= 1
    for key, _, _ in COMPARISON_ROWS:  # every row: a finite number or a paired change wherever a stage has it
        present = [row[key] for row in comparison.values() if row.get(key) is not None]
        assert present, key
        assert all(math.isfinite(v) if isinstance(v, float) else re.fullmatch(r"\+\d+ −\d+, p=\S+", v) for v in present), key
    report = (root / "report.md").read_text()
    for _, label, _ in COMPARISON_ROWS:
        assert label in report
    families = {k.split("/")[1] for k in comparison["grpo"] if k.startswith("pass_at_1/")}
    assert families and all(f"| {family} |" in report for family in families)  # the per-family table
    assert (root / "pretrain_curves.png").exists() and (root / "sft_curves.png").exists()
    assert "scratchllm chat --checkpoint" in capsys.readouterr().out
    # A second invocation skips every finished stage.
    assert main(["--toy", "--runs-dir", str(tmp_path), "--name", "toy", "--corpus", str(CORPUS), "--skip-report"]) == 0
    out = capsys.readouterr().out
    assert out.count("already done, skipping") == 7


def test_rerun_continues_an_interrupted_stage_from_its_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    corpus = tmp_path / "corpus"
    for split in ("train", "val"):  # a slice of the real text keeps the toy tokenizer quick to train
        (corpus / "pretrain" / split).mkdir(parents=True)
        text = (CORPUS / "pretrain" / split / "shakespeare.txt").read_text(encoding="utf-8")[:40_000]
        (corpus / "pretrain" / split / "text.txt").write_text(text, encoding="utf-8")
    argv = ["--toy", "--runs-dir", str(tmp_path), "--name", "toy", "--corpus", str(corpus), "--only", "tokenizer,pretrain"]
    real_loss = PretrainStage.loss

    def ctrl_c_in_step_4(self, model, batch):
        if self.windows.position == 4:
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(PretrainStage, "loss", ctrl_c_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pretrain: continuing the interrupted run" in out and "at step 3" in out
    done = json.loads((tmp_path / "toy" / "pretrain" / "DONE.json").read_text())
    assert done["summary"]["steps"] == TOY_STEPS["pretrain"]
