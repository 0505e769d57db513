"""The bundled pretraining corpus: valid, bilingual, split cleanly, free of boilerplate."""

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "pretrain"


def _docs(split: str) -> dict[str, list[str]]:
    return {p.stem: p.read_text(encoding="utf-8").split("\n\n\n") for p in sorted((CORPUS / split).glob("*.txt"))}


def _cjk(text: str) -> int:
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_same_sources_in_both_splits() -> None:
    assert sorted(_docs("train")) == sorted(_docs("val")) != []


def test_train_and_val_are_disjoint_documents() -> None:
    train, val = _docs("train"), _docs("val")
    for name in train:
        overlap = set(d.strip() for d in train[name]) & set(d.strip() for d in val[name])
        assert not overlap, f"{name}: {len(overlap)} documents in both splits"


@pytest.mark.parametrize("split", ["train", "val"])
def test_both_languages_present(split: str) -> None:
    text = "".join("".join(d) for d in _docs(split).values())
    ascii_letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    assert _cjk(text) > 0.2 * len(text) / 3  # Chinese: a real share, not a sprinkle
    assert ascii_letters > 0.2 * len(text)


def test_size_in_band_and_no_boilerplate() -> None:
    total = sum(p.stat().st_size for p in CORPUS.rglob("*.txt"))
    assert 8e6 < total < 14e6
    for path in CORPUS.rglob("*.txt"):
        text = path.read_text(encoding="utf-8")  # raises on invalid UTF-8
        assert "Project Gutenberg" not in text and "\r" not in text and "\x1b" not in text
