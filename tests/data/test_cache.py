"""The tokenized-data cache: hits skip tokenization, keys follow content/tokenizer/template/config, safe files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONVERSATIONS, build_tokenizer, write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.store import ArrayWriter

ROWS = [{"messages": c} for c in CONVERSATIONS] * 3 + [
    {"text": "the quick brown fox", "loss_masking_spans": [[4, 8]]},
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"messages": [{"role": "user", "content": "no answer"}]},  # bad: no assistant turn
]


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", ROWS)


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"


def cfg_for(path, cache_dir, **kw) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=str(path))], cache_dir=str(cache_dir), **kw)


def ids(examples):
    return [(e.input_ids, e.labels) for e in examples]


def test_second_run_skips_tokenization(data_file, cache_dir, calls, tokenizer):
    first, _, r1 = build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    assert calls["n"] == 1 and not r1.sources[0].cached
    second, _, r2 = build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    assert calls["n"] == 1 and r2.sources[0].cached and "(cached)" in r2.summary()
    assert ids(second) == ids(first)
    assert (
        (r2.rows, r2.bad, r2.bad_examples) == (r1.rows, r1.bad, r1.bad_examples) == (12, 1, r1.bad_examples)
    )
    assert "d.jsonl:12 field 'messages': no assistant turn" in r2.bad_examples[0]
    # what is applied after the cache does not invalidate it, and cached examples keep their line numbers
    build_datasets(cfg_for(data_file, cache_dir, max_seq_length=64, eval_fraction=0.2), tokenizer, seed=5)
    with pytest.raises(DataError, match=r"d.jsonl:1: \d+ tokens exceed data.max_seq_length=8"):
        build_datasets(
            cfg_for(data_file, cache_dir, max_seq_length=8, on_overlength="error"), tokenizer, seed=0
        )
    assert calls["n"] == 1


@pytest.mark.parametrize("change", ["content", "loss_on", "template", "tokenizer", "format"])
def test_key_follows_what_changes_tokens(change, data_file, cache_dir, calls, tokenizer, tmp_path):
    build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    cfg, tok = cfg_for(data_file, cache_dir), tokenizer
    if change == "content":
        write_jsonl(data_file, ROWS[:-1])
    elif change == "loss_on":
        cfg = cfg_for(data_file, cache_dir, loss_on="last_assistant")
    elif change == "template":
        tpl = tmp_path / "t.jinja"
        tpl.write_text(tokenizer.chat_template.replace("helpful", "useful"))
        cfg = cfg_for(data_file, cache_dir, chat_template=str(tpl))
    elif change == "tokenizer":
        tok = build_tokenizer()
        tok.add_tokens(["<extra>"])
    else:
        cfg = DataConfig(
            train=[SourceConfig(path=str(data_file), format="messages")], cache_dir=str(cache_dir)
        )
    build_datasets(cfg, tok, seed=0)
    assert calls["n"] == 2


def test_cache_files_are_safe_and_complete(data_file, cache_dir, tokenizer):
    train, _, _ = build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    (entry,) = [p for p in cache_dir.iterdir()]
    assert not entry.name.startswith(".tmp")
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [
            "arrays.json",
            "meta.json",
            "ids.bin",
            "targets.bin",
            "offsets.bin",
            "lines.bin",
            "files.bin",
            "fix_pos.bin",
            "fix_val.bin",
        ]
    )
    flat = np.fromfile(entry / "ids.bin", dtype=np.uint16)  # the tiny vocabulary fits 16 bits
    offsets = np.fromfile(entry / "offsets.bin", dtype=np.int64)
    assert offsets[-1] == len(flat) == sum(len(e.input_ids) for e in train)
    assert (entry / "targets.bin").stat().st_size == len(flat)  # one byte per token, not a second id copy
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["rows"] == 12 and meta["bad"] == 1 and meta["key"]["loss_on"] == "assistant"


def test_interrupted_write_leaves_nothing(data_file, cache_dir, calls, tokenizer, monkeypatch):
    real_append = ArrayWriter.append
    state = {"n": 0}

    def failing_append(self, *args, **kwargs):
        state["n"] += 1
        if state["n"] == 3:
            raise OSError("disk full")
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(ArrayWriter, "append", failing_append)
    good, _, _ = build_datasets(
        cfg_for(data_file, cache_dir), tokenizer, seed=0
    )  # a failed write is not fatal
    assert list(cache_dir.iterdir()) == []  # no entry, no temporary directory
    monkeypatch.setattr(ArrayWriter, "append", real_append)
    assert ids(build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)[0]) == ids(good)


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "meta"])
def test_corrupted_entries_are_detected_and_rebuilt(damage, data_file, cache_dir, calls, tokenizer, caplog):
    good = ids(build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)[0])  # read before the damage
    (entry,) = list(cache_dir.iterdir())
    ids_file = entry / "ids.bin"
    data = bytearray(ids_file.read_bytes())
    if damage == "truncate":
        ids_file.write_bytes(bytes(data[:-2]))
    elif damage == "flip":  # same size, one bit of one token changed
        data[len(data) // 2] ^= 0x01
        ids_file.write_bytes(bytes(data))
    elif damage == "extend":
        ids_file.write_bytes(bytes(data) + b"\0\0")
    else:
        (entry / "arrays.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        again, _, report = build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    assert calls["n"] == 2 and not report.sources[0].cached
    assert ids(again) == good
    assert any("rebuilding" in r.message for r in caplog.records)
    _, _, third = build_datasets(
        cfg_for(data_file, cache_dir), tokenizer, seed=0
    )  # the rebuilt entry is good
    assert third.sources[0].cached and calls["n"] == 2


def test_cache_off_and_default_location(data_file, tmp_path, calls, tokenizer, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "env-cache"))
    build_datasets(DataConfig(train=[SourceConfig(path=str(data_file))], cache=False), tokenizer, seed=0)
    assert not (tmp_path / "env-cache").exists()
    build_datasets(DataConfig(train=[SourceConfig(path=str(data_file))]), tokenizer, seed=0)
    assert len(list((tmp_path / "env-cache" / "data").iterdir())) == 1 and calls["n"] == 2


def test_error_mode_still_fails_on_a_cached_bad_row(data_file, cache_dir, tokenizer):
    build_datasets(cfg_for(data_file, cache_dir), tokenizer, seed=0)
    with pytest.raises(DataError, match=r"d.jsonl:12 field 'messages': no assistant turn"):
        build_datasets(cfg_for(data_file, cache_dir, on_bad_record="error"), tokenizer, seed=0)


def test_worker_processes_give_the_same_examples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", ROWS * 20)
    one, _, r1 = build_datasets(cfg_for(path, tmp_path / "c1", num_proc=1, cache=False), tokenizer, seed=0)
    two, _, r2 = build_datasets(cfg_for(path, tmp_path / "c2", num_proc=2, cache=False), tokenizer, seed=0)
    assert ids(one) == ids(two) and r1.bad_examples == r2.bad_examples and r2.bad == 20
