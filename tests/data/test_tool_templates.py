"""The tool templates (`chatml_tools`, `llama3_tools`) render the Qwen2.5 and Llama-3.1 tool layouts, and
their masks train the assistant's calls and answers, never the tool schemas or the tool results.

Without tools they render as their plain variants: tests/data/test_templates.py."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer

from sftlab.data.rendering import render
from sftlab.data.templates import BUILTIN_TEMPLATES
from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX, TemplateError

BOS = "<|begin_of_text|>"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
]


# Reference layouts, written out from the official templates.
def ref_chatml_tools(conv, tools, gen):
    system = conv[0]["content"] if conv[0]["role"] == "system" else None
    out = ""
    if tools:
        out = (
            "<|im_start|>system\n"
            + (system + "\n\n" if system else "")
            + "# Tools\n\nYou may call one or more "
            "functions to assist with the user query.\n\nYou are provided with function signatures within "
            "<tools></tools> XML tags:\n<tools>"
            + "".join("\n" + json.dumps(t) for t in tools)
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            "<args-json-object>}\n</tool_call><|im_end|>\n"
        )
    elif system:
        out = f"<|im_start|>system\n{system}<|im_end|>\n"
    for i, m in enumerate(conv[1:] if system else conv):
        if m["role"] == "tool":
            prev_tool = i and (conv[1:] if system else conv)[i - 1]["role"] == "tool"
            out += (
                "" if prev_tool else "<|im_start|>user"
            ) + f"\n<tool_response>\n{m['content']}\n</tool_response>"
            following = (conv[1:] if system else conv)[i + 1 :]
            out += "" if following and following[0]["role"] == "tool" else "<|im_end|>\n"
        elif m.get("tool_calls"):
            out += "<|im_start|>assistant" + ("\n" + m["content"] if m["content"] else "")
            for c in m["tool_calls"]:
                out += (
                    "\n<tool_call>\n"
                    + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                    + "\n</tool_call>"
                )
            out += "<|im_end|>\n"
        else:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if gen else "")


LLAMA_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.Do not use variables.\n\n"
)


def ref_llama3_tools(conv, tools, gen):
    system = conv[0]["content"].strip() if conv[0]["role"] == "system" else ""
    rest = conv[1:] if conv[0]["role"] == "system" else conv
    schemas = "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
    out = (
        BOS + "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: "
        f"December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
        "for a function call with its proper arguments that best answers the given prompt.\n\n"
        + LLAMA_FORMAT
        + schemas
        + rest[0]["content"].strip()
        + "<|eot_id|>"
    )
    for m in rest[1:]:
        if m["role"] == "tool":
            out += f"<|start_header_id|>ipython<|end_header_id|>\n\n{json.dumps(m['content'])}<|eot_id|>"
        elif m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            out += (
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
                + json.dumps({"name": fn["name"], "parameters": fn["arguments"]})
                + "<|eot_id|>"
            )
        else:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


TWO_RESULTS = [
    CHAT[1],
    {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]},
    {"role": "tool", "content": "21"},
    {"role": "tool", "content": "19"},
    {"role": "assistant", "content": "21 and 19."},
]


@pytest.mark.parametrize("gen", [False, True], ids=["conversation", "generation-prompt"])
@pytest.mark.parametrize(
    "conv", [CHAT, CHAT[1:], CHAT[:5], TWO_RESULTS], ids=["system", "no-system", "one-call", "parallel-calls"]
)
def test_chatml_tools_renders_the_qwen25_layout(conv, gen):
    conv = conv[:-1] if gen else conv
    assert render(BUILTIN_TEMPLATES["chatml_tools"], conv, gen, tools=TOOLS) == ref_chatml_tools(
        conv, TOOLS, gen
    )


@pytest.mark.parametrize("gen", [False, True], ids=["conversation", "generation-prompt"])
@pytest.mark.parametrize("conv", [CHAT, CHAT[1:], CHAT[:5]], ids=["system", "no-system", "one-call"])
def test_llama3_tools_renders_the_llama31_layout(conv, gen):
    conv = conv[:-1] if gen else conv
    text = render(BUILTIN_TEMPLATES["llama3_tools"], conv, gen, tools=TOOLS, bos_token=BOS)
    assert text == ref_llama3_tools(conv, TOOLS, gen)


def test_llama3_tools_options_and_limits():
    tmpl = BUILTIN_TEMPLATES["llama3_tools"]
    text = render(
        tmpl, CHAT[:3], tools=TOOLS, bos_token=BOS, tools_in_user_message=False, date_string="1 Jan 2025"
    )
    system, _, after = text.partition("<|eot_id|>")
    assert "Today Date: 1 Jan 2025" in system and "You have access to the following functions." in system
    assert (
        system.endswith(json.dumps(TOOLS[0], indent=4) + "\n\nYou are terse.")
        and "get_weather" not in after[:60]
    )
    with pytest.raises(TemplateError, match="one tool call per assistant message"):
        render(tmpl, TWO_RESULTS, tools=TOOLS, bos_token=BOS)
    # arguments given as a JSON string are written as they are (not quoted again)
    as_string = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    for name in ("chatml_tools", "llama3_tools"):
        conv = [CHAT[1], {"role": "assistant", "tool_calls": [as_string]}]
        assert render(BUILTIN_TEMPLATES[name], conv, bos_token=BOS) == render(
            BUILTIN_TEMPLATES[name], [CHAT[1], {"role": "assistant", "tool_calls": [CALL]}], bos_token=BOS
        )


def tool_tokenizer(name: str):
    tok = build_tokenizer(BUILTIN_TEMPLATES[name])
    tok.add_special_tokens({"bos_token": BOS})
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    return tok


def runs(tok, ex) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    out, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            out, cur = out + [tok.decode(cur)], []
    return out + ([tok.decode(cur)] if cur else [])


CALL_TEXT = {
    "chatml_tools": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "llama3_tools": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
}
ANSWERS = {
    "chatml_tools": ["21 degrees.<|im_end|>", "Let me check.\n" + CALL_TEXT["chatml_tools"]],
    "llama3_tools": ["21 degrees.<|eot_id|>", CALL_TEXT["llama3_tools"]],
}  # Llama writes no text with a call


@pytest.mark.parametrize("name", ["chatml_tools", "llama3_tools"])
def test_tool_template_masks_train_calls_and_answers_only(name):
    tok = tool_tokenizer(name)
    ex = tokenize_conversation(tok, CHAT, "assistant", template=BUILTIN_TEMPLATES[name], tools=TOOLS)
    assert runs(tok, ex) == [CALL_TEXT[name], *ANSWERS[name]]
    text = tok.decode(ex.input_ids)
    assert '"description": "Get the weather in a city"' in text.replace("    ", "").replace(
        "\n", ""
    )  # schemas shown
    assert not any("Get the weather" in r or "temp" in r for r in runs(tok, ex))  # ... never trained
    assert (
        ex.input_ids
        == tok.apply_chat_template(
            CHAT, tools=TOOLS, chat_template=BUILTIN_TEMPLATES[name], tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_the_example_template_is_chatml_tools_with_smollm2s_default_system_prompt():
    """examples/templates/chatml_tools.jinja: the built-in's layout, plus SmolLM2's default system prompt."""
    from pathlib import Path

    example = (
        Path(__file__).resolve().parents[2] / "examples" / "templates" / "chatml_tools.jinja"
    ).read_text()
    for conv in (CHAT, CHAT[:5], [CHAT[0], *TWO_RESULTS]):
        assert render(example, conv, tools=TOOLS) == render(
            BUILTIN_TEMPLATES["chatml_tools"], conv, tools=TOOLS
        )
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert render(example, CHAT[1:], tools=TOOLS) == ref_chatml_tools(
        [{"role": "system", "content": default}, *CHAT[1:]], TOOLS, False
    )
