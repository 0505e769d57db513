"""The documentation stays true to the code: links resolve, code references name real symbols, commands run.

Checked files: README.md, README.zh-CN.md, docs/*.md and docs/experiments/*.md. Conventions (also stated in docs/README.md):

- A code reference is a link to a .py file whose text is the repository path in backticks, followed by one or
  more backticked symbols: [`scratchllm/model/layers.py`](scratchllm/model/layers.py) `Attention.forward`, `apply_rope`.
  Each symbol must be defined in that file (module-level def / class / assignment, `Class.member`, `self.attr`
  set in a method), found with `ast`, so nothing is imported.
- A fenced block opened with ```` ```bash runnable ```` holds commands that run here from the repository root,
  one per line, at toy scale: each must exit 0 within RUN_TIMEOUT_S.
- `--section.key` config overrides name a real dataclass field; every `--flag` of a `scratchllm <command>` line
  in a bash block appears in that command's `--help`.
- README.md and README.zh-CN.md keep the same headings, the same commands and the same numbers; each README's
  folder map names every folder of the package, and the package tree of docs/layout.md lists every tracked file.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "README.zh-CN.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "docs" / "experiments").glob("*.md")])
RUN_TIMEOUT_S = 120

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
SYMBOL = r"`[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*`"
CODE_REF = re.compile(r"\[`([^`\]]+\.py)`\]\(([^)\s]+\.py)\)(?P<symbols>(?:\s*,?\s*" + SYMBOL + r")+)")
OVERRIDE = re.compile(r"--(model|loop|optim|lora|sft|reward|dpo|ppo|grpo|distill)\.([A-Za-z_]\w*)")
SCRATCHLLM_CALL = re.compile(r"(?:^|[\s/])scratchllm\s+([a-z][\w-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*(?:\.\w+)?")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, 1-based line of the first content line, content lines) for every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"\s*(```|~~~)(.*)$", lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match.group(1), match.group(2).strip(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append((info, start + 1, lines[start:i]))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked out (they hold no links)."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"\s*(```|~~~)", line):
            inside = not inside
            out.append("")
            continue
        out.append("" if inside else line)
    return "\n".join(out)


def commands(lines: list[str]) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, blank and comment lines dropped."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


@cache
def defined_symbols(path: Path) -> frozenset[str]:
    """Names a code reference may use: top-level defs/classes/assignments, nested members, self.attr in methods."""
    names: set[str] = set()

    def targets(node: ast.AST) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return node.targets
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            return [node.target]
        return []

    def visit(body: list[ast.stmt], prefix: str, owner: str | None) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                is_class = isinstance(node, ast.ClassDef)
                visit(node.body, prefix + node.name + ".", node.name if is_class else owner)
                if not is_class and owner is not None:  # self.x = ... inside a method defines Owner.x
                    for sub in ast.walk(node):
                        for target in targets(sub):
                            for attr in ast.walk(target):  # also `self.a, self.b = ...`
                                if isinstance(attr, ast.Attribute) and isinstance(attr.value, ast.Name) \
                                        and attr.value.id == "self":
                                    names.add(f"{owner}.{attr.attr}")
            for target in targets(node):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names.add(prefix + name.id)
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for attr in ("body", "orelse", "finalbody"):
                    visit(getattr(node, attr, []), prefix, owner)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, prefix, owner)

    visit(ast.parse(path.read_text(encoding="utf-8")).body, "", None)
    return frozenset(names)


def doc_ids(paths: list[Path]) -> list[str]:
    return [rel(p) for p in paths]


# ---- 1. links ------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
def test_relative_links_point_at_existing_files_and_headings(doc: Path) -> None:
    broken = []
    for lineno, line in enumerate(prose(doc.read_text(encoding="utf-8")).splitlines(), 1):
        for match in LINK.finditer(re.sub(r"`[^`]*`(?!\])", "", line)):
            target = match.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if not path.exists():
                broken.append(f"{rel(doc)}:{lineno}: {target} -> no such file {path}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{rel(doc)}:{lineno}: {target} -> no heading #{anchor} in {rel(path)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checked_files_exist_and_link_to_each_other() -> None:
    english, chinese = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert "](README.zh-CN.md)" in english.split("\n## ")[0], "README.md must link README.zh-CN.md near the top"
    assert "](README.md)" in chinese.split("\n## ")[0], "README.zh-CN.md must link README.md near the top"
    assert len(DOCS) > 3


# ---- 2. code references ------------------------------------------------------------------------------
def code_references() -> list[tuple[str, int, str, str, Path]]:
    """(doc, line, link text, symbol, resolved file) for every code reference in the checked files."""
    refs = []
    for doc in DOCS:
        text = prose(doc.read_text(encoding="utf-8"))
        for match in CODE_REF.finditer(text):
            lineno = text.count("\n", 0, match.start()) + 1
            for symbol in re.findall(SYMBOL, match.group("symbols")):
                refs.append((rel(doc), lineno, match.group(1), symbol.strip("`"), (doc.parent / match.group(2)).resolve()))
    return refs


def test_code_references_name_symbols_that_exist() -> None:
    refs = code_references()
    assert len(refs) > 50, "the docs should reference the code they explain"
    problems = []
    for doc, lineno, text, symbol, path in refs:
        if not path.is_file():
            problems.append(f"{doc}:{lineno}: {text} does not exist")
        elif path != (ROOT / text).resolve():
            problems.append(f"{doc}:{lineno}: link text {text} and target {rel(path)} differ")
        elif symbol not in defined_symbols(path):
            problems.append(f"{doc}:{lineno}: {text} defines no `{symbol}`")
    assert not problems, "stale code references:\n" + "\n".join(problems)


def test_symbol_finder_knows_the_shapes_docs_use() -> None:
    layers = defined_symbols(ROOT / "scratchllm/model/layers.py")
    assert {"Attention", "Attention.forward", "apply_rope", "Attention.use_sdpa", "Attention.n_kv_heads"} <= layers
    assert "Attention.no_such_method" not in layers
    assert "ModelConfig.n_kv_heads" in defined_symbols(ROOT / "scratchllm/config.py")


# ---- 3. runnable commands ----------------------------------------------------------------------------
def runnable_commands() -> list[tuple[str, str]]:
    """(where, command) for each distinct command in a `bash runnable` block; a repeat runs once."""
    out: dict[str, str] = {}
    for doc in DOCS:
        for info, lineno, lines in fenced_blocks(doc.read_text(encoding="utf-8")):
            if info.split()[:1] == ["bash"] and "runnable" in info.split()[1:]:
                for cmd in commands(lines):
                    out[cmd] = f"{out[cmd]}, {rel(doc)}:{lineno}" if cmd in out else f"{rel(doc)}:{lineno}"
    return [(where, cmd) for cmd, where in out.items()]


RUNNABLE = runnable_commands()


def test_docs_mark_some_commands_runnable() -> None:
    assert any("README.md" in where for where, _ in RUNNABLE)
    assert any("README.zh-CN.md" in where for where, _ in RUNNABLE)
    assert len(RUNNABLE) >= 5


@pytest.mark.parametrize("where, command", RUNNABLE, ids=[f"{w}: {c[:40]}" for w, c in RUNNABLE])
def test_runnable_command_exits_0(where: str, command: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"{where}: `{command}` exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


# ---- flags and overrides -----------------------------------------------------------------------------
def config_fields() -> dict[str, set[str]]:
    from dataclasses import fields

    from scratchllm import config

    classes = {"model": config.ModelConfig, "loop": config.LoopConfig, "optim": config.OptimConfig,
               "lora": config.LoRAConfig, "sft": config.SFTConfig, "reward": config.RewardConfig,
               "dpo": config.DPOConfig, "ppo": config.PPOConfig, "grpo": config.GRPOConfig,
               "distill": config.DistillConfig}
    return {section: {f.name for f in fields(cls)} for section, cls in classes.items()}


def test_config_overrides_in_docs_name_real_fields() -> None:
    valid = config_fields()
    problems = []
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for section, key in OVERRIDE.findall(line):
                if key not in valid[section]:
                    problems.append(f"{rel(doc)}:{lineno}: --{section}.{key} is not a field of the {section} config")
    assert not problems, "\n".join(problems)


@cache
def help_text(command: str) -> str:
    from scratchllm.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        try:
            main([command, "--help"])
        except ImportError:  # a command whose module is missing has no flags to show
            return ""
    return out.getvalue()


def test_flags_of_scratchllm_commands_in_docs_exist() -> None:
    problems, checked = [], 0
    for doc in DOCS:
        for info, lineno, lines in fenced_blocks(doc.read_text(encoding="utf-8")):
            if info.split()[:1] != ["bash"]:
                continue
            for cmd in commands(lines):
                call = SCRATCHLLM_CALL.search(cmd.split(" #")[0])
                if not call:
                    continue
                command, rest = call.groups()
                text = help_text(command)
                if not text.strip():
                    problems.append(f"{rel(doc)}:{lineno}: `scratchllm {command}` is not a command with --help")
                    continue
                for flag in FLAG.findall(rest):
                    checked += 1
                    if "." in flag:
                        continue  # --section.key overrides: checked against the config dataclasses
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                        problems.append(f"{rel(doc)}:{lineno}: `scratchllm {command}` has no {flag}")
    assert checked > 20
    assert not problems, "\n".join(problems)


# ---- README in step: zh-CN and the package tree ------------------------------------------------------
def headings(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^(#{1,6})\s", prose(text), re.MULTILINE)]


def numbers(text: str) -> Counter[str]:
    return Counter(re.findall(r"\d+(?:[.,]\d+)*", text))


def bash_commands(text: str) -> list[str]:
    return [c.split(" #")[0].rstrip() for info, _, lines in fenced_blocks(text) if info.split()[:1] == ["bash"]
            for c in commands(lines)]


def test_chinese_readme_keeps_step_with_english() -> None:
    english, chinese = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert headings(chinese) == headings(english), "README.zh-CN.md must have the same sections as README.md"
    assert bash_commands(chinese) == bash_commands(english), "README.zh-CN.md must show the same commands"
    only_en, only_zh = numbers(english) - numbers(chinese), numbers(chinese) - numbers(english)
    assert not only_en and not only_zh, f"numbers differ: only in README.md {dict(only_en)}, only in zh-CN {dict(only_zh)}"


def package_files() -> list[str]:
    """Tracked files of scratchllm/ (relative to it), without empty __init__.py files."""
    try:
        listed = subprocess.run(["git", "ls-files", "scratchllm"], cwd=ROOT, capture_output=True, text=True, check=True)
        paths = [Path(p) for p in listed.stdout.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: take what is on disk
        paths = [p.relative_to(ROOT) for p in (ROOT / "scratchllm").rglob("*") if p.is_file()]
    return sorted(str(p.relative_to("scratchllm")) for p in paths
                  if p.name != "__init__.py" and "__pycache__" not in p.parts and (ROOT / p).exists())


def tree_entries(text: str) -> tuple[list[str], list[str]]:
    """(top-level entries, entries under scratchllm/) of the first code block with a `scratchllm/` line."""
    for _, _, lines in fenced_blocks(text):
        if "scratchllm/" in [line.split(" ")[0] for line in lines]:
            top = [line.split()[0] for line in lines if line.strip() and not line.startswith(" ")]
            inner = [line.split()[0] for line in lines if line.startswith("  ") and line.strip()]
            return top, inner
    raise AssertionError("no package tree (a code block with a `scratchllm/` line) found")


def test_layout_tree_lists_every_file_and_nothing_else() -> None:
    top, inner = tree_entries((ROOT / "docs/layout.md").read_text(encoding="utf-8"))
    missing = [f for f in package_files() if f not in inner]
    assert not missing, f"docs/layout.md: add these files to the package tree with a one-line purpose: {missing}"
    gone = [e for e in inner if not (ROOT / "scratchllm" / e).exists()]
    gone += [e for e in top if not (ROOT / e).exists()]
    assert not gone, f"docs/layout.md: the package tree names paths that do not exist: {gone}"


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_readme_folder_map_names_every_package_folder(readme: str) -> None:
    top, inner = tree_entries((ROOT / readme).read_text(encoding="utf-8"))
    folders = sorted({f.split("/")[0] + "/" for f in package_files() if "/" in f})
    missing = [f for f in folders if f not in inner]
    assert not missing, f"{readme}: add these folders of the package to the map with a one-line purpose: {missing}"
    gone = [e for e in inner if not (ROOT / "scratchllm" / e).exists()]
    gone += [e for e in top if not (ROOT / e).exists()]
    assert not gone, f"{readme}: the folder map names paths that do not exist: {gone}"
