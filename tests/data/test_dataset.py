"""Reading sources: formats, bad rows (named by file:line and field), length policy, eval split."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from sftlab.config import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.masking import IGNORE_INDEX

GOOD = {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}]}


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=str(path))], **kw)


def test_bad_rows_are_skipped_counted_and_located(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        GOOD,
        '{"messages": [{"role": "user", "content": "hi"}',  # line 2: invalid JSON
        {"messages": [{"role": "user", "content": "no answer"}]},  # line 3: no assistant turn
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # line 4
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},  # line 5
        GOOD,
        {"prompt": "Numbers: one", "completion": "two"},
    ] * 2)
    train, evals, report = build_datasets(cfg_for(path, max_bad_fraction=0.6), tokenizer, seed=0)
    assert len(train) == 6 and report.bad == 8 and report.rows == 14
    text = "\n".join(report.bad_examples)
    assert f"{path}:2: invalid JSON" in text
    assert f"{path}:3 field 'messages': no assistant turn" in text
    assert f"{path}:4 field 'messages[0].role': unknown role 'wizard'" in text
    assert f"{path}:5 field 'messages[0].content': must be a string" in text


def test_on_bad_record_error_stops_with_location(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json"])
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        build_datasets(cfg_for(path, on_bad_record="error"), tokenizer, seed=0)


def test_non_utf8_line_is_reported(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    train, _, report = build_datasets(cfg_for(path), tokenizer, seed=0)
    assert len(train) == 1 and "d.jsonl:2: not valid UTF-8" in report.bad_examples[0]


def test_too_many_bad_rows_fails_before_training(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + ["{"] * 3)
    with pytest.raises(DataError, match="3 of 4 rows are bad"):
        build_datasets(cfg_for(path, max_bad_fraction=0.5), tokenizer, seed=0)


def test_missing_source(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        build_datasets(cfg_for(tmp_path / "nope.jsonl"), tokenizer, seed=0)


def test_prompt_completion_labels_only_completion(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Numbers: one two", "completion": "three four"}])
    (ex,), _, _ = build_datasets(cfg_for(path), tokenizer, seed=0)
    target = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target) == "three four<|im_end|>"


def test_length_policy_is_never_silent(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "one two three " * 40}, {"role": "assistant", "content": "four"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    train, _, report = build_datasets(cfg_for(path, max_seq_length=128), tokenizer, seed=0)
    assert len(train) == 1 and report.overlength_dropped == 1 and "dropped" in report.summary()
    with pytest.raises(DataError, match="exceed data.max_seq_length=128"):
        build_datasets(cfg_for(path, max_seq_length=128, on_overlength="error"), tokenizer, seed=0)
    # truncation keeps the start; this one loses its only target tokens, so it is dropped and counted
    train, _, report = build_datasets(cfg_for(path, max_seq_length=128, on_overlength="truncate"), tokenizer, seed=0)
    assert len(train) == 1 and report.no_target_after_truncation == 1


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"Numbers: {i}", "completion": f"{i + 1}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a_train, a_eval, _ = build_datasets(cfg_for(path, eval_fraction=0.25), tokenizer, seed=7)
    b_train, b_eval, _ = build_datasets(cfg_for(path, eval_fraction=0.25), tokenizer, seed=7)
    assert len(a_eval) == 5 and len(a_train) == 15
    assert [e.input_ids for e in a_eval] == [e.input_ids for e in b_eval]
    assert not {tuple(e.input_ids) for e in a_eval} & {tuple(e.input_ids) for e in a_train}
