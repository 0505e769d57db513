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


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    assert main(["--toy", "--runs-dir", str(runs), "--name", "toy", "--corpus", str(CORPUS)]) == 0
    return runs


def test_toy_pipeline_twice_gives_the_same_comparison_and_weights(toy_run: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(123)  # whatever ran before must not matter: every stage seeds itself
    assert main(["--toy", "--runs-dir", str(tmp_path), "--name", "again", "--corpus", str(CORPUS)]) == 0
    first, second = (json.loads((root / "comparison.json").read_text()) for root in (toy_run / "toy", tmp_path / "again"))
    assert first == second
    for stage in ("pretrain", "sft", "grpo"):
        a, b = (load_file(str(root / stage / "final" / "model.safetensors")) for root in (toy_run / "toy", tmp_path / "again"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_toy_pipeline_end_to_end_and_resumes(toy_run: Path, capsys) -> None:
    tmp_path = toy_run
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
    assert "scratchllm chat --checkpoint" in report
    speed = json.loads((root / "speed.json").read_text())
    assert speed["reference_step_s"] > 0
    assert "## Cost" in report and f"One reference step took {speed['reference_step_s']:.3f} s" in report
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "report"):
        assert re.search(rf"\| {stage} \| [\d—]+ \| [\d.]+ \| \d+ \|", report), stage
    assert re.search(r"Evaluation and overhead: \d+% of the run's time", report)
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


def test_overrides_reach_every_stage_that_has_the_section_and_no_other() -> None:
    from scratchllm.pipeline import PipelineError, route_overrides

    routed = route_overrides(["--loop.seed=3", "--model.d_model=64", "--sft.eval_tasks=5", "--grpo.loop.max_steps=9",
                              "--data.chat_rows=2"])
    assert all("--loop.seed=3" in routed[stage] for stage in routed)  # every training stage has a loop
    assert routed["pretrain"] == ["--loop.seed=3", "--model.d_model=64", "--data.chat_rows=2"]
    assert routed["sft"] == ["--loop.seed=3", "--sft.eval_tasks=5"]
    assert routed["grpo"] == ["--loop.seed=3", "--loop.max_steps=9"]  # one stage's loop only
    assert "--loop.max_steps=9" not in routed["ppo"]
    for bad, reason in (("--nosuch.key=1", "no stage has a 'nosuch' section"),
                        ("--sft.model.d_model=8", "the sft stage has no 'model' section"),
                        ("--sft", "overrides look like")):
        with pytest.raises(PipelineError, match=reason):
            route_overrides([bad])


def test_unknown_override_section_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    assert main(["--toy", "--runs-dir", str(tmp_path), "--corpus", str(CORPUS), "--nosuch.key=1"]) == 2
    assert "no stage has a 'nosuch' section" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


def test_reference_step_is_measured_without_touching_the_callers_random_state() -> None:
    import torch

    from scratchllm.train.reference_step import measure_reference_step

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seconds = measure_reference_step(steps=1, warmup=1)
    assert seconds > 0 and torch.equal(torch.rand(3), expected)


def test_changed_data_under_the_same_names_makes_finished_stages_stale(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    for split in ("train", "val"):
        (corpus / "pretrain" / split).mkdir(parents=True)
        text = (CORPUS / "pretrain" / split / "shakespeare.txt").read_text(encoding="utf-8")[:20_000]
        (corpus / "pretrain" / split / "text.txt").write_text(text, encoding="utf-8")
    argv = ["--toy", "--runs-dir", str(tmp_path), "--name", "toy", "--corpus", str(corpus), "--only", "tokenizer"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert "tokenizer: already done" in capsys.readouterr().out
    path = corpus / "pretrain" / "train" / "text.txt"
    path.write_text(path.read_text(encoding="utf-8").replace("the", "thy"), encoding="utf-8")  # same name, new bytes
    assert main(argv) == 0
    assert "already done" not in capsys.readouterr().out
