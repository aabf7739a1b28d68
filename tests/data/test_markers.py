"""Response/instruction templates on text rows: which characters and tokens carry loss, bad rows, cache key."""

from __future__ import annotations

import re

import datasets
import pytest
from conftest import write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.markers import TextMarkers, no_loss_spans
from sftlab.data.records import BadRecord, to_record
from sftlab.data.sources import DatasetSource
from sftlab.data.types import IGNORE_INDEX

Q, A = "### Question:", " ### Answer:"
ONE = "### Question: What is 2+2?\n ### Answer: 4"
MULTI = "### Question: What is 2+2?\n ### Answer: 4\n### Question: And 3+3?\n ### Answer: six"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_DATA_CACHE", str(tmp_path / "cache"))


def end_of(text: str, marker: str, nth: int = 0) -> int:
    """The inclusive end of the nth occurrence of `marker` in `text`."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(marker, at + 1)
    return at + len(marker) - 1


def targets(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


# --- the character spans ------------------------------------------------------------------------


def test_single_turn_masks_through_the_response_marker():
    spans = no_loss_spans(ONE, TextMarkers(A))
    assert spans == [(0, end_of(ONE, A))] and ONE[spans[0][1] + 1 :] == " 4"


def test_without_instruction_marker_the_last_response_marker_counts_as_in_trl():
    text = "Example: 1+1? ### Answer: 2\nNow: 2+2? ### Answer: 4"
    assert no_loss_spans(text, TextMarkers(A)) == [(0, end_of(text, A, nth=1))]


def test_multi_turn_trains_each_answer_up_to_the_next_instruction():
    spans = no_loss_spans(MULTI, TextMarkers(A, Q))
    second_q = MULTI.index(Q, 1)
    assert spans == [(0, end_of(MULTI, A)), (second_q, end_of(MULTI, A, nth=1))]
    trained = [MULTI[a + 1 : b] for (_, a), (b, _) in zip(spans, spans[1:] + [(len(MULTI), 0)])]
    assert trained == [" 4\n", " six"]


def test_a_row_without_an_instruction_marker_is_single_turn_and_a_response_marker_in_an_answer_is_trained():
    assert no_loss_spans(ONE.replace(Q, "Q:"), TextMarkers(A, Q)) == [(0, end_of(ONE.replace(Q, "Q:"), A))]
    text = ONE + " (the ### Answer: marker again)"
    assert no_loss_spans(text, TextMarkers(A, Q)) == [(0, end_of(text, A))]


def test_nested_markers_prefer_the_longer_one_where_both_start():
    text = "User: hi\nUser said: ok\nBot: yes"  # the instruction `User` is a prefix of `User said:`
    assert no_loss_spans(text, TextMarkers("User said:", "User")) == [(0, end_of(text, "User said:"))]
    assert no_loss_spans(text, TextMarkers("Bot:", "User")) == [(0, end_of(text, "Bot:"))]


@pytest.mark.parametrize(
    "text,markers,reason",
    [
        (
            "### Question: hi\n ### Reply: yo",
            TextMarkers(A),
            "no ' ### Answer:' (the response template) in the text",
        ),
        ("### Question: hi\n ### Reply: yo", TextMarkers(A, Q), "no ' ### Answer:' (the response template)"),
        (
            ONE + "\n### Question: and?",
            TextMarkers(A, Q),
            f"the instruction template '### Question:' at character {len(ONE) + 1} has no response template",
        ),
    ],
)
def test_unusable_texts_say_why(text, markers, reason):
    with pytest.raises(ValueError, match="^" + re.escape(reason)):
        no_loss_spans(text, markers)


def test_markers_are_checked():
    with pytest.raises(ValueError, match="response_template must be a non-empty"):
        TextMarkers("")
    with pytest.raises(ValueError, match="different from response_template"):
        TextMarkers(A, A)


def test_records_union_the_marker_spans_with_explicit_spans():
    row = {"text": ONE, "loss_masking_spans": [[len(ONE) - 1, len(ONE) - 1]]}
    rec = to_record(row, "auto", "s.jsonl", 4, markers=TextMarkers(A))
    assert rec.spans == [(0, end_of(ONE, A)), (len(ONE) - 1, len(ONE) - 1)]
    with pytest.raises(BadRecord) as e:
        to_record({"text": "no marker"}, "text", "s.jsonl", 4, markers=TextMarkers(A))
    assert str(e.value) == "s.jsonl:4 field 'text': no ' ### Answer:' (the response template) in the text"
    chat = to_record({"prompt": "x", "completion": "y"}, "auto", "s.jsonl", 4, markers=TextMarkers(A))
    assert chat.format == "prompt_completion"  # chat rows keep loss_on's masks


# --- through the pipeline: tokens marked exactly as explicit spans mark them ---------------------


def test_marked_tokens_equal_those_of_explicit_spans(tmp_path, tokenizer):
    explicit = [
        {"text": ONE, "loss_masking_spans": [[0, end_of(ONE, A)]]},
        {
            "text": MULTI,
            "loss_masking_spans": [[0, end_of(MULTI, A)], [MULTI.index(Q, 1), end_of(MULTI, A, 1)]],
        },
    ]
    plain = write_jsonl(
        tmp_path / "plain.jsonl", [{"text": ONE}, {"text": MULTI}, {"text": "no marker here"}]
    )
    spans = write_jsonl(tmp_path / "spans.jsonl", explicit)
    marked, _, report = build_datasets(
        DataConfig(
            train=[SourceConfig(path=str(plain))],
            response_template=A,
            instruction_template=Q,
            max_bad_fraction=0.5,
        ),
        tokenizer,
        seed=0,
    )
    want, _, _ = build_datasets(DataConfig(train=[SourceConfig(path=str(spans))]), tokenizer, seed=0)
    got = sorted((e.input_ids, e.labels) for e in marked)
    assert got == sorted((e.input_ids, e.labels) for e in want)
    assert sorted(targets(tokenizer, e) for e in marked) == [" 4\n six<|im_end|>", " 4<|im_end|>"]
    assert report.bad == 1 and report.bad_examples == [
        f"{plain}:3 field 'text': no ' ### Answer:' (the response template) in the text"
    ]


def test_a_turn_without_an_answer_is_a_bad_row_and_error_mode_stops(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": MULTI}, {"text": ONE + "\n### Question: and?"}])
    cfg = DataConfig(train=[SourceConfig(path=str(path))], response_template=A, instruction_template=Q)
    (ex,), _, report = build_datasets(cfg, tokenizer, seed=0)
    assert targets(tokenizer, ex) == " 4\n six<|im_end|>"
    assert report.bad_examples == [
        f"{path}:2 field 'text': the instruction template '### Question:' at character "
        f"{len(ONE) + 1} has no response template ' ### Answer:' after it (a turn without "
        "an answer)"
    ]
    with pytest.raises(DataError, match=r"d.jsonl:2 field 'text': the instruction template"):
        build_datasets(cfg.model_copy(update={"on_bad_record": "error"}), tokenizer, seed=0)


def test_a_source_can_set_its_own_markers(tmp_path, tokenizer):
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"text": "Q: hi\nA: yo"}])
    theirs = write_jsonl(tmp_path / "theirs.jsonl", [{"text": ONE}])
    cfg = DataConfig(
        train=[SourceConfig(path=str(mine), response_template="A:"), SourceConfig(path=str(theirs))],
        response_template=A,
    )
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    assert report.bad == 0 and sorted(targets(tokenizer, e) for e in train) == [
        " 4<|im_end|>",
        " yo<|im_end|>",
    ]
    assert not any(s.markers_unused for s in report.sources)


def test_markers_on_a_source_of_chat_rows_are_reported_unused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "What is 2+2?", "completion": "4"}])
    (ex,), _, report = build_datasets(
        DataConfig(train=[SourceConfig(path=str(path))], response_template=A), tokenizer, seed=0
    )
    assert targets(tokenizer, ex).startswith("4")  # loss_on's mask, untouched
    assert report.sources[0].details()[-1] == (
        "warning: response_template ' ### Answer:' is set, but no row of this source is a text row: the markers "
        "apply to text rows only (chat rows use data.loss_on; docs/data.md)"
    )
    assert "response_template ' ### Answer:' is set" in report.summary()


def test_a_formatting_function_returning_text_gets_the_markers(tokenizer):
    ds = datasets.Dataset.from_list([{"q": "What is 2+2?", "a": "4"}, {"q": "And 3+3?", "a": "six"}])
    fmt = lambda r: f"### Question: {r['q']}\n ### Answer: {r['a']}"
    train, _, report = build_datasets(
        DataConfig(response_template=A), tokenizer, seed=0, train_sources=[ds], formatting_func=fmt
    )
    assert report.bad == 0 and sorted(targets(tokenizer, e) for e in train) == [
        " 4<|im_end|>",
        " six<|im_end|>",
    ]
    named = DatasetSource(ds, name="own", response_template="?\n")  # a DatasetSource's own marker
    (first, second), _, _ = build_datasets(
        DataConfig(), tokenizer, seed=0, train_sources=[named], formatting_func=fmt
    )
    assert (
        targets(tokenizer, first) + targets(tokenizer, second)
        == " ### Answer: 4<|im_end|> ### Answer: six<|im_end|>"
    )


def test_the_markers_are_part_of_the_cache_key(tmp_path, tokenizer, calls):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": MULTI}])
    cfg = lambda **kw: DataConfig(train=[SourceConfig(path=str(path))], **kw)
    runs = [
        cfg(response_template=A),
        cfg(response_template=A),
        cfg(response_template=A, instruction_template=Q),
        cfg(response_template=" ### Answer: "),
        cfg(),
    ]
    seen = []
    for c in runs:
        (ex,), _, report = build_datasets(c, tokenizer, seed=0)
        seen.append((calls["n"], report.sources[0].cached, targets(tokenizer, ex)))
    assert seen == [
        (1, False, " six<|im_end|>"),
        (1, True, " six<|im_end|>"),
        (2, False, " 4\n six<|im_end|>"),
        (3, False, "ix<|im_end|>"),  # the marker's last space is in the token " s": it gets no loss
        (4, False, MULTI + "<|im_end|>"),
    ]
