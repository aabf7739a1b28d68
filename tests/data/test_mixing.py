"""Mixing by weight (fraction / count / once), seeded; eval held out of the mix or from eval sources."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.mixing import check_weight, hold_out, mix, select


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def L(selection):  # noqa: N802 - selections as plain lists, for comparisons
    return [a.tolist() for a in selection]


def test_select_rules():
    rng = random.Random(0)
    assert (
        select(10, None, rng).tolist()
        == list(range(10))
        == select(10, 1, rng).tolist()
        == select(10, 1.0, rng).tolist()
    )
    frac = select(10, 0.3, rng)
    assert len(frac) == 3 and len(set(frac)) == 3
    assert len(select(10, 0.01, rng)) == 1  # a fraction never empties a source
    many = Counter(select(4, 10, rng).tolist())
    assert sum(many.values()) == 10 and set(many) == {0, 1, 2, 3} and sorted(many.values()) == [2, 2, 3, 3]
    small = select(10, 3, rng)
    assert len(small) == 3 and len(set(small)) == 3
    assert select(0, 5, rng).tolist() == []


def test_mix_is_seeded_and_sources_are_independent():
    assert L(mix([10, 20], [0.5, 7], seed=1)) == L(mix([10, 20], [0.5, 7], seed=1))
    assert L(mix([10, 20], [0.5, 7], seed=1)) != L(mix([10, 20], [0.5, 7], seed=2))
    assert L(mix([10, 20, 5], [0.5, 7, None], seed=1))[:2] == L(mix([10, 20], [0.5, 7], seed=1))


def test_weight_validation():
    check_weight(0.5, "a")
    check_weight(3, "a")
    check_weight(3.0, "a")
    with pytest.raises(DataError, match="weight 2.5 is neither a fraction"):
        check_weight(2.5, "a")


def test_hold_out_is_disjoint_even_with_repeats():
    sel = mix([5, 3], [12, None], seed=0)
    train, evals = hold_out(sel, 0.25, seed=0)
    assert sum(map(len, evals)) == 2  # 25% of 8 distinct examples
    for s in range(2):
        assert not set(train[s].tolist()) & set(evals[s].tolist())
        assert set(train[s].tolist()) | set(evals[s].tolist()) == set(sel[s].tolist())
    again = hold_out(sel, 0.25, seed=0)
    assert (L(again[0]), L(again[1])) == (L(train), L(evals))


def rows(prefix: str, n: int) -> list[dict]:
    return [{"prompt": f"{prefix} {i}", "completion": f"{i}"} for i in range(n)]


def test_build_mixes_and_reports_per_source(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    b = write_jsonl(tmp_path / "b.jsonl", rows("Hello!", 4))
    c = write_jsonl(tmp_path / "c.jsonl", rows("Thanks", 6))
    cfg = DataConfig(
        train=[
            SourceConfig(path=str(a), weight=0.5),
            SourceConfig(path=str(b), weight=10),
            SourceConfig(path=str(c)),
        ]
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=3)
    assert len(train) == 5 + 10 + 6 and len(evals) == 0
    assert [s.used for s in report.sources] == [5, 10, 6]
    summary = report.summary()
    assert f"train[0] {a}: 10 rows, 0 bad, 10 examples -> 5 train (weight 0.5)" in summary
    assert f"train[1] {b}: 4 rows, 0 bad, 4 examples -> 10 train (weight 10)" in summary
    again, _, _ = build_datasets(cfg, tokenizer, seed=3)
    assert [e.input_ids for e in again] == [e.input_ids for e in train]
    other, _, _ = build_datasets(cfg, tokenizer, seed=4)
    assert [e.input_ids for e in other] != [e.input_ids for e in train]


def test_eval_fraction_of_the_mix(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    b = write_jsonl(tmp_path / "b.jsonl", rows("Hello!", 10))
    cfg = DataConfig(
        train=[SourceConfig(path=str(a)), SourceConfig(path=str(b), weight=0.5)], eval_fraction=0.2
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(evals) == 3 and len(train) == 12  # 20% of the 15 mixed examples
    assert not {tuple(e.input_ids) for e in evals} & {tuple(e.input_ids) for e in train}
    assert sum(s.held_out for s in report.sources) == 3 and "eval 3" in report.summary()


def test_separate_eval_sources_take_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    e = write_jsonl(tmp_path / "e.jsonl", rows("Hello!", 10))
    cfg = DataConfig(
        train=[SourceConfig(path=str(a))], eval=[SourceConfig(path=str(e), weight=4)], eval_fraction=0.5
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 10 and len(evals) == 4  # eval sources win over eval_fraction
    assert f"eval[0] {e}: 10 rows, 0 bad, 10 examples -> 4 eval (weight 4)" in report.summary()


def test_invalid_weight_fails_before_reading(tmp_path, tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "never-read.jsonl"), weight=2.5)])
    with pytest.raises(DataError, match="weight 2.5"):
        build_datasets(cfg, tokenizer, seed=0)
