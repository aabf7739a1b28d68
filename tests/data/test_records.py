"""A row becomes a record (records.py): format detection and conversion, precise BadRecords (source, line/row,
field, reason); a source's column/role mapping gives the native rows' masks, and unknown fields are counted
and reported.
"""

from __future__ import annotations

import pickle

import pytest
from conftest import write_jsonl

from sftlab.config import ConfigError, load_config
from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.records import (
    READERS,
    ColumnMap,
    Conversation,
    TextRecord,
    TokenRecord,
    detect_format,
    to_record,
)
from sftlab.data.types import IGNORE_INDEX, BadRecord
from sftlab.trainer.report import _data_section


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


U = {"role": "user", "content": "Hello!"}
A = {"role": "assistant", "content": "Hi."}


def rec(row, fmt="auto", **kw):
    return to_record(row, fmt, "src.jsonl", 3, **kw)


def bad(row, fmt="auto", **kw) -> BadRecord:
    with pytest.raises(BadRecord) as e:
        rec(row, fmt, **kw)
    return e.value


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": [U, A]}, "messages"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "sharegpt"),
        ({"prompt": "x", "completion": "y"}, "prompt_completion"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"instruction": "x", "context": "", "response": "y", "category": "open_qa"}, "dolly"),
        (
            {"instruction": "x", "output": "y", "response": "z"},
            "alpaca",
        ),  # the first format in ROW_FORMATS order
        ({"input_ids": [1, 2]}, "pretokenized"),
        ({"text": "abc"}, "text"),
        ({"messages": None, "text": "abc"}, "text"),  # columnar sources pad absent fields with None
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_messages_multi_turn_with_tools_and_tool_role():
    tools = [{"type": "function", "function": {"name": "f"}}]
    msgs = [
        {"role": "system", "content": "s"},
        U,
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "42"},
        A,
    ]
    c = rec({"messages": msgs, "tools": tools})
    assert isinstance(c, Conversation) and [m["role"] for m in c.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert c.tools == tools and "content" not in c.messages[2]


def test_prompt_completion_strings_and_message_lists():
    c = rec({"prompt": "Q", "completion": "A"})
    assert c.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    c = rec({"prompt": [{"role": "system", "content": "s"}, U], "completion": [A]})
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"]


def test_alpaca_joins_instruction_and_input():
    c = rec({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert c.messages == [
        {"role": "user", "content": "Translate.\n\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    ]
    c = rec({"instruction": "Say hi.", "input": "", "output": "Hi", "system": "Be brief."})
    assert c.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi"},
    ]
    assert rec({"instruction": "Say hi.", "output": "Hi"}).messages[0]["content"] == "Say hi."


def test_sharegpt_roles():
    row = {
        "system": "sys",
        "tools": '[{"name": "f"}]',
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "f"}'},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "a"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ],
    }
    c = rec(row)
    assert [m["role"] for m in c.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert c.tools == [{"type": "function", "function": {"name": "f"}}]  # a bare schema, wrapped
    assert c.messages[2] == {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
    }
    e = bad({"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert e.field_name == "conversations[0].from" and "unknown role 'alien'" in e.reason
    e = bad({"conversations": [{"from": "human", "value": "q"}]})
    assert e.field_name == "conversations" and "no assistant turn" in e.reason


def sharegpt_call(value, before=("human", "q")):
    return {
        "conversations": [
            {"from": before[0], "value": before[1]},
            {"from": "function_call", "value": value},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "a"},
        ]
    }


CALL = {"type": "function", "function": {"name": "area", "arguments": {"shape": "circle", "r": [4]}}}


@pytest.mark.parametrize(
    "value",
    [
        '{"name": "area", "arguments": {"shape": "circle", "r": [4]}}',  # glaive / LLaMA-Factory
        '{"name": "area", "arguments": "{\\"shape\\": \\"circle\\", \\"r\\": [4]}"}',  # arguments as a JSON string
        '{"name": "area", "parameters": {"shape": "circle", "r": [4]}}',  # Llama's key
        '{"type": "function", "function": {"name": "area", "arguments": {"shape": "circle", "r": [4]}}}',  # OpenAI's
    ],
)
def test_sharegpt_function_call_becomes_tool_calls(value):
    c = rec(sharegpt_call(value))
    assert c.messages[1] == {"role": "assistant", "tool_calls": [CALL]}
    assert c.messages[2] == {"role": "tool", "content": "42"}


def test_sharegpt_function_calls_join_the_assistant_turn_before_them():
    c = rec(sharegpt_call('[{"name": "area", "arguments": {"shape": "circle", "r": [4]}}, {"name": "b"}]'))
    assert c.messages[1]["tool_calls"] == [
        CALL,
        {"type": "function", "function": {"name": "b", "arguments": {}}},
    ]
    row = sharegpt_call('{"name": "area", "arguments": {"shape": "circle", "r": [4]}}')
    row["conversations"].insert(1, {"from": "gpt", "value": "Let me compute it."})
    c = rec(row)  # text then a call: one assistant turn that says something and calls
    assert [m["role"] for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1] == {"role": "assistant", "content": "Let me compute it.", "tool_calls": [CALL]}
    row["conversations"].insert(1, {"from": "function_call", "value": '{"name": "b"}'})
    c = rec(row)  # a call, text, a call: text joins no earlier call, the second call joins the text
    assert [len(m.get("tool_calls", [])) for m in c.messages] == [0, 1, 1, 0, 0]


@pytest.mark.parametrize(
    "value,why",
    [
        ("calculate_area(5, 3)", "this is not JSON: Expecting value (column 1)"),
        ('{"arguments": {}}', "call 0: expected an object"),
        ("[]", "empty list of calls"),
        ('{"name": "f", "arguments": "{oops"}', "call 0: `arguments` is a string that is not JSON"),
        ('{"name": "f", "arguments": [1, 2]}', "call 0: `arguments` must be an object"),
    ],
)
def test_bad_function_call_names_the_turn_value(value, why):
    e = bad(sharegpt_call(value))
    assert e.field_name == "conversations[1].value" and why in e.reason
    assert str(e).startswith("src.jsonl:3 field 'conversations[1].value'")


def test_text_with_spans():
    t = rec({"text": "abcdef", "loss_masking_spans": [[3, 5], [0, 1]]})
    assert isinstance(t, TextRecord) and t.spans == [(0, 1), (3, 5)]


@pytest.mark.parametrize(
    "spans,why",
    [
        ([[0, 6]], "out of range"),
        ([[4, 2]], "out of range"),
        ([[-1, 2]], "out of range"),
        ([[1]], "pair of integers"),
        ([["a", 2]], "pair of integers"),
        ([[True, 2]], "pair of integers"),
    ],
)
def test_bad_spans_name_the_field(spans, why):
    e = bad({"text": "abcdef", "loss_masking_spans": spans})
    assert e.field_name == "loss_masking_spans[0]" and why in e.reason
    assert str(e).startswith("src.jsonl:3 field 'loss_masking_spans[0]'")


def test_pretokenized_validation():
    t = rec({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, vocab_size=10)
    assert isinstance(t, TokenRecord) and t.labels == [-100, 2, 3]
    assert rec({"input_ids": [1, 2]}).labels == [1, 2]
    assert bad({"input_ids": [1, 2, 30]}, vocab_size=10).field_name == "input_ids[2]"
    assert "outside the vocabulary" in bad({"input_ids": [1, -5]}, vocab_size=10).reason
    assert bad({"input_ids": [1, "2"]}).field_name == "input_ids[1]"
    assert bad({"input_ids": [1, 2], "labels": [1]}).field_name == "labels"
    assert bad({"input_ids": [1, 2], "labels": [1, 99]}, vocab_size=10).field_name == "labels[1]"
    assert bad({"input_ids": []}).reason == "empty"


@pytest.mark.parametrize(
    "row,field,reason",
    [
        ({"messages": [{"content": "x"}, A]}, "messages[0].role", "missing"),
        ({"messages": [{"role": "user", "content": ""}, A]}, "messages[0].content", "empty user message"),
        (
            {"messages": [U, {"role": "assistant", "content": " "}]},
            "messages[1].content",
            "empty assistant message",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": 5}]},
            "messages[1].content",
            "must be a string or a list of content parts",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": ["x"]}]},
            "messages[1].content[0]",
            "must be a content part",
        ),
        ({"messages": "hi"}, "messages", "non-empty list"),
        ({"prompt": 5, "completion": "y"}, "prompt", "must be str or list"),
        ({"instruction": "x", "output": ""}, "output", "empty"),
        ({"instruction": "x", "input": 3, "output": "y"}, "input", "must be str"),
        ({"text": 5}, "text", "must be str"),
        ({"foo": 1}, None, "cannot detect the row format"),
    ],
)
def test_bad_rows(row, field, reason):
    e = bad(row)
    assert e.field_name == field and reason in e.reason


def test_explicit_format_overrides_detection():
    assert bad({"text": "abc"}, "messages").field_name == "messages"
    assert isinstance(rec({"messages": [U, A], "text": "abc"}, "text"), TextRecord)


def test_row_unit_and_pickling():
    e = BadRecord("d.parquet", 7, "text", "empty", unit="row")
    assert str(e) == "d.parquet row 7 field 'text': empty"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


@pytest.mark.parametrize(
    "row,says",
    [
        ({"instruction": "x", "answer": "y"}, "closest format: alpaca, which also needs 'output'"),
        (
            {"instruction": "x", "context": "c", "answer": "y"},
            "closest format: dolly, which also needs 'response'",
        ),
        ({"prompt": "x", "answer": "y"}, "closest format: prompt_completion, which also needs 'completion'"),
        ({"question": "x", "answer": "y"}, "map them in the source's `columns`"),
    ],
)
def test_a_row_fitting_no_format_names_the_closest_one_and_what_it_lacks(row, says):
    err = bad(row)
    assert says in err.reason and "cannot detect the row format from its keys" in err.reason


def test_records_carry_their_format_and_the_fields_no_reader_uses():
    r = rec({"text": "abc", "spans": [[0, 1]], "id": None})  # null fields are absent, not unknown
    assert (r.format, r.unknown, r.spans) == ("text", ("spans",), [])
    r = rec({"messages": [U, A], "id": 3, "tools": None})
    assert (r.format, r.unknown) == ("messages", ("id",))


def test_mapped_fields_are_renamed_and_named_as_the_source_names_them():
    cm = ColumnMap({"messages": "chat", "role": "speaker", "content": "text"}, {"bot": "assistant"})
    r = rec({"chat": [{"speaker": "user", "text": "Hello!"}, {"speaker": "bot", "text": "Hi."}]}, columns=cm)
    assert r.messages == [U, A] and r.format == "messages" and r.unknown == ()
    err = bad({"chat": [{"speaker": "wizard", "text": "x"}, {"speaker": "bot", "text": "y"}]}, columns=cm)
    assert err.field_name == "chat[0].speaker" and "roles: {wizard: assistant}" in err.reason
    err = bad({"instruction": "x", "response": " "}, "alpaca", columns=ColumnMap({"output": "response"}))
    assert (err.field_name, err.reason) == ("response", "empty")
    r = rec(
        {"instruction": "x", "output": "old", "response": "new"}, columns=ColumnMap({"output": "response"})
    )
    assert r.messages[-1]["content"] == "new" and r.unknown == ("output",)  # the mapped field wins


def test_text_content_parts_read_as_the_string_form_in_every_role(tokenizer):
    from sftlab.data.tokenize import tokenize_conversations

    def parts(text):
        return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]

    plain = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
    ]
    with_parts = [{**m, "content": parts(m["content"])} for m in plain]
    a, b = rec({"messages": plain}), rec({"messages": with_parts})
    assert b.messages == a.messages
    pc = rec(
        {
            "prompt": [{"role": "user", "content": parts("Hello!")}],
            "completion": [{"role": "assistant", "content": parts("Hi there.")}],
        }
    )
    assert [m["content"] for m in pc.messages] == ["Hello!", "Hi there."]
    ours, ref = tokenize_conversations(tokenizer, [b.messages, a.messages], "assistant", None)
    assert ours.input_ids == ref.input_ids and ours.labels == ref.labels


@pytest.mark.parametrize(
    "part,says",
    [
        ({"type": "image", "image": "cat.png"}, "an image part: images need a vision-language model"),
        ({"type": "image_url", "image_url": {"url": "x"}}, "an image_url part"),
        ({"type": "audio"}, "must be a content part"),
        ("just text", "must be a content part"),
    ],
)
def test_other_content_parts_are_bad_rows_naming_the_part(part, says):
    e = bad({"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}, A]})
    assert e.field_name == "messages[0].content[1]" and says in e.reason and e.line == 3


def test_image_rows_are_their_own_kind_of_bad_record_and_survive_pickling():
    from sftlab.data.types import ImageRow

    e = bad(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]}
    )
    assert isinstance(e, ImageRow) and e.field_name == "messages[0].content[0]"
    again = pickle.loads(pickle.dumps(e))  # worker processes send bad rows back pickled
    assert isinstance(again, ImageRow) and str(again) == str(e)
    plain = bad({"messages": [{"role": "user", "content": [{"type": "audio"}]}, A]})
    assert not isinstance(plain, ImageRow)


def test_mapping_hints_are_added_only_where_a_mapping_exists_and_a_field_is_missing():
    row = {"instruction": "Add one.", "input": "", "output": "2"}
    with_map = bad(row, columns=ColumnMap({"output": "response"}))
    assert "the row has `output` itself" in with_map.reason and with_map.line == 3
    assert (
        "columns" not in bad({"instruction": "Add one.", "output": ""}).reason
    )  # an empty output: no mapping hint
    empty = bad(
        {"instruction": "Add one.", "input": "", "response": ""}, columns=ColumnMap({"output": "response"})
    )
    assert empty.field_name == "response" and empty.reason == "empty"  # the field is there: no hint to give


def test_llamafactory_v1_text_parts_name_their_text_value():
    # LLaMA-Factory's data/v1_sft_demo.jsonl: {"type": "text", "value": ...}; its image parts stay refused
    v1 = rec(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "value": "hi"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "value": "Hello! "},
                        {"type": "text", "value": "I am here."},
                    ],
                },
            ]
        }
    )
    assert [m["content"] for m in v1.messages] == ["hi", "Hello! I am here."]
    e = bad({"messages": [{"role": "user", "content": [{"type": "image", "value": "1.jpg"}]}, A]})
    assert (
        e.field_name == "messages[0].content[0]"
        and "an image part: images need a vision-language model" in e.reason
    )
    e = bad({"messages": [{"role": "user", "content": [{"type": "text", "value": 3}]}, A]})
    assert "must be a content part" in e.reason


