"""Row schemas: column/role mapping gives the native rows' masks; unknown fields are counted and reported."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from sftlab.config import ConfigError, load_config
from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.types import IGNORE_INDEX
from sftlab.trainer.report import _data_section

GSM = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
DOLLY = [
    {
        "instruction": "Summarise the text.",
        "context": "The cat sat on the mat." if i % 2 else "",
        "response": f"A cat, number {i}.",
        "category": "summarization",
    }
    for i in range(6)
]
CHATS = [
    {
        "chat": [
            {"speaker": "human", "text": f"Hello {i}!"},
            {"speaker": "bot", "text": "How can I help?"},
            {"speaker": "human", "text": "Tell me a joke."},
            {"speaker": "bot", "text": "Why did the fox?"},
        ]
    }
    for i in range(4)
]


def native_gsm(r):
    return {"prompt": r["question"], "completion": r["answer"]}


def native_dolly(r):
    return {"instruction": r["instruction"], "input": r["context"], "output": r["response"]}


def native_chat(r):
    roles = {"human": "user", "bot": "assistant"}
    return {"messages": [{"role": roles[t["speaker"]], "content": t["text"]} for t in r["chat"]]}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def build(tmp_path, tokenizer, rows, name="d.jsonl", **source):
    cfg = DataConfig(train=[SourceConfig(path=str(write_jsonl(tmp_path / name, rows)), **source)])
    return build_datasets(cfg, tokenizer, seed=0)


@pytest.mark.parametrize(
    "rows,native,source",
    [
        (GSM, native_gsm, {"columns": {"prompt": "question", "completion": "answer"}}),
        (DOLLY, native_dolly, {"columns": {"input": "context", "output": "response"}}),
        (DOLLY, native_dolly, {"format": "alpaca", "columns": {"input": "context", "output": "response"}}),
        (DOLLY, native_dolly, {}),  # Dolly's own format: read natively as alpaca rows
        (
            CHATS,
            native_chat,
            {
                "columns": {"messages": "chat", "role": "speaker", "content": "text"},
                "roles": {"human": "user", "bot": "assistant"},
            },
        ),
    ],
    ids=["gsm8k", "dolly", "dolly-alpaca", "dolly-native", "chat-roles"],
)
def test_column_mapping_gives_the_same_ids_and_labels_as_native_rows(
    tmp_path, tokenizer, rows, native, source
):
    mapped, _, report = build(tmp_path, tokenizer, rows, "mapped.jsonl", **source)
    want, _, _ = build(tmp_path, tokenizer, [native(r) for r in rows], "native.jsonl")
    assert report.bad == 0 and len(mapped) == len(want) == len(rows)
    assert [(e.input_ids, e.labels) for e in mapped] == [(e.input_ids, e.labels) for e in want]
    assert all(e.num_targets > 0 for e in mapped)
    fmt = (
        "messages"
        if "roles" in source
        else source.get("format", "alpaca" if rows is DOLLY else "prompt_completion")
    )
    fmt = fmt if source else "dolly"
    assert report.sources[0].formats == {fmt: len(rows)}
    assert report.sources[0].unknown_fields == ({"category": len(rows)} if rows is DOLLY else {})
    assert report.unused_mapping == {} and "mapping entries" not in report.summary()  # every entry is used
    assert not source or report.sources[0].formats != {
        "dolly": len(rows)
    }  # a mapping reads Dolly rows as alpaca


def test_unmapped_public_rows_name_the_closest_format_and_the_mapping(tmp_path, tokenizer):
    answers = [
        {"answer" if k == "response" else k: v for k, v in r.items()} for r in DOLLY
    ]  # Dolly, misnamed
    with pytest.raises(Exception, match=r"6 of 6 rows are bad") as e:
        build(tmp_path, tokenizer, answers)
    assert "closest format: dolly, which also needs 'response'" in str(e.value)
    with pytest.raises(Exception) as e:
        build(tmp_path, tokenizer, GSM)
    assert "keys ['answer', 'question']" in str(
        e.value
    ) and "columns: {prompt: question, completion: answer}" in str(e.value)


def test_spans_are_honoured_and_an_unknown_spans_field_is_reported(tmp_path, tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    honoured, _, report = build(
        tmp_path, tokenizer, [{"text": text, "loss_masking_spans": [[0, 8]]}] * 3, "a.jsonl"
    )
    ignored, _, unknown = build(
        tmp_path, tokenizer, [{"text": text, "spans": [[0, 8]], "id": 7}] * 3, "b.jsonl"
    )
    assert honoured[0].input_ids == ignored[0].input_ids
    masked = [lab == IGNORE_INDEX for lab in honoured[0].labels]
    assert masked[0] and not masked[-1] and 0 < sum(masked) < len(masked)  # "the quick" carries no loss
    assert all(lab != IGNORE_INDEX for lab in ignored[0].labels)  # `spans` is not read: every token trained
    assert report.unknown_fields == {} and report.sources[0].formats == {"text": 3}
    assert unknown.unknown_fields == {unknown.sources[0].name: {"spans": 3, "id": 3}}
    assert (
        "warning: fields no reader of the format uses, ignored: spans (3 rows; did you mean loss_masking_spans?), "
        "id (3 rows)"
    ) in unknown.summary()
    assert unknown.sources_json()[0]["unknown_fields"] == {"spans": 3, "id": 3}
    section = "\n".join(
        _data_section({"summary": unknown.summary(), "unknown_fields": unknown.unknown_fields})
    )
    assert "`spans` (3 rows)" in section and "`id` (3 rows)" in section


def test_sharegpt_turn_keys_that_are_not_read_are_reported(tmp_path, tokenizer):
    row = {
        "conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi.", "weight": 0}],
        "source": "forum",
    }
    _, _, report = build(tmp_path, tokenizer, [row] * 2)
    assert report.sources[0].unknown_fields == {"source": 2, "conversations[].weight": 2}


def test_mapping_reaches_worker_processes_and_counts_add_up_across_chunks(tmp_path, tokenizer):
    rows = [{**GSM[i % 6], "id": i, **({"meta": "x"} if i % 3 == 0 else {})} for i in range(1100)]  # 3 chunks
    cfg = DataConfig(
        train=[
            SourceConfig(
                path=str(write_jsonl(tmp_path / "gsm.jsonl", rows)),
                columns={"prompt": "question", "completion": "answer"},
            )
        ],
        num_proc=2,
    )
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    stats = report.sources[0]
    assert report.bad == 0 and len(train) == 1100 and not stats.cached
    assert stats.formats == {"prompt_completion": 1100} and stats.unknown_fields == {"id": 1100, "meta": 367}
    _, _, again = build_datasets(cfg.model_copy(update={"num_proc": 1}), tokenizer, seed=0)
    assert again.sources[0].cached and again.sources[0].unknown_fields == stats.unknown_fields
    assert again.sources[0].formats == stats.formats


def test_a_changed_mapping_does_not_reuse_the_cache(tmp_path, tokenizer):
    rows = [{"q": "Hello!", "a": "Hi.", "b": "How can I help you today?"}] * 2
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))

    def run(columns):
        cfg = DataConfig(train=[SourceConfig(path=path, columns=columns)])
        train, _, report = build_datasets(cfg, tokenizer, seed=0)
        return train[0], report.sources[0].cached

    first, cached = run({"prompt": "q", "completion": "a"})
    second, cached2 = run({"prompt": "q", "completion": "b"})
    third, cached3 = run({"prompt": "q", "completion": "a"})
    assert (cached, cached2, cached3) == (False, False, True)
    assert second.input_ids != first.input_ids and third.input_ids == first.input_ids


@pytest.mark.parametrize(
    "source,message",
    [
        ({"format": "alpaca", "columns": {"prompt": "q"}}, "columns.prompt: not a field of format alpaca"),
        ({"columns": {"promt": "q"}}, "did you mean prompt?"),
        ({"columns": {"prompt": "q", "input": "q"}}, "'q' is mapped to prompt and input"),
        ({"roles": {"human": "usr"}}, "roles.human"),
    ],
)
def test_bad_mappings_are_config_errors(tmp_path, source, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: [{path: d.jsonl}]}\n")
    overrides = [f"data.train.0.{k}={v}" for k, v in source.items()]
    with pytest.raises(ConfigError, match="data.train.0") as e:
        load_config(cfg, [o.replace("'", "") for o in overrides])
    assert message in str(e.value)


def test_dataset_source_objects_take_a_mapping_too(tmp_path, tokenizer):
    import datasets

    from sftlab.data.dataset import DatasetSource

    source = DatasetSource(
        datasets.Dataset.from_list(GSM), "gsm", columns={"prompt": "question", "completion": "answer"}
    )
    mapped, _, report = build_datasets(DataConfig(), tokenizer, seed=0, train_sources=[source])
    want, _, _ = build(tmp_path, tokenizer, [native_gsm(r) for r in GSM])
    assert report.bad == 0 and [e.labels for e in mapped] == [e.labels for e in want]


# --- mappings that do not fit the file: the row's own keys and the fix (issue 19 item 4) -------------------

ALPACA = [
    {"instruction": f"Add one to {i}.", "input": "", "output": f"{i + 1}"} for i in range(4)
]  # alpaca_en_demo
SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"Hello {i}!"}, {"from": "gpt", "value": "Hi."}]}
    for i in range(4)
]  # FastChat's dummy_conversation / LLaMA-Factory's sharegpt demos


def test_an_entry_for_a_field_the_row_has_under_the_formats_own_name_says_to_remove_it(tmp_path, tokenizer):
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, ALPACA, columns={"output": "response"})
    msg = str(e.value)
    assert "keys ['input', 'instruction', 'output']" in msg  # the file's own names, `output` included
    assert "the row has `output` itself (the format's own name) and no `response`" in msg
    assert "the entry `output: response` reads output from response; remove it from `columns`" in msg
    assert "without the `columns` mapping, auto-detection reads the row as alpaca" in msg
    fixed, _, report = build(tmp_path, tokenizer, ALPACA, "fixed.jsonl")  # the fix it names works
    assert len(fixed) == 4 and report.bad == 0 and report.sources[0].formats == {"alpaca": 4}


def test_a_forced_format_names_the_missing_field_and_the_rows_own_keys(tmp_path, tokenizer):
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, ALPACA, format="alpaca", columns={"output": "response"})
    assert "field 'response': missing; the row's own keys: ['input', 'instruction', 'output']" in str(e.value)
    assert "remove it from `columns`" in str(e.value)


def test_sharegpt_turns_under_a_messages_mapping_name_the_entries_that_map_them(tmp_path, tokenizer):
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, SHAREGPT, columns={"messages": "conversations"})
    msg = str(e.value)
    assert "field 'conversations[0].role': missing" in msg
    assert "the turns of `conversations` have ShareGPT keys ['from', 'value'], not role/content" in msg
    fix = "columns: {messages: conversations, role: from, content: value} and roles: {human: user, gpt: assistant}"
    assert fix in msg and "auto-detection reads the row as sharegpt" in msg
    # both fixes it names read the file, to the same ids and labels
    mapped, _, report = build(
        tmp_path,
        tokenizer,
        SHAREGPT,
        "mapped.jsonl",
        columns={"messages": "conversations", "role": "from", "content": "value"},
        roles={"human": "user", "gpt": "assistant"},
    )
    native, _, auto = build(tmp_path, tokenizer, SHAREGPT, "native.jsonl")
    assert report.sources[0].formats == {"messages": 4} and auto.sources[0].formats == {"sharegpt": 4}
    assert [(x.input_ids, x.labels) for x in mapped] == [(x.input_ids, x.labels) for x in native]
    assert report.unused_mapping == {} and auto.unused_mapping == {}


def test_sharegpt_turns_under_another_name_also_suggest_reading_them_as_sharegpt(tmp_path, tokenizer):
    rows = [{"chat": r["conversations"]} for r in SHAREGPT]
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, rows, columns={"messages": "chat"})
    assert "columns: {messages: chat, role: from, content: value}" in str(e.value)
    assert "or read them as ShareGPT turns: columns: {conversations: chat}" in str(e.value)
    train, _, report = build(tmp_path, tokenizer, rows, "fixed.jsonl", columns={"conversations": "chat"})
    assert len(train) == 4 and report.sources[0].formats == {"sharegpt": 4}


def test_a_mapped_field_the_row_lacks_suggests_a_close_name_of_the_rows_own(tmp_path, tokenizer):
    rows = [{"question": r["question"], "answr": r["answer"]} for r in GSM]
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, rows, columns={"prompt": "question", "completion": "answer"})
    assert "keys ['answr', 'question']" in str(e.value)
    assert "the row has no `answer`; did you mean columns: {completion: answr}?" in str(e.value)


def test_unused_columns_and_roles_entries_are_warned_once_per_source(tmp_path, tokenizer):
    rows = [{**r, "system": "Be brief."} for r in SHAREGPT]
    source = {
        "columns": {"system": "sys", "tools": "functions"},
        "roles": {"gtp": "assistant", "human": "user"},
    }
    train, _, report = build(tmp_path, tokenizer, rows, "sg.jsonl", **source)
    name = report.sources[0].name
    assert len(train) == 4 and report.bad == 0 and name.endswith("sg.jsonl")
    want = [
        "columns: {system: sys} (no row has `sys`)",
        "columns: {tools: functions} (no row has `functions`)",
        "roles: {gtp: assistant} (no turn has the role `gtp`)",
    ]  # human: user is used
    assert report.unused_mapping == {name: want}
    warnings = [line for line in report.summary().splitlines() if "mapping entries" in line]
    assert len(warnings) == 1 and f"no row of {name} uses: " + "; ".join(want) in warnings[0]
    assert report.sources_json()[0]["unused_mapping"] == want
    section = "\n".join(_data_section({"summary": report.summary(), "unused_mapping": report.unused_mapping}))
    assert f"- {name}: " + "; ".join(want) in section
    _, _, again = build(
        tmp_path, tokenizer, rows, "sg.jsonl", **source
    )  # read from the cache: the same warning
    assert again.sources[0].cached and again.unused_mapping == {name: want}


def test_inner_key_entries_count_as_used_only_where_turns_have_them(tmp_path, tokenizer):
    _, _, report = build(
        tmp_path,
        tokenizer,
        CHATS,
        columns={"messages": "chat", "role": "speaker", "content": "text", "system": "preamble"},
        roles={"human": "user", "bot": "assistant", "narrator": "system"},
    )
    assert report.unused_mapping == {
        report.sources[0].name: [
            "columns: {system: preamble} (no row has `preamble`)",
            "roles: {narrator: system} (no turn has the role `narrator`)",
        ]
    }
