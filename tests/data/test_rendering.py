"""The chat template rendered exactly (rendering.py): each assistant turn located in it, and which of a row's
tools it renders.

A template that writes text after the final message only: TRL's Phi-3 template
(tests/data/templates/phi3.jinja, the same text as trl/chat_templates/phi3.jinja) writes `eos_token` where
the generation prompt `<|assistant|>\\n` would go. Paired with the conftest tokenizer, whose eos `<|im_end|>`
is an added token and which knows no `<|assistant|>` token, that final-only text and the prompt both begin
with `<|`: the text is one added token, so where it begins is exact.

Which of a row's tools a template renders: found per template by probes; rows whose tools the template would
drop are a run-level error naming the row and the fix, or (data.tools: drop) trained without them under one
warning; glaive-style ShareGPT tool rows trained through `chatml_tools`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import CHATML_TEMPLATE, CONVERSATIONS, build_tokenizer, write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets
from sftlab.data.rendering import ToolSupport, assistant_spans, render, template_support
from sftlab.data.templates import BUILTIN_TEMPLATES
from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX, TemplateError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


TEMPLATES = Path(__file__).parent / "templates"
PHI3 = (TEMPLATES / "phi3.jinja").read_text(encoding="utf-8")
PHI3_TAGGED = (TEMPLATES / "phi3_generation.jinja").read_text(encoding="utf-8")  # marks content + <|end|>
SINGLE = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"}]
CHATS = {"single-turn": SINGLE, "system-single-turn": CONVERSATIONS[1], "multi-turn": CONVERSATIONS[2]}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(PHI3)


def mask(ex) -> list[int]:
    return [int(lab != IGNORE_INDEX) for lab in ex.labels]


def runs(tokenizer, ex) -> list[str]:
    out, cur = [], []
    for tid, lab in [*zip(ex.input_ids, ex.labels), (None, IGNORE_INDEX)]:
        if lab != IGNORE_INDEX:
            cur.append(tid)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out


def test_the_eos_is_an_added_token_and_the_prompt_is_not(tok):
    """The case of the issue: without the fix every row of this pairing was refused."""
    assert "<|im_end|>" in tok.added_tokens_encoder and "<|assistant|>" not in tok.added_tokens_encoder
    text, _ = assistant_spans(
        PHI3, SINGLE, template_kwargs=tok.special_tokens_map, atoms=list(tok.added_tokens_encoder)
    )
    assert text.endswith("<|end|>\n<|im_end|>")


@pytest.mark.parametrize("name", list(CHATS))
def test_phi3_with_an_added_token_eos_masks_exactly_content_and_end(tok, name):
    conv = CHATS[name]
    ex = tokenize_conversation(tok, conv, "assistant", template=PHI3)
    want = [m["content"] + "<|end|>" for m in conv if m["role"] == "assistant"]
    assert runs(tok, ex) == want
    assert (
        tok.decode(ex.input_ids[-1:]) == "<|im_end|>" and ex.labels[-1] == IGNORE_INDEX
    )  # eos after the final message
    assert (
        ex.input_ids
        == tok.apply_chat_template(conv, chat_template=PHI3, tokenize=True, return_dict=True)["input_ids"]
    )
    for mode in ("last_assistant", "completion"):
        assert runs(tok, tokenize_conversation(tok, conv, mode, template=PHI3)) == want[-1:]


@pytest.mark.parametrize("name", list(CHATS))
def test_phi3_masks_equal_transformers_on_the_generation_tagged_twin(tok, name):
    conv = CHATS[name]
    ref = tok.apply_chat_template(
        conv, chat_template=PHI3_TAGGED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ex = tokenize_conversation(tok, conv, "assistant", template=PHI3)
    assert ex.input_ids == list(ref["input_ids"])
    assert mask(ex) == list(ref["assistant_masks"]) and sum(mask(ex)) > 0


def test_phi3_rows_train_through_the_pipeline(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS.values()])
    train, _, report = build_datasets(
        DataConfig(train=[SourceConfig(path=str(path))]), tok, seed=0
    )  # tok.chat_template
    assert report.bad == 0 and len(train) == 3
    assert sorted(len(runs(tok, e)) for e in train) == [1, 1, 3]


# Final-only text that is not one added token, and begins like the prompt (`<|` of `<|done|>` and `<|assistant|>`):
# whether `<|` closes the history or opens the final-only text cannot be told.
AMBIGUOUS = PHI3.replace("{{ eos_token }}", "{{ '<|done|>' + eos_token }}")


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant"])
def test_final_only_text_of_more_than_one_added_token_that_begins_like_the_prompt_is_still_refused(
    tok, loss_on
):
    assert AMBIGUOUS != PHI3
    with pytest.raises(TemplateError, match="cannot be told exactly"):
        tokenize_conversation(tok, CONVERSATIONS[2], loss_on, template=AMBIGUOUS)


def test_without_the_tokenizers_added_tokens_the_eos_is_not_known_to_be_one_token(tok):
    with pytest.raises(TemplateError, match="cannot be told exactly"):
        assistant_spans(PHI3, SINGLE, template_kwargs=tok.special_tokens_map)


# --- which of a row's tools the template renders, and data.tools ------------------------------------

GLAIVE = (
    Path(__file__).parent / "fixtures" / "glaive_toolcall_demo.json"
)  # LLaMA-Factory's glaive_toolcall_en_demo
RAISES_ON_TOOL = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
USER, ANSWER = (
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
)


def cfg(path, **kw) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=str(path))], max_seq_length=4096, **kw)


@pytest.mark.parametrize(
    "template,support",
    [
        (CHATML_TEMPLATE, ToolSupport(tools=False, tool_calls=False, tool_results=True)),  # SmolLM2's own
        (BUILTIN_TEMPLATES["chatml"], ToolSupport(tools=False, tool_calls=False, tool_results=True)),
        (BUILTIN_TEMPLATES["chatml_tools"], ToolSupport(tools=True, tool_calls=True, tool_results=True)),
        (BUILTIN_TEMPLATES["llama3_tools"], ToolSupport(tools=True, tool_calls=True, tool_results=True)),
        (
            RAISES_ON_TOOL,
            ToolSupport(tools=False, tool_calls=False, tool_results=None),
        ),  # refused: per-row bad records
    ],
    ids=["smollm2", "chatml", "chatml_tools", "llama3_tools", "raises-on-tool"],
)
def test_template_support_is_probed(template, support):
    assert template_support(template, {"bos_token": "<s>"}) == support


def test_glaive_rows_with_the_default_template_stop_the_run(tokenizer):
    with pytest.raises(DataError) as e:
        build_datasets(cfg(GLAIVE), tokenizer, seed=0)
    msg = str(e.value)
    assert msg.startswith(
        f"{GLAIVE} row 2: the row has tool schemas (`tools`) and tool calls (`tool_calls` of "
        "messages[1], messages[5])"
    )  # row 0 has "tools": "[]": nothing to drop
    assert "data.chat_template: chatml_tools" in msg and "data.tools: drop" in msg and ".jinja file" in msg


def test_a_tools_column_alone_is_caught_with_its_line(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [USER, ANSWER]}, {"messages": [USER, ANSWER], "tools": TOOLS}]
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl:2: the row has tool schemas \(`tools`\), which the chat template"
    ):
        build_datasets(cfg(path, on_bad_record="skip"), tokenizer, seed=0)
    # a template that renders tools takes the same rows
    train, _, _ = build_datasets(cfg(path, chat_template="chatml_tools"), tokenizer, seed=0)
    assert len(train) == 2


def test_drop_trains_without_them_under_one_warning(tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="sftlab")
    train, _, report = build_datasets(cfg(GLAIVE, tools="drop", cache=False), tokenizer, seed=0)
    assert len(train) == 3 and report.tools_dropped == 2 and report.bad == 0
    warnings = [r.getMessage() for r in caplog.records if "does not render" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 rows carry tools")
    assert "2 rows without the tools the chat template does not render" in report.summary()
    texts = [tokenizer.decode(ex.input_ids) for ex in train]
    assert not any("calculate_area" in t for t in texts)  # neither the schemas nor the calls are left
    assert any('<|im_start|>tool\n{"area": 15}<|im_end|>' in t for t in texts)  # SmolLM2 renders tool results
    # the cache key holds data.tools: the default stops the run again instead of reusing the dropped rows
    build_datasets(cfg(GLAIVE, tools="drop"), tokenizer, seed=0)
    with pytest.raises(DataError, match="row 2"):
        build_datasets(cfg(GLAIVE), tokenizer, seed=0)


def test_glaive_function_call_targets_are_what_the_template_writes_for_tool_calls(tokenizer):
    tmpl = BUILTIN_TEMPLATES["chatml_tools"]
    train, _, report = build_datasets(cfg(GLAIVE, chat_template="chatml_tools"), tokenizer, seed=0)
    assert report.bad == 0 and report.tools_dropped == 0
    ex = max(train, key=lambda e: len(e.input_ids))  # row 2: two calls, two results, two answers
    text = tokenizer.decode(ex.input_ids)
    user = {
        "role": "user",
        "content": "I need to calculate the area of a rectangle. The length is 5 units and the "
        "breadth is 3 units.",
    }
    call = {
        "role": "assistant",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "calculate_area",
                    "arguments": {"shape": "rectangle", "dimensions": [5, 3]},
                },
            }
        ],
    }
    prompt = render(tmpl, [user], add_generation_prompt=True)
    written = render(tmpl, [user, call])[
        len(prompt) :
    ].rstrip()  # the template's rendering of the tool_calls message
    assert (
        written == '<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "rectangle", '
        '"dimensions": [5, 3]}}\n</tool_call><|im_end|>'
    )
    trained = runs(tokenizer, ex)
    assert trained[0] == written and len(trained) == 4
    assert (
        trained[1]
        == "The area of the rectangle with length 5 units and breadth 3 units is 15 square units.<|im_end|>"
    )
    # the schemas are in the rendered system turn and carry no loss; neither do the tool results
    assert '<tools>\n{"type": "function", "function": {"name": "calculate_area", "description": ' in text
    assert "calculate_discount" in text and not any(
        "calculate_discount" in r or "description" in r for r in trained
    )
    assert '<tool_response>\n{"area": 15}\n</tool_response>' in text and not any(
        '"area"' in r for r in trained
    )