# Two tools with different keys, as `datasets` holds them: Arrow merges the structs of all rows, so each row's
# schema and call arguments get the other row's keys filled in with None (`"amount": null` in get_weather's call)
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "description": "ISO date"},
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
}
CONVERT = {
    "name": "convert",
    "parameters": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "enum": ["today", "yesterday"]},
            "amount": {"type": "number"},
            "to": {"type": "string"},
        },
        "required": ["amount", "to"],
    },
}


def tool_row(tool, args, answer):
    call = {"type": "function", "function": {"name": tool["name"], "arguments": args}}
    return {
        "tools": [tool],
        "messages": [
            U,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": answer},
        ],
    }


TOOL_ROWS = [
    tool_row(WEATHER, {"city": "Paris"}, "Sunny."),
    tool_row(CONVERT, {"amount": 3.5, "to": "EUR"}, "3.2 EUR."),
]


def test_nulls_arrow_fills_into_tool_schemas_and_call_arguments_are_absent(tmp_path, tokenizer):
    import datasets
    from conftest import write_jsonl

    from sftlab.config.schema import DataConfig, SourceConfig
    from sftlab.data.dataset import build_datasets

    arrow = datasets.Dataset.from_list(TOOL_ROWS)
    assert arrow[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]["amount"] is None  # the fill-in
    for filled, row in zip(arrow, TOOL_ROWS):
        c, ref = rec(filled), rec(row)
        assert c.tools == ref.tools == [{"type": "function", "function": row["tools"][0]}]
        assert c.messages == ref.messages and c.messages[1]["tool_calls"] == row["messages"][1]["tool_calls"]
    # tokenized: a Dataset and a JSONL file of the same rows give the same examples, with no null in them
    cfg = {"max_seq_length": 4096, "chat_template": "chatml_tools", "cache": False}
    from_arrow, _, _ = build_datasets(DataConfig(**cfg), tokenizer, seed=0, train_sources=[arrow])
    path = write_jsonl(tmp_path / "tools.jsonl", TOOL_ROWS)
    from_jsonl, _, _ = build_datasets(
        DataConfig(train=[SourceConfig(path=str(path))], **cfg), tokenizer, seed=0
    )
    texts = sorted(tokenizer.decode(ex.input_ids) for ex in from_arrow)
    assert len(texts) == 2 and not any("null" in t for t in texts)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in texts[1]
    assert '"date": {"type": "string", "enum": ["today", "yesterday"]}, "amount"' in texts[0]
    assert sorted((ex.input_ids, ex.labels) for ex in from_arrow) == sorted(
        (ex.input_ids, ex.labels) for ex in from_jsonl
    )


