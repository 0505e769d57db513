"""Data files as users have them: .txt, .jsonl and .parquet, a file or a folder, read as a stream of rows.

Sits under data/shards.py (pretraining text) and data/jsonl.py (chat, preference and task records). Parquet is
read with pyarrow, a batch of rows at a time, so a file larger than memory streams. Every bad row names its file
and 1-based row (= line for .jsonl), and nothing is dropped without a count on stderr.
`data_fingerprint` hashes the files' bytes: a cache or a "done" marker keyed on it notices changed data.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from scratchllm.errors import UserError
from scratchllm.runtime import bundled

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
RECORD_SUFFIXES = (".jsonl", ".parquet")
DOC_SEPARATOR = "\n\n\n"  # corpus/README.md: documents in a .txt file are separated by three newlines
PARQUET_BATCH_ROWS = 1024


class DataFormatError(UserError, ValueError):
    """A data file or record is malformed; the message names file:row, the field and the fix."""


def split_documents(text: str) -> list[str]:
    return [doc.strip("\n") for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def iter_documents(path: Path, chunk_chars: int = 1 << 24) -> Iterator[str]:
    """The documents of one text file, read `chunk_chars` characters at a time (a file may exceed memory)."""
    pending = ""
    with path.open(encoding="utf-8") as f:
        while True:
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as err:  # Latin-1 or binary data: name the file and line, not just a byte
                raise DataFormatError(f"{path}:{_first_undecodable_line(path)}: not valid UTF-8 ({err.reason}); "
                                      "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not chunk:
                break
            docs = (pending + chunk).split(DOC_SEPARATOR)
            pending = docs.pop()  # may continue in the next chunk
            yield from (doc.strip("\n") for doc in docs if doc.strip())
    if pending.strip():
        yield pending.strip("\n")


def _first_undecodable_line(path: Path) -> int:
    """1-based number of the first line of `path` that is not UTF-8 (only called once decoding has failed)."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1  # only if the file changed since the failed read


def data_files(path: Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """`path` itself if it is a file, else its files with these suffixes in name order (not recursive)."""
    path = bundled(path)
    if path.is_file():
        if path.suffix not in suffixes:
            raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(suffixes)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        if not files:
            raise DataFormatError(f"{path}: no {'/'.join(suffixes)} files in this folder")
        return files
    raise DataFormatError(f"{path}: no such file or folder")


def split_files(split: Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """The files of one split: the folder `split/` (e.g. corpus/pretrain/train/), else one file `split.<suffix>`
    beside it (e.g. my_data/train.parquet)."""
    split = bundled(split)
    if split.is_dir():
        return data_files(split, suffixes)
    candidates = [split.with_name(split.name + suffix) for suffix in suffixes]
    found = [c for c in candidates if c.is_file()]
    if len(found) > 1:
        raise DataFormatError(f"{split}: both {found[0].name} and {found[1].name} exist; keep one, so which "
                              "data trained the model is never ambiguous")
    if not found:
        raise DataFormatError(f"{split}: no folder {split.name}/ and no file {' / '.join(c.name for c in candidates)}")
    return found


def data_fingerprint(paths: Iterable[Path]) -> str:
    """Hash of data files' names and bytes, in the given order; a folder stands for every .txt/.jsonl/.parquet
    file below it (recursively, by relative path), so `data_fingerprint([Path("corpus")])` covers a whole corpus.

    Reading every byte costs about a second per GB; it is what tells a cache built from other data (same file
    names, new content) from the current one, which size and modification time cannot promise.
    """
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_dir():
            named = sorted((f.relative_to(path).as_posix(), f) for f in path.rglob("*")
                           if f.is_file() and f.suffix in TEXT_SUFFIXES)
        else:
            named = [(path.name, path)]
        for name, file in named:
            digest.update(name.encode() + b"\0")
            with file.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay its import time

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants; name the file either way
        raise DataFormatError(f"{path}: not a readable Parquet file ({err})") from None
    if columns is not None:
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise DataFormatError(f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def iter_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based row, record, problem) for every row of a .jsonl or .parquet file; problem is None for a readable
    row. Blank .jsonl lines are not rows. `columns` limits what Parquet reads (streaming a wide file)."""
    path = Path(path)
    if path.suffix == ".parquet":
        for row, record in enumerate(_parquet_rows(path, columns), start=1):
            yield row, record, None
        return
    if path.suffix != ".jsonl":
        raise DataFormatError(f"{path}: records are read from .jsonl or .parquet files, not {path.suffix!r}")
    with path.open("rb") as f:
        for row, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield row, None, f"not valid UTF-8 (byte {err.start}); save the file as UTF-8"
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield row, None, f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
                continue
            if not isinstance(record, dict):
                yield row, None, f"each line must be a JSON object, got a {type(record).__name__}"
                continue
            yield row, record, None


def iter_text_documents(path: Path) -> Iterator[str]:
    """Pretraining documents of one file: .txt split on DOC_SEPARATOR; .jsonl / .parquet one `text` per row.

    A row's text is trimmed of leading and trailing newlines as a .txt document is, so the same documents give
    the same tokens in any of the three formats. Empty texts are skipped and counted on stderr.
    """
    path = Path(path)
    if path.suffix == ".txt":
        yield from iter_documents(path)
        return
    empty: list[int] = []
    for row, record, problem in iter_rows(path, columns=["text"]):
        if problem is None and "text" not in record:
            problem = "missing key 'text'; each line must look like {\"text\": \"...\"}"
        elif problem is None and not isinstance(record["text"], str):
            problem = f"'text' is a {type(record['text']).__name__}; it must be a string"
        if problem:
            raise DataFormatError(f"{path}:{row}: {problem}")
        if not record["text"].strip():
            empty.append(row)
            continue
        yield record["text"].strip("\n")
    if empty:
        print(f"warning: {path}: skipped {len(empty)} empty 'text' row(s), first at row {empty[0]}", file=sys.stderr)


def text_prefix(path: Path, n_bytes: int) -> str:
    """About the first `n_bytes` bytes of a file's documents (0 = all), joined by DOC_SEPARATOR: the sample a
    tokenizer trains on, for .jsonl / .parquet as for .txt (whose raw prefix it is)."""
    path = Path(path)
    if path.suffix == ".txt":
        data = path.read_bytes()
        return (data[:n_bytes] if n_bytes > 0 else data).decode("utf-8", errors="ignore")
    docs, size = [], 0
    for doc in iter_text_documents(path):
        docs.append(doc)
        size += len(doc.encode()) + len(DOC_SEPARATOR)
        if 0 < n_bytes <= size:
            break
    return DOC_SEPARATOR.join(docs)
