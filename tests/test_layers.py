"""Imports point one way, in the order data flows (docs/layout.md): a module may import its own layer and the
layers below it, never one above. Every import counts, including those inside functions, since a lazy import
hides a cycle rather than removing it.

Worked example: `scratchllm.data.batches` (data) may import `scratchllm.tokenizer.bpe` (below) and
`scratchllm.runtime` (the base everyone may use), but not `scratchllm.train.distributed` (above).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scratchllm"

# Lowest first. A module belongs to the layer of the longest prefix that names it, so the CLIs and the server
# inside infer/ and eval/ sit with the other programs, above what they run.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("scratchllm", "scratchllm.config", "scratchllm.errors", "scratchllm.runtime")),
    ("tokenizer", ("scratchllm.tokenizer",)),
    ("data", ("scratchllm.data",)),
    ("model", ("scratchllm.model",)),
    ("infer", ("scratchllm.infer",)),  # the generation engine: RL rollouts and evaluation both generate
    ("eval", ("scratchllm.eval",)),  # measuring functions: stages evaluate themselves with them
    ("train", ("scratchllm.train",)),
    ("programs", ("scratchllm.export", "scratchllm.infer.server", "scratchllm.infer.chat_cli",
                  "scratchllm.infer.generate_cli", "scratchllm.eval.compare", "scratchllm.eval.report",
                  "scratchllm.eval.tasks_cli")),
    ("pipeline", ("scratchllm.pipeline",)),
    ("entry", ("scratchllm.__main__",)),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module` (a module or anything inside it)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import scratchllm...` / `from scratchllm... import x` in the file, at any depth.

    `from scratchllm.train import distributed` imports the module `scratchllm.train.distributed`; both name the
    train layer, so the package name is enough to judge it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "scratchllm" or name.startswith("scratchllm.")]
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for line, target in imported_modules(path):
            if layer_of(target) > layer_of(here):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {LAYERS[layer_of(here)][0]} layer "
                                f"imports {target} ({LAYERS[layer_of(target)][0]} layer)")
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    problems = upward_imports()
    assert not problems, "imports that point up the layers (docs/layout.md):\n" + "\n".join(problems)


@pytest.mark.parametrize(("module", "layer"), [
    ("scratchllm.runtime", "base"), ("scratchllm.data.rewards", "data"), ("scratchllm.infer.engine", "infer"),
    ("scratchllm.infer.generate_cli", "programs"), ("scratchllm.eval.chat_eval", "eval"),
    ("scratchllm.eval.compare", "programs"), ("scratchllm.train.stages.ppo", "train"), ("scratchllm", "base"),
])
def test_a_module_takes_the_layer_of_its_longest_prefix(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from scratchllm.train import distributed as dist\n    import scratchllm.eval.metrics\n")
    assert imported_modules(source) == [(2, "scratchllm.train"), (3, "scratchllm.eval.metrics")]