def test_an_explicit_null_inside_a_schema_or_arguments_is_absent_too():
    row = tool_row({**CONVERT, "description": None}, {"amount": 3.5, "to": "EUR", "note": None}, "3.2 EUR.")
    c = rec(row)
    assert c.tools == [{"type": "function", "function": CONVERT}]
    assert c.messages[1]["tool_calls"][0]["function"]["arguments"] == {"amount": 3.5, "to": "EUR"}
    listed = rec(tool_row(CONVERT, {"to": ["EUR", None]}, "ok"))  # a null list item is a value: kept
    assert listed.messages[1]["tool_calls"][0]["function"]["arguments"] == {"to": ["EUR", None]}


# --- the registry: one declaration (config.fields.ROW_FORMATS) and one reader (READERS) per format ------------


def test_every_declared_format_has_exactly_one_reader_and_every_reader_a_declaration():
    from sftlab.config.fields import FORMATS, REQUIRED_FIELDS, ROW_FIELDS, ROW_FORMATS

    names = [f.name for f in ROW_FORMATS]
    assert len(set(names)) == len(names) and list(READERS) == names  # same formats, same (detection) order
    assert FORMATS == ("auto", *names) and list(ROW_FIELDS) == list(REQUIRED_FIELDS) == names
    for f in ROW_FORMATS:
        assert (
            callable(READERS[f.name].detect)
            and callable(READERS[f.name].convert)
            and f.required
            and f.description
        )
        assert len(set(f.fields)) == len(f.fields) and "\n" not in f.description and "|" not in f.description
        row = {name: "x" for name in f.required}
        assert READERS[f.name].detect(row) and detect_format(row) in names[: names.index(f.name) + 1]
        assert not READERS[f.name].detect({name: None for name in f.required})  # null is absent


