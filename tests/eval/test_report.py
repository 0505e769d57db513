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
