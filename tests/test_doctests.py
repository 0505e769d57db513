"""Docstring examples are tests: every `>>>` example in the package runs and prints what it shows.

Only modules whose source holds `>>>` are imported, so a module with heavy or optional imports and no example
costs nothing here.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_with_examples() -> list[str]:
    paths = sorted((ROOT / "scratchllm").rglob("*.py"))
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in paths
            if ">>>" in p.read_text(encoding="utf-8")]


MODULES = modules_with_examples()


def test_some_module_has_examples() -> None:
    assert "scratchllm.tokenizer.bpe" in MODULES  # the worked BPE example; an empty list would test nothing


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} mentions >>> but doctest found no example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (output above)"