def test_the_message_for_an_undetectable_row_names_every_format_in_detection_order():
    reason = bad({"question": "x"}).reason
    assert (
        "expected 'messages', 'conversations', 'prompt'+'completion', 'instruction'+'output', "
        "'instruction'+'response', 'input_ids' or 'text'"
    ) in reason


def test_docs_data_md_holds_the_generated_table_of_formats():
    from pathlib import Path

    from sftlab.config.fields import formats_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text(encoding="utf-8")
    start = (
        "<!-- generated by sftlab.config.fields.formats_table() from the registry "
        "(tests/data/test_records.py checks it) -->\n"
    )
    assert start in doc, "docs/data.md lost its generated table of formats"
    table = doc.split(start, 1)[1].split("\n<!-- end of the generated table -->", 1)[0]
    assert table == formats_table(), (
        "docs/data.md's table of formats is stale: replace it with the output of "
        "`python -c 'from sftlab.config.fields import formats_table; print(formats_table())'`"
    )


DOLLY_ROWS = [  # as in databricks-dolly-15k
    {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a "
        "single route.",
        "response": "Virgin Australia commenced services on 31 August 2000.",
        "category": "closed_qa",
    },
    {
        "instruction": "Which is a species of fish? Tope or Rope",
        "context": "",
        "response": "Tope",
        "category": "classification",
    },
    {
        "instruction": "Why can camels survive for long without water?",
        "context": "",
        "response": "Camels use the fat in their humps to keep them filled with energy and hydration.",
        "category": "open_qa",
    },
    {
        "instruction": "Give me a short list of fruits.",
        "context": "",
        "response": "apples, bananas, cherries",
        "category": "brainstorming",
    },
]


