"""The direct ChatML renderer: used only where it equals the template path (text, spans, tokens),
refused for other templates, and abandoned (source rebuilt through the template) on any difference."""

from __future__ import annotations

import random

import pytest
from conftest import CHATML_TEMPLATE, build_tokenizer, write_jsonl
from test_tokenize import family

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data import dataset, fast_chatml, tokenize
from sftlab.data.dataset import build_datasets
from sftlab.data.fast_chatml import ChatMLRenderer
from sftlab.data.templates import BUILTIN_TEMPLATES
from sftlab.data.types import TemplateError

PIECES = [
    "Hello",
    " there",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "<|im_end|>",
    "<|im_start|>",
    "{{ x }}",
    "é",
    "42",
    "",
    "<tool_response>",
    "</tool_response>",
    "system",
    "assistant\n",
]


def random_conversation(rng: random.Random) -> list[dict]:
    n = rng.randint(1, 6)
    roles = ([rng.choice(["system", "user"])] if rng.random() < 0.5 else []) + [
        rng.choice(["user", "assistant", "assistant", "system"]) for _ in range(n)
    ]
    return [
        {"role": r, "content": "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))} for r in roles
    ]


def kwargs_of(tok) -> dict:
    return dict(tok.special_tokens_map)


REFUSED = (
    "llama3",
    "mistral",
    "gemma",
    "chatml_tools_generation",
    "phi3",
    "phi3_5",
    "gpt_oss",
    "phi3_generation",
    "phi3_5_generation",
    "gpt_oss_generation",
)


@pytest.mark.parametrize("name", ["chatml", "qwen3", *REFUSED])
def test_where_detected_it_equals_the_template_path(name):
    tok, text = family(name)
    fast = tokenize.detect_chatml(text, kwargs_of(tok))
    if name == "chatml":
        assert fast is not None and fast.default_system.startswith("<|im_start|>system\nYou are a helpful")
    if name in REFUSED:
        assert fast is None
    if fast is None:
        return
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        conv = random_conversation(rng)
        for loss_on in tokenize.LOSS_ON:
            got = fast.text_and_spans(conv, loss_on)
            if got is None:
                continue
            assert tokenize._text_and_spans(conv, loss_on, text, None, kwargs_of(tok)) == got, (conv, loss_on)
            checked += 1
    assert checked > 500


def test_builtin_chatml_is_detected_and_other_builtins_are_not():
    tok = build_tokenizer(CHATML_TEMPLATE)
    assert tokenize.detect_chatml(BUILTIN_TEMPLATES["chatml"], kwargs_of(tok)).default_system == ""
    for name in ("llama3", "tulu", "zephyr", "alpaca"):
        assert tokenize.detect_chatml(BUILTIN_TEMPLATES[name], kwargs_of(tok)) is None, name


@pytest.mark.parametrize(
    "change",
    [
        "message['content'] | trim",
        "message['content'] + ' '",
        "message['content'] | replace('\\n\\n', '\\n')",
    ],
)
def test_templates_that_alter_content_are_refused(change):
    template = CHATML_TEMPLATE.replace("message['content']", change)
    assert tokenize.detect_chatml(template, kwargs_of(build_tokenizer())) is None


def test_plain_conversations_only():
    fast = ChatMLRenderer("")
    assert (
        fast.text_and_spans(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "assistant"
        )
        is not None
    )
    for conv in (
        [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hm</think>a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}],
        [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "no answer"}],
    ):
        assert fast.text_and_spans(conv, "assistant") is None


# A ChatML template that differs from the direct renderer on one content only: probes cannot see it.
SNEAKY = CHATML_TEMPLATE.replace(
    "message['content'] + '<|im_end|>'",
    "(message['content'] if message['content'] != 'MAGIC' else 'magic!') + '<|im_end|>'",
)


@pytest.mark.parametrize("position", [0, 8])  # row 0: chunk 0 (all checked); row 8: first row of chunk 2
def test_a_difference_on_the_data_rebuilds_the_source_through_the_template(
    position, tmp_path, monkeypatch, caplog
):
    tok = build_tokenizer(SNEAKY)
    assert tokenize.detect_chatml(SNEAKY, kwargs_of(tok)) is not None
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(12)
    ]
    rows[position]["messages"][1]["content"] = "MAGIC"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setattr(dataset, "ROWS_PER_CHUNK", 4)
    monkeypatch.setattr(fast_chatml, "VERIFY_EVERY", 4)
    monkeypatch.setattr("sftlab.data.tokenize.VERIFY_EVERY", 4)
    cfg = DataConfig(train=[SourceConfig(path=str(path))], cache=False, eval_fraction=0.0)
    with caplog.at_level("WARNING"):
        train, _, _ = build_datasets(cfg, tok, seed=0)
    assert any("disagree" in r.message for r in caplog.records)
    monkeypatch.setattr(dataset, "detect_chatml", lambda *a: None)
    reference, _, _ = build_datasets(cfg, tok, seed=0)
    assert [(e.input_ids, e.labels) for e in train] == [(e.input_ids, e.labels) for e in reference]
    assert "magic!" in tok.decode(train[position].input_ids)


def test_direct_encoding_equals_the_wrapper_and_respects_truncation():
    tok = build_tokenizer()
    texts = ["<|im_start|>user\nHello there<|im_end|>\n", "", "plain text, no specials\n\n  x"]
    want = [(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert [ids for ids, _ in tokenize.encode_texts(tok, texts)] == want
    tok.backend_tokenizer.enable_truncation(3)  # a backend state the direct call must not bypass
    assert [len(ids) for ids, _ in tokenize.encode_texts(tok, texts)] == [len(w) for w in want]


def test_template_errors_still_come_from_the_template():
    fast = ChatMLRenderer("")
    conv = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "r"},
    ]
    assert fast.text_and_spans(conv, "completion") is None  # judged by the template path, which refuses it
    with pytest.raises(TemplateError):
        tokenize._text_and_spans(conv, "completion", CHATML_TEMPLATE, None, {})
