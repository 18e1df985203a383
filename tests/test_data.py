"""Prompt files: every format, the clear errors, and the official 4k training prompts when present."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from spo_fast.data import PromptFileNotFoundError, load_prompts

PROMPTS = ["a cat driving a nuke", 'she waits, "three ways"', "a dog\twith a hat"]


def _official_file() -> Path | None:
    # tests/ -> repo root -> its parent holds shared/ in the team checkout; also look beside the repo root.
    here = Path(__file__).resolve()
    for root in (here.parents[2], here.parents[1]):
        f = root / "shared" / "data" / "4k_training_prompts.json"
        if f.is_file():
            return f
    return None


def test_official_json_format(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"caption": p, "trainset_idx": i} for i, p in enumerate(PROMPTS)]))
    assert load_prompts(f) == PROMPTS
    assert load_prompts(f, column="caption") == PROMPTS


def test_json_list_of_strings_and_jsonl(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PROMPTS))
    assert load_prompts(f) == PROMPTS
    g = tmp_path / "p.jsonl"
    g.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n\n")
    assert load_prompts(g) == PROMPTS


def test_text_skips_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n   \n  a dog  \r\na bird")
    assert load_prompts(f) == ["a cat", "a dog", "a bird"]


def test_csv_and_tsv_named_column(tmp_path):
    import csv

    f = tmp_path / "p.csv"
    with f.open("w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["id", "text_prompt"])
        w.writerows([[i, p] for i, p in enumerate(PROMPTS)] + [[9, ""]])
    assert load_prompts(f, column="text_prompt") == PROMPTS
    g = tmp_path / "p.tsv"
    g.write_text("prompt\tscore\na cat\t1\na dog\t2\n")
    assert load_prompts(g) == ["a cat", "a dog"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (parquet support is optional)")
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "caption": PROMPTS}), f)
    assert load_prompts(f) == PROMPTS
    with pytest.raises(ValueError, match=r"available columns: \['id', 'caption'\]"):
        load_prompts(f, column="prompt")


def test_parquet_without_backends_says_what_to_install(tmp_path, monkeypatch):
    f = tmp_path / "p.parquet"
    f.write_bytes(b"PAR1 not really parquet")
    real_import = builtins.__import__

    def no_parquet(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_parquet)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompts(f)


def test_errors(tmp_path):
    with pytest.raises(PromptFileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="does not exist"):  # also a ValueError
        load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(blank)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"caption": "a cat"},')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(bad)
    nocap = tmp_path / "nocap.json"
    nocap.write_text(json.dumps([{"caption": "a cat"}]))
    with pytest.raises(ValueError, match=r"no column 'prompt'; available columns: \['caption'\]"):
        load_prompts(nocap, column="prompt")
    csvf = tmp_path / "p.csv"
    csvf.write_text("id,text_a,text_b\n1,a,b\n")
    with pytest.raises(ValueError, match=r"available columns: \['id', 'text_a', 'text_b'\]"):
        load_prompts(csvf)
    with pytest.raises(ValueError, match="no column 'caption'"):
        load_prompts(csvf, column="caption")
    empty_list = tmp_path / "e.json"
    empty_list.write_text("[]")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty_list)
    numbers = tmp_path / "n.json"
    numbers.write_text(json.dumps([{"caption": 3}]))
    with pytest.raises(ValueError, match="prompt #0 is a int"):
        load_prompts(numbers)


def test_official_4k_training_prompts():
    f = _official_file()
    if f is None:
        pytest.skip("shared/data/4k_training_prompts.json not found beside the repository (team checkout only)")
    prompts = load_prompts(f)
    assert len(prompts) == 4000
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert prompts[0] == "a cat driving a nuke"