def test_a_dolly_file_is_detected_converted_and_trained_on_its_responses_only(tmp_path, tokenizer):
    from conftest import write_jsonl

    from sftlab.config.schema import DataConfig, SourceConfig
    from sftlab.data.dataset import build_datasets
    from sftlab.data.types import IGNORE_INDEX

    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)
    cfg = DataConfig(train=[SourceConfig(path=str(path))], cache=False)
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    assert report.bad == 0 and len(train) == len(DOLLY_ROWS)
    assert report.sources[0].formats == {"dolly": 4} and report.sources[0].unknown_fields == {"category": 4}
    by_prompt = {}
    for ex in train:
        text = tokenizer.decode(ex.input_ids)
        row = next(r for r in DOLLY_ROWS if f"<|im_start|>user\n{r['instruction']}" in text)
        by_prompt[row["instruction"]] = row
        user = row["instruction"] + ("\n\n" + row["context"] if row["context"] else "")
        assert (
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{row['response']}<|im_end|>" in text
        )
        targets = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
        assert targets == list(range(targets[0], targets[-1] + 1))  # one run: the response and its <|im_end|>
        assert [ex.labels[i] for i in targets] == [ex.input_ids[i] for i in targets]
        want = tokenizer(row["response"] + "<|im_end|>", add_special_tokens=False).input_ids
        assert [ex.input_ids[i] for i in targets] == want
    assert len(by_prompt) == len(DOLLY_ROWS)
    assert rec(DOLLY_ROWS[0]).messages == [
        {"role": "user", "content": DOLLY_ROWS[0]["instruction"] + "\n\n" + DOLLY_ROWS[0]["context"]},
        {"role": "assistant", "content": DOLLY_ROWS[0]["response"]},
    ]
    assert bad({**DOLLY_ROWS[1], "response": " "}).field_name == "response"


def test_the_readme_table_of_formats_names_every_format():
    from pathlib import Path

    from sftlab.config.fields import ROW_FORMATS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert [f.name for f in ROW_FORMATS if f"\n| `{f.name}` |" not in readme] == []


# --- a source's `columns` / `roles` mapping, end to end ---------------------------------------------

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
