"""Sources: local files and directories, save_to_disk dirs, hub names, Dataset objects; rows are located."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data import sources
from sftlab.data.dataset import DataError, DatasetSource, build_datasets
from sftlab.data.sources import open_source
from sftlab.data.types import IGNORE_INDEX

PC = [{"prompt": f"Numbers: {i}", "completion": f"{i + 1}"} for i in range(4)]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def rows_of(spec) -> list:
    return [(r.source, r.line, r.unit, r.row) for r in open_source(spec).rows()]


def build(tokenizer, *specs, **kw):
    return build_datasets(
        DataConfig(
            train=[SourceConfig(path=str(s)) if not isinstance(s, SourceConfig) else s for s in specs], **kw
        ),
        tokenizer,
        seed=0,
    )


def test_jsonl_json_array_and_json_lines(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", PC)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(PC, indent=2))
    c = write_jsonl(tmp_path / "c.json", PC)
    assert [(r[1], r[2]) for r in rows_of(SourceConfig(path=str(a)))] == [
        (1, "line"),
        (2, "line"),
        (3, "line"),
        (4, "line"),
    ]
    assert [(r[1], r[2]) for r in rows_of(SourceConfig(path=str(b)))] == [
        (1, "row"),
        (2, "row"),
        (3, "row"),
        (4, "row"),
    ]
    assert [r[3] for r in rows_of(SourceConfig(path=str(c)))] == PC


def test_parquet_and_csv(tmp_path, tokenizer):
    pq.write_table(pa.Table.from_pylist(PC), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Add one.", "input": "41", "output": "42"})  # numbers stay strings
        w.writerow({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert [r[3] for r in rows_of(SourceConfig(path=str(tmp_path / "d.parquet")))] == PC
    train, _, report = build(tokenizer, tmp_path / "d.csv")
    assert len(train) == 2 and report.bad == 0


def test_directory_reads_supported_files_sorted(tmp_path, tokenizer):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", PC[2:])
    write_jsonl(d / "a.jsonl", PC[:2])
    (d / "notes.txt").write_text("ignored")
    pq.write_table(pa.Table.from_pylist(PC), d / "c.parquet")
    got = rows_of(SourceConfig(path=str(d)))
    assert [os.path.basename(r[0]) for r in got] == ["a.jsonl"] * 2 + ["b.jsonl"] * 2 + ["c.parquet"] * 4
    train, _, report = build(tokenizer, d)
    assert len(train) == 8 and report.rows == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="directory has no .jsonl"):
        open_source(SourceConfig(path=str(empty)))


def test_bad_rows_in_columnar_sources_name_the_row(tmp_path, tokenizer):
    rows = PC[:3] + [{"prompt": "Numbers: x", "completion": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    train, _, report = build(tokenizer, tmp_path / "d.parquet")
    assert len(train) == 3 and report.bad_examples == [
        f"{tmp_path / 'd.parquet'} row 4 field 'completion': empty completion"
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tokenizer):
    datasets.Dataset.from_list(PC).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PC), "test": datasets.Dataset.from_list(PC[:1])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(build(tokenizer, tmp_path / "ds")[0]) == 4
    assert len(build(tokenizer, SourceConfig(path=str(tmp_path / "dd"), split="test"))[0]) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(has train, test\)"):
        build(tokenizer, SourceConfig(path=str(tmp_path / "dd"), split="validation"))


def test_dataset_objects_through_the_python_api(tokenizer):
    ds = datasets.Dataset.from_list([{"text": "the quick brown fox", "loss_masking_spans": [[0, 3]]}] * 3)
    named = DatasetSource(datasets.Dataset.from_list(PC), name="numbers", weight=8)
    train, _, report = build_datasets(DataConfig(), tokenizer, seed=0, train_sources=[ds, named])
    assert len(train) == 3 + 8
    assert "train[1] numbers: 4 rows, 0 bad, 4 examples -> 8 train (weight 8)" in report.summary()
    first = train[0]
    assert first.labels[0] == IGNORE_INDEX and first.input_ids[-1] == tokenizer.eos_token_id


def test_hub_name_goes_through_load_dataset(monkeypatch, tokenizer):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(PC)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    train, _, report = build(
        tokenizer, SourceConfig(path="someone/numbers", subset="small", split="validation")
    )
    assert calls == [("someone/numbers", "small", "validation")] and len(train) == 4
    assert "someone/numbers subset=small split=validation" in report.summary()


def test_hub_name_offline_fails_fast_and_names_the_source(tmp_path):
    code = (
        "from sftlab.config.schema import SourceConfig\nfrom sftlab.data.sources import open_source\n"
        "open_source(SourceConfig(path='nobody/no-such-dataset'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert (
        "DataError: data source 'nobody/no-such-dataset'" in proc.stderr
        and "Offline mode is on" in proc.stderr
    )
    assert took < 60


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="data source not found"):
        open_source(SourceConfig(path=str(tmp_path / "missing.parquet")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        open_source(SourceConfig(path=str(tmp_path / "x.txt")))
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(DataError, match="broken.json: invalid JSON array"):
        list(open_source(SourceConfig(path=str(tmp_path / "broken.json"))).rows())


def _no_hub(monkeypatch):
    def hub(*args, **kwargs):
        raise AssertionError(f"tried the hub with {args}")

    monkeypatch.setattr(sources.datasets, "load_dataset", hub)


@pytest.mark.parametrize(
    "path", ["data/gsm8k_pc.jsnol", "./data/gsm8k.jsonl", "data/gsm8k_pc", "~/no/such.jsonl", "a/b/c"]
)
def test_a_local_looking_path_never_goes_to_the_hub(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "gsm8k_pc.jsonl", PC)
    _no_hub(monkeypatch)
    with pytest.raises(DataError, match="data source not found") as e:
        open_source(SourceConfig(path=path))
    if path == "data/gsm8k_pc.jsnol":  # the typo of the issue: the file next to it is suggested
        assert str(e.value).endswith("did you mean data/gsm8k_pc.jsonl?") and str(tmp_path) in str(e.value)


def test_hub_names_still_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(
        sources.datasets,
        "load_dataset",
        lambda path, name=None, split=None: asked.append(path) or datasets.Dataset.from_list(PC),
    )
    for name in ("teknium/OpenHermes-2.5", "HuggingFaceH4/ultrachat_200k", "gsm8k"):
        open_source(SourceConfig(path=name))
    assert asked == ["teknium/OpenHermes-2.5", "HuggingFaceH4/ultrachat_200k", "gsm8k"]


def test_a_hub_failure_is_one_error_without_retry_warnings(monkeypatch, caplog):
    def failing(path, name=None, split=None):
        import logging

        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources.datasets, "load_dataset", failing)
    with pytest.raises(
        DataError, match=r"data source 'nobody/nothing': not a local file or directory, and loading"
    ):
        open_source(SourceConfig(path="nobody/nothing"))
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_a_json_object_file_is_one_error_not_one_per_line(tmp_path):
    from sftlab.data.sources import open_source
    from sftlab.data.types import DataError

    info = tmp_path / "dataset_info.json"
    info.write_text(
        json.dumps(
            {
                "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
                "identity": {"file_name": "identity.json"},
            },
            indent=2,
        )
    )
    with pytest.raises(
        DataError,
        match=r"dataset_info.json: a JSON object \(keys: alpaca_en_demo, identity\), "
        r"not an array of rows or JSON lines",
    ):
        list(open_source(SourceConfig(path=str(info))).rows())
    lines = tmp_path / "rows.json"  # JSON lines in a .json file still read line by line
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r.row for r in open_source(SourceConfig(path=str(lines))).rows()] == [
        {"text": "a"},
        {"text": "b"},
    ]


def _write_every_kind(tmp_path, rows) -> dict:
    """The same rows as each kind of source: JSONL, JSON array, Parquet, CSV, save_to_disk, Dataset object."""
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    specs = {
        k: SourceConfig(path=str(tmp_path / k)) for k in ("d.jsonl", "d.json", "d.parquet", "d.csv", "disk")
    }
    return {**specs, "object": DatasetSource(datasets.Dataset.from_list(rows), name="obj")}


def test_every_kind_of_source_cites_rows_1_based(tmp_path, tokenizer):
    """The 2nd row of a file is line 2 of JSONL and row 2 of anything else: in bad rows, in the over-length
    error and in what `prepare --show` prints (`where_token`)."""
    rows = [
        PC[0],
        {"prompt": "Numbers: x", "completion": ""},
        {"prompt": "Numbers: " + "one " * 200, "completion": "2"},
    ]
    want = {
        "d.jsonl": ":2",
        "d.json": " row 2",
        "d.parquet": " row 2",
        "d.csv": " row 2",
        "disk": " row 2",
        "object": " row 2",
    }
    for key, spec in _write_every_kind(tmp_path, rows).items():
        name = "obj" if key == "object" else str(tmp_path / key)
        train, _, report = build_datasets(
            DataConfig(max_seq_length=64, on_overlength="drop"), tokenizer, seed=0, train_sources=[spec]
        )
        assert report.bad_examples == [f"{name}{want[key]} field 'completion': empty completion"], key
        assert report.source_data[0].where_token(0) == name + want[key].replace("2", "1"), (
            key
        )  # --show's place
        with pytest.raises(
            DataError, match=rf"^{re.escape(name + want[key].replace('2', '3'))}: \d+ tokens exceed"
        ):
            build_datasets(
                DataConfig(max_seq_length=64, on_overlength="error"), tokenizer, seed=0, train_sources=[spec]
            )


def test_an_unreadable_table_names_the_last_row_read_1_based(tmp_path, monkeypatch):
    pq.write_table(pa.Table.from_pylist(PC), tmp_path / "d.parquet")
    real = sources._batches

    def broken(path):
        yield from real(path)
        raise pa.ArrowInvalid("truncated file")

    monkeypatch.setattr(sources, "_batches", broken)
    with pytest.raises(DataError, match=r"cannot read it as PARQUET \(after row 4\): truncated file"):
        list(open_source(SourceConfig(path=str(tmp_path / "d.parquet"))).rows())


def test_iter_jsonl_reads_lines_and_names_bad_ones(tmp_path):
    """JSONL parsing lives with the sources (data/sources.py): a BOM is tolerated, blank lines skipped, and an
    undecodable or invalid line comes back as a BadRecord naming its line."""
    from sftlab.data.sources import iter_jsonl
    from sftlab.data.types import BadRecord

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": \n\xff\n{"text": "b"}\n')
    got = list(iter_jsonl(path))
    assert [n for n, _ in got] == [1, 3, 4, 5] and got[0][1] == {"text": "a"} and got[3][1] == {"text": "b"}
    assert isinstance(got[1][1], BadRecord) and "invalid JSON" in got[1][1].reason
    assert isinstance(got[2][1], BadRecord) and "not valid UTF-8" in got[2][1].reason
