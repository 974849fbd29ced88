"""Data files read through the `datasets` library (executor/data.py read_with_datasets) give the
rows, the row names and the errors of the built-in readers. The library is optional: the tests of
the real one skip where it is not installed; a stand-in checks the glue everywhere."""

from __future__ import annotations

import json
import sys
import types

import pytest

from executor import data
from executor.data import load_examples, read_rows
from executor.tokenizer import ByteTokenizer
from tests.executor.conftest import ALPACA, SHAREGPT


def _built_in(monkeypatch, path) -> list:
    with monkeypatch.context() as m:
        m.setattr(data, "read_with_datasets", lambda file: None)
        return read_rows(str(path))


def _stand_in(monkeypatch, built_in_rows: list, fail: bool = False) -> list:
    """A `datasets` whose load_dataset returns the rows as Arrow would: every row with every key
    of the file, None where a row lacks it."""
    calls: list = []

    def load_dataset(builder, data_files, split, cache_dir, keep_in_memory):
        calls.append((builder, data_files, split))
        if fail:
            raise ValueError("JSON parse error: Invalid value. in row 4")
        keys = {k for _, row in built_in_rows for k in row}
        return types.SimpleNamespace(to_list=lambda: [{k: row.get(k) for k in sorted(keys)} for _, row in built_in_rows])

    module = types.SimpleNamespace(load_dataset=load_dataset, disable_progress_bars=lambda: None,
                                   logging=types.SimpleNamespace(set_verbosity=lambda level: None, CRITICAL=50))
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


@pytest.mark.parametrize("path", [ALPACA, SHAREGPT], ids=["json-list", "jsonl"])
def test_rows_through_load_dataset_are_the_files_rows(monkeypatch, path):
    """The Alpaca sample has a row without "input", which load_dataset fills with None."""
    expected = _built_in(monkeypatch, path)
    calls = _stand_in(monkeypatch, expected)
    assert read_rows(str(path)) == expected
    assert calls == [("json", str(path), "train")]


def test_a_file_load_dataset_cannot_read_is_read_row_by_row(monkeypatch, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"instruction": "Say hi.", "output": "Hi."})] * 9 + ["{not json"]
    bad.write_text("\n".join(rows) + "\n")
    _stand_in(monkeypatch, [], fail=True)
    examples, report = load_examples(str(bad), ByteTokenizer(), 0.1)
    assert len(examples) == 9 and report.bad == 1 and report.first_errors[0].startswith("line 10: invalid JSON")


def _real_datasets():
    return pytest.importorskip("datasets", reason="the datasets library is not installed (pip install datasets)")


@pytest.mark.parametrize("path", [ALPACA, SHAREGPT], ids=["json-list", "jsonl"])
def test_real_datasets_reads_json_and_jsonl_as_the_built_in_readers(monkeypatch, path):
    _real_datasets()
    assert data.read_with_datasets(path) == _built_in(monkeypatch, path)


def test_real_datasets_reads_parquet_and_falls_back_on_a_malformed_line(monkeypatch, tmp_path):
    _real_datasets()
    import pyarrow
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}] * 3
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert data.read_with_datasets(tmp_path / "chat.parquet") == [(f"row {i + 1}", row) for i, row in enumerate(rows)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    assert data.read_with_datasets(bad) is None
    assert read_rows(str(bad))[1][0] == "line 2"
