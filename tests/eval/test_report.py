"""The markdown report renders what it says: table cells keep special tokens such as <|im_end|> visible."""

from __future__ import annotations

import re

from scratchllm.eval.report import comparison_table


def test_comparison_table_escapes_pipes_and_angle_brackets() -> None:
    table = comparison_table({"sft": {"end_rate": 0.5}, "grpo": {"end_rate": 0.75}})
    bars = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
    assert len(bars) == 1, table  # a bare | inside <|im_end|> would split the cell and drop the rest
    assert "<" not in table and ">" not in table  # <…> may be read as an HTML tag and hidden
    assert r"&lt;\|im_end\|&gt;" in table


def test_before_after_table_reads_each_stages_first_and_last_evaluation(tmp_path) -> None:
    import json

    from scratchllm.eval.report import before_after_table

    rows = [{"step": 0, "split": "eval", "pass_at_1": 0.1, "pass_at_1/add": 0.0},
            {"step": 5, "split": "train", "loss": 1.0},
            {"step": 40, "split": "eval", "pass_at_1": 0.25, "pass_at_1/add": 0.5}]
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = before_after_table(tmp_path, ["grpo", "ppo"])  # ppo has no metrics: left out
    assert table.splitlines()[2:] == ["| grpo | pass_at_1 | 0.100 | 0.250 |"]  # per-family keys stay in the jsonl


def test_family_table_puts_each_familys_pass_at_1_beside_the_reference() -> None:
    from scratchllm.eval.report import family_table

    comparison = {"sft": {"pass_at_1": 0.2, "pass_at_1/add": 0.1, "pass_at_1/sort": 0.3},
                  "grpo": {"pass_at_1": 0.3, "pass_at_1/add": 0.5, "pass_at_1/sort": 0.1},
                  "reference": {"pass_at_1": 0.1, "pass_at_1/add": 0.05, "pass_at_1/sort": 0.0}}
    assert family_table(comparison).splitlines() == [
        "| family | sft | grpo | reference |", "|---|---:|---:|---:|",
        "| add | 0.100 | 0.500 | 0.050 |", "| sort | 0.300 | 0.100 | 0.000 |"]
    assert family_table({"sft": {"pass_at_1": 0.2}}) == ""  # no per-family numbers, no table
