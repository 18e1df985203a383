"""Prompt datasets: the official SPO JSON, plain text, CSV/TSV, JSON lines and parquet -> ``list[str]``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PromptFileNotFoundError", "load_prompts", "SUPPORTED_SUFFIXES"]

DEFAULT_COLUMNS = ("caption", "prompt", "text")  # tried in this order when no column is named
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".parquet")


class PromptFileNotFoundError(FileNotFoundError, ValueError):
    """The prompt file does not exist (both a ``FileNotFoundError`` and a ``ValueError``)."""


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _clean(values: Iterable[Any], where: str) -> list[str]:
    """Keeps non-blank strings; missing/blank cells are skipped with a warning, non-strings are an error."""
    out: list[str] = []
    skipped = 0
    for i, v in enumerate(values):
        if _is_missing(v) or (isinstance(v, str) and not v.strip()):
            skipped += 1
            continue
        if not isinstance(v, str):
            raise ValueError(f"{where}: prompt #{i} is a {type(v).__name__} ({v!r}), expected a string")
        out.append(v)
    if skipped:
        logger.warning("%s: skipped %d blank or missing prompt(s)", where, skipped)
    if not out:
        raise ValueError(f"{where} contains no prompts")
    return out


def _pick_column(available: Sequence[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in available:
            raise ValueError(f"{where} has no column {column!r}; available columns: {list(available)}")
        return column
    for c in DEFAULT_COLUMNS:
        if c in available:
            return c
    if len(available) == 1:
        return available[0]
    raise ValueError(
        f"{where}: no column named {' / '.join(DEFAULT_COLUMNS)}; pass column= one of the available columns: "
        f"{list(available)}"
    )


def _from_records(records: list[Any], column: str | None, where: str) -> list[str]:
    if not records:
        raise ValueError(f"{where} contains no prompts (an empty list)")
    if all(isinstance(r, str) for r in records) and column is None:
        return _clean(records, where)
    if not all(isinstance(r, dict) for r in records):
        kinds = sorted({type(r).__name__ for r in records})
        raise ValueError(f"{where}: expected a list of objects (each with a 'caption') or of strings, got {kinds}")
    keys = list(dict.fromkeys(k for r in records for k in r))
    col = _pick_column(keys, column, where)
    lacking = [i for i, r in enumerate(records) if col not in r]
    if lacking:
        raise ValueError(
            f"{where}: {len(lacking)} object(s) lack {col!r} (first at index {lacking[0]}); keys seen: {keys}"
        )
    return _clean((r[col] for r in records), where)


def _load_json(path: Path, column: str | None) -> list[str]:
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if isinstance(data, dict):
        # Tolerate {"prompts": [...]}-style wrappers holding exactly one list.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{where}: expected a JSON list of prompts (the official format: [{{'caption': ...}}])")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a JSON list of prompts, got {type(data).__name__}")
    return _from_records(data, column, where)


def _load_jsonl(path: Path, column: str | None) -> list[str]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON lines (line {n}: {e.msg})") from e
    return _from_records(records, column, str(path))


def _load_text(path: Path) -> list[str]:
    return _clean((line.strip() for line in path.read_text(encoding="utf-8").splitlines()), str(path))


def _load_csv(path: Path, column: str | None, delimiter: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise ValueError(f"{path} contains no prompts (no header row)")
        col = _pick_column(reader.fieldnames, column, str(path))
        return _clean((row[col] for row in reader), str(path))


def _load_parquet(path: Path, column: str | None) -> list[str]:
    # pyarrow first (no pandas needed), pandas as a fallback (it may bring fastparquet instead).
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        names = pq.read_schema(path).names
        col = _pick_column(names, column, str(path))
        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
        return _clean(values, str(path))
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow or pandas (with a parquet engine): pip install pyarrow") from e
    try:
        df = pd.read_parquet(path)
    except ImportError as e:
        raise ImportError(f"reading {path} with pandas needs a parquet engine: pip install pyarrow") from e
    col = _pick_column([str(c) for c in df.columns], column, str(path))
    return _clean(df[col].tolist(), str(path))


def load_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Reads a prompt file into a list of non-blank strings, in file order (duplicates kept).

    Formats, by suffix:
      - ``.json``: the official SPO file, a list of objects with a ``caption`` (or ``column``); a list of strings.
      - ``.jsonl``: one such object (or string) per line.
      - ``.txt`` (or no/unknown suffix): one prompt per line, surrounding whitespace stripped, blank lines skipped.
      - ``.csv`` / ``.tsv``: a header row; ``column`` names the prompt column.
      - ``.parquet``: ``column`` names the prompt column (needs pyarrow, or pandas with a parquet engine).

    Without ``column`` the first of ``caption``, ``prompt``, ``text`` present is used (or the only column).
    Missing/blank cells are skipped with a warning.

    Raises:
        PromptFileNotFoundError: the file does not exist (a ``FileNotFoundError`` and a ``ValueError``).
        ValueError: an empty file, malformed JSON, a missing column (the available ones are listed).
        ImportError: a parquet file without pyarrow/pandas installed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a prompt file" if p.is_dir() else "does not exist"
        raise PromptFileNotFoundError(f"prompt file {str(p)!r} {what}")
    if p.stat().st_size == 0:
        raise ValueError(f"prompt file {str(p)!r} is empty")
    suffix = p.suffix.lower()
    if suffix == ".json":
        prompts = _load_json(p, column)
    elif suffix == ".jsonl":
        prompts = _load_jsonl(p, column)
    elif suffix in (".csv", ".tsv"):
        prompts = _load_csv(p, column, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        prompts = _load_parquet(p, column)
    else:
        if column is not None:
            raise ValueError(f"{p} is read as plain text (one prompt per line), which has no columns; got {column=}")
        prompts = _load_text(p)
    logger.info("loaded %d prompts from %s", len(prompts), p)
    return prompts
