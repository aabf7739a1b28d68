"""A record becomes token ids and labels (tokenize.py): decode the labelled tokens and compare with the
assistant texts, exactly; per-message loss weights (LLaMA-Factory v1's `loss_weight`, axolotl's `weight`):
an assistant turn with weight 0 is not trained, on the direct ChatML renderer and on the template path
alike, and other weights are refused.

Real chat-template layouts live in tests/data/templates/*.jinja (written for these tests, after each
family's published template); each test tokenizer knows its family's special tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from conftest import CHATML_TEMPLATE, CONVERSATIONS, build_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

from sftlab.data.rendering import appends_generation_prompt, assistant_spans, render
from sftlab.data.tokenize import (
    detect_chatml,
    labels_from_spans,
    tokenize_conversation,
    tokenize_conversations,
)
from sftlab.data.types import IGNORE_INDEX, TemplateError, TokenizedExample

TEMPLATES = Path(__file__).parent / "templates"


def labelled_runs(tokenizer, ex) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid, "labels must equal input ids where set (the shift happens in the loss)"
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def reference_ids(tokenizer, conv, template, tools=None) -> list[int]:
    return tokenizer.apply_chat_template(
        conv, tools=tools, chat_template=template, tokenize=True, return_dict=True
    )["input_ids"]


@pytest.mark.parametrize(
    "conv", CONVERSATIONS, ids=["single-turn-default-system", "system-prompt", "multi-turn"]
)
def test_assistant_tokens_are_exactly_the_assistant_turns(tokenizer, conv):
    ex = tokenize_conversation(tokenizer, conv, "assistant")
    expected = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    assert labelled_runs(tokenizer, ex) == expected
    # the ids are exactly what the template + tokenizer produce for the whole conversation
    assert ex.input_ids == tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]


def test_last_assistant_only(tokenizer):
    conv = CONVERSATIONS[2]
    ex = tokenize_conversation(tokenizer, conv, "last_assistant")
    assert labelled_runs(tokenizer, ex) == [conv[-1]["content"] + "<|im_end|>"]


def test_all_tokens(tokenizer):
    ex = tokenize_conversation(tokenizer, CONVERSATIONS[0], "all")
    assert ex.labels == ex.input_ids


def test_masks_by_position_not_token_id(tokenizer):
    """pad == eos == <|im_end|>: the <|im_end|> closing user/system turns must stay unlabelled."""
    conv = CONVERSATIONS[2]
    ex = tokenize_conversation(tokenizer, conv, "assistant")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ex.input_ids) if t == im_end]
    labelled_ends = [i for i in ends if ex.labels[i] != IGNORE_INDEX]
    assert len(ends) == len(conv) and len(labelled_ends) == 3  # 4 non-assistant turns stay unlabelled


def test_content_repeated_in_prompt_is_not_labelled(tokenizer):
    """The assistant repeats the user's words: only the assistant's copy is a target."""
    conv = [{"role": "user", "content": "Paris"}, {"role": "assistant", "content": "Paris"}]
    ex = tokenize_conversation(tokenizer, conv, "assistant")
    assert labelled_runs(tokenizer, ex) == ["Paris<|im_end|>"]
    text, spans = assistant_spans(CHATML_TEMPLATE, conv)
    assert text[spans[0][0] : spans[0][1]] == "Paris<|im_end|>"
    assert spans[0][0] > text.index("Paris")


GEN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_equals_transformers_assistant_mask_on_generation_template(tokenizer, conv):
    ref = tokenizer.apply_chat_template(
        conv, chat_template=GEN_TEMPLATE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ex = tokenize_conversation(tokenizer, conv, "assistant", template=GEN_TEMPLATE)
    assert ex.input_ids == ref["input_ids"]
    assert [int(lab != IGNORE_INDEX) for lab in ex.labels] == list(ref["assistant_masks"])


# --- real chat templates ----------------------------------------------------------------------


def family_tokenizer(
    template: str,
    special: tuple[str, ...] = (),
    added: tuple[str, ...] = (),
    bos: str | None = None,
    eos: str | None = None,
):
    """The conftest BPE tokenizer plus a family's special (and plain added) tokens."""
    tok = build_tokenizer(template)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    return tok


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@functools.cache
def family(name: str):
    """(tokenizer, template) of a chat-template family."""
    if name == "chatml":  # SmolLM2's
        return build_tokenizer(CHATML_TEMPLATE), CHATML_TEMPLATE
    specs = {
        "llama3": dict(
            special=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
        ),
        "mistral": dict(special=("<s>", "</s>"), bos="<s>", eos="</s>"),
        "gemma": dict(
            special=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>"
        ),
        "qwen3": dict(
            added=(
                "<think>",
                "</think>",
                "<tool_call>",
                "</tool_call>",
                "<tool_response>",
                "</tool_response>",
            ),
            eos="<|im_end|>",
        ),
        "chatml_tools_generation": dict(
            added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
        ),
        "phi3": dict(
            special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
            eos="<|endoftext|>",
        ),
        "gpt_oss": dict(
            special=("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"), eos="<|return|>"
        ),
    }
    specs["phi3_5"] = specs["phi3"]
    for base in ("phi3", "phi3_5", "gpt_oss"):  # their {% generation %}-tagged twins: the same tokens
        specs[f"{base}_generation"] = specs[base]
    text = template(name)
    return family_tokenizer(text, **specs[name]), text


SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "  Why did the chicken cross the road?\n"},  # untrimmed on purpose
]
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
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# Reasoning before the last user query is dropped from history; the last turn keeps it.
QWEN_TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "I should call the tool.",
        "content": "",
        "tool_calls": [WEATHER_CALL],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "reasoning_content": "The tool says 21.", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "reasoning_content": "Be polite.", "content": "You're welcome!"},
]

# (family, conversation, tools, expected text of each assistant turn as the template renders it)
CASES = {
    "chatml-smollm2": ("chatml", SYSTEM_CHAT[:3], None, ["Hello! How can I help you today?<|im_end|>"]),
    "llama3": (
        "llama3",
        SYSTEM_CHAT,
        None,
        ["Hello! How can I help you today?<|eot_id|>", "Why did the chicken cross the road?<|eot_id|>"],
    ),
    "mistral": (
        "mistral",
        SYSTEM_CHAT,
        None,
        [" Hello! How can I help you today?</s>", "   Why did the chicken cross the road?\n</s>"],
    ),
    "gemma": (
        "gemma",
        SYSTEM_CHAT[1:],
        None,
        ["Hello! How can I help you today?<end_of_turn>", "Why did the chicken cross the road?<end_of_turn>"],
    ),
    "qwen3-tools-history-reasoning-dropped": (
        "qwen3",
        QWEN_TOOL_CHAT,
        TOOLS,
        [
            CALL_TEXT + "<|im_end|>",
            "It is 21 degrees in Paris.<|im_end|>",
            "<think>\nBe polite.\n</think>\n\nYou're welcome!<|im_end|>",
        ],
    ),
    "qwen3-tool-loop-reasoning-kept": (
        "qwen3",
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "Call the tool.",
                "content": "Let me check.",
                "tool_calls": [WEATHER_CALL],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "reasoning_content": "21 it is.", "content": "21 degrees."},
        ],
        TOOLS,
        [
            "<think>\nCall the tool.\n</think>\n\nLet me check.\n" + CALL_TEXT + "<|im_end|>",
            "<think>\n21 it is.\n</think>\n\n21 degrees.<|im_end|>",
        ],
    ),
    "qwen3-tool-loop-no-reasoning": (
        "qwen3",
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [WEATHER_CALL],
            },  # empty think block only when last
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
        ],
        TOOLS,
        [CALL_TEXT + "<|im_end|>", "<think>\n\n</think>\n\n21 degrees.<|im_end|>"],
    ),
    "qwen3-reasoning-inside-content": (
        "qwen3",
        [
            {"role": "user", "content": "Hello!"},
            {
                "role": "assistant",
                "content": "<think>\nGreet back.\n</think>\n\nHello! How can I help you today?",
            },
            {"role": "user", "content": "Tell me a joke."},
            {
                "role": "assistant",
                "content": "<think>\nA classic.\n</think>\n\nWhy did the chicken cross the road?",
            },
        ],
        None,
        [
            "Hello! How can I help you today?<|im_end|>",
            "<think>\nA classic.\n</think>\n\nWhy did the chicken cross the road?<|im_end|>",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_template_masks_are_exact(case):
    name, conv, tools, expected = CASES[case]
    tok, tmpl = family(name)
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl, tools=tools)
    assert labelled_runs(tok, ex) == expected
    assert ex.input_ids == reference_ids(tok, conv, tmpl, tools)  # bos written once, by the template


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "completion", "all"])
@pytest.mark.parametrize(
    "case", ["chatml-smollm2", "llama3", "mistral", "gemma", "qwen3-tools-history-reasoning-dropped"]
)
def test_loss_on_modes(case, loss_on):
    name, conv, tools, expected = CASES[case]
    tok, tmpl = family(name)
    ex = tokenize_conversation(tok, conv, loss_on, template=tmpl, tools=tools)
    assert ex.input_ids == reference_ids(tok, conv, tmpl, tools)
    if loss_on == "all":
        assert ex.labels == ex.input_ids
    else:
        assert labelled_runs(tok, ex) == (expected if loss_on == "assistant" else expected[-1:])


def test_completion_labels_the_completion_of_prompt_completion_rows():
    tok, tmpl = family("llama3")
    conv = [{"role": "user", "content": "Numbers: one two"}, {"role": "assistant", "content": "three four"}]
    assert labelled_runs(tok, tokenize_conversation(tok, conv, "completion", template=tmpl)) == [
        "three four<|eot_id|>"
    ]
    with pytest.raises(TemplateError, match="ends with the assistant"):
        tokenize_conversation(tok, conv + [{"role": "user", "content": "more"}], "completion", template=tmpl)


def test_qwen3_tools_are_rendered_in_the_system_prompt():
    tok, tmpl = family("qwen3")
    text, spans = assistant_spans(tmpl, QWEN_TOOL_CHAT, tools=TOOLS)
    system = text[: text.index("<|im_start|>user")]
    assert (
        system.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
        and '"name": "get_weather"' in system
    )
    assert "I should call the tool." not in text and "The tool says 21." not in text  # dropped from history
    assert all(s[0] > len(system) for s in spans)


def test_qwen3_history_renders_differently_than_each_turn_alone():
    """Why prefix renders alone are not enough: rendered as the latest turn, a turn keeps its reasoning."""
    tok, tmpl = family("qwen3")
    alone = tokenize_conversation(tok, QWEN_TOOL_CHAT[:3], "last_assistant", template=tmpl, tools=TOOLS)
    assert labelled_runs(tok, alone) == [
        "<think>\nI should call the tool.\n</think>\n\n" + CALL_TEXT + "<|im_end|>"
    ]


def test_qwen3_last_assistant_before_a_final_user_turn():
    """The last assistant turn follows a rewritten one and precedes the last query: located via its predecessors."""
    tok, tmpl = family("qwen3")
    ex = tokenize_conversation(tok, QWEN_TOOL_CHAT[:6], "last_assistant", template=tmpl, tools=TOOLS)
    assert labelled_runs(tok, ex) == ["It is 21 degrees in Paris.<|im_end|>"]


@pytest.mark.parametrize(
    "conv", [QWEN_TOOL_CHAT, CASES["qwen3-tool-loop-reasoning-kept"][1]], ids=["history", "tool-loop"]
)
def test_generation_template_with_tool_calls_equals_transformers_mask(conv):
    tok, tmpl = family("chatml_tools_generation")
    ref = tok.apply_chat_template(
        conv,
        tools=TOOLS,
        chat_template=tmpl,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl, tools=TOOLS)
    assert ex.input_ids == ref["input_ids"]
    assert [int(lab != IGNORE_INDEX) for lab in ex.labels] == list(ref["assistant_masks"])
    assert all(run.endswith("<|im_end|>") for run in labelled_runs(tok, ex))
    last = tokenize_conversation(tok, conv, "last_assistant", template=tmpl, tools=TOOLS)
    assert labelled_runs(tok, last) == labelled_runs(tok, ex)[-1:]


def test_template_kwargs_reach_the_template():
    """Qwen3 with enable_thinking=False: the prompt holds the empty think block, so it is not a target."""
    tok, tmpl = family("qwen3")
    conv = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
    ]
    default = tokenize_conversation(tok, conv, "assistant", template=tmpl)
    assert labelled_runs(tok, default) == [
        "<think>\n\n</think>\n\nHello! How can I help you today?<|im_end|>"
    ]
    off = tokenize_conversation(
        tok, conv, "assistant", template=tmpl, template_kwargs={"enable_thinking": False}
    )
    assert labelled_runs(tok, off) == ["Hello! How can I help you today?<|im_end|>"]
    assert off.input_ids == default.input_ids


# --- templates whose generation prompt or history differ from the turn alone ----------------------


def test_conversation_starting_with_the_assistant_gets_the_default_system_prompt(tokenizer):
    """SmolLM2's template adds its system prompt before the first message; an empty prompt renders without it."""
    conv = [{"role": "assistant", "content": "Hello! How can I help you today?"}]
    ex = tokenize_conversation(tokenizer, conv, "assistant")
    assert labelled_runs(tokenizer, ex) == ["Hello! How can I help you today?<|im_end|>"]


def test_generation_prompt_that_opens_a_block_history_lacks(tokenizer):
    """DeepSeek-R1 style: the generation prompt opens <think>, history turns do not show it."""
    tmpl = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert render(tmpl, CONVERSATIONS[0][:1], add_generation_prompt=True).endswith("assistant\n<think>\n")
    conv = CONVERSATIONS[2]
    ex = tokenize_conversation(tokenizer, conv, "assistant", template=tmpl)
    assert labelled_runs(tokenizer, ex) == [
        m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"
    ]


# Mistral v0.3 places the system message in the *last* user turn: earlier turns render differently in history.
SYSTEM_IN_LAST_USER = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}{%- if loop.index0 == ns.last_user and system is defined %}"
    "{{- '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}"
    "{%- endif %}{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_system_prompt_moving_to_the_last_user_turn():
    tok, _ = family("mistral")
    ex = tokenize_conversation(tok, SYSTEM_CHAT, "assistant", template=SYSTEM_IN_LAST_USER)
    assert labelled_runs(tok, ex) == [
        " Hello! How can I help you today?</s>",
        "   Why did the chicken cross the road?\n</s>",
    ]
    assert ex.input_ids == reference_ids(tok, SYSTEM_CHAT, SYSTEM_IN_LAST_USER)


# --- what cannot be masked exactly is refused ---------------------------------------------------

REWRITES_ANSWERS = CHATML_TEMPLATE.replace(
    "message['content'] + '<|im_end|>'",
    "(message['content'][:5] if message['role'] == 'assistant' and not loop.last else message['content'])"
    " + '<|im_end|>'",
)
DROPS_HISTORY = CHATML_TEMPLATE.replace(
    "{{'<|im_start|>' + message['role']",
    "{% if message['role'] == 'assistant' and not loop.last %}{% continue %}{% endif %}"
    "{{'<|im_start|>' + message['role']",
)


@pytest.mark.parametrize("tmpl", [REWRITES_ANSWERS, DROPS_HISTORY], ids=["rewrites-answers", "drops-history"])
def test_turn_that_cannot_be_located_raises(tokenizer, tmpl):
    with pytest.raises(TemplateError, match="assistant message 2"):
        tokenize_conversation(tokenizer, CONVERSATIONS[2], "assistant", template=tmpl)
    # the last turn alone is still exact
    ex = tokenize_conversation(tokenizer, CONVERSATIONS[2], "last_assistant", template=tmpl)
    assert labelled_runs(tokenizer, ex) == ["Sure, that's great!<|im_end|>"]


def test_template_exceptions_become_template_errors():
    tok, tmpl = family("mistral")
    bad = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(TemplateError, match="must alternate"):
        tokenize_conversation(tok, bad, "assistant", template=tmpl)
    tok, tmpl = family("gemma")
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(tok, SYSTEM_CHAT, "assistant", template=tmpl)


def test_unknown_loss_on(tokenizer):
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_conversation(tokenizer, CONVERSATIONS[0], "everything")


# --- batching, offsets -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
def test_batched_equals_one_by_one(tokenizer, loss_on):
    convs = CONVERSATIONS * 3
    one = [tokenize_conversation(tokenizer, c, loss_on) for c in convs]
    assert [(e.input_ids, e.labels) for e in tokenize_conversations(tokenizer, convs, loss_on)] == [
        (e.input_ids, e.labels) for e in one
    ]


def test_batch_returns_errors_in_place_when_asked(tokenizer):
    convs = [CONVERSATIONS[0], CONVERSATIONS[2], CONVERSATIONS[1]]
    with pytest.raises(TemplateError):
        tokenize_conversations(tokenizer, convs, template=REWRITES_ANSWERS)
    out = tokenize_conversations(tokenizer, convs, template=REWRITES_ANSWERS, on_error="return")
    assert isinstance(out[1], TemplateError)
    assert isinstance(out[0], TokenizedExample) and isinstance(out[2], TokenizedExample)
    assert labelled_runs(tokenizer, out[2]) == ["2021-03-05<|im_end|>"]


def test_labels_from_spans_overlap_rule():
    # tokens: [0,2) [2,2) zero-width [2,5) [5,7) [7,7) zero-width [7,9)
    offsets = [(0, 2), (2, 2), (2, 5), (5, 7), (7, 7), (7, 9)]
    assert labels_from_spans(offsets, [(3, 6)]) == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]  # straddling tokens count
    assert labels_from_spans(offsets, [(2, 7)]) == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]  # zero-width at start counts
    assert labels_from_spans(offsets, [(0, 1), (8, 9)]) == [True, False, False, False, False, True]
    assert labels_from_spans(offsets, []) == [False] * 6


def sentencepiece_tokenizer(template: str):
    """A Llama-2/Mistral-style tokenizer: '▁' for spaces (prepended per segment), byte fallback."""
    from conftest import CORPUS
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    return fast


def test_masks_with_a_sentencepiece_style_tokenizer():
    """Offsets through a normalizer and byte fallback: the labels are exactly the tokens overlapping each turn."""
    tmpl = template("mistral")
    tok = sentencepiece_tokenizer(tmpl)
    conv = SYSTEM_CHAT[:3] + [
        {"role": "user", "content": "Café?"},
        {"role": "assistant", "content": "Oui, café é"},
    ]
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl)
    assert ex.input_ids == reference_ids(tok, conv, tmpl)
    text, spans = assistant_spans(tmpl, conv, template_kwargs=tok.special_tokens_map)
    assert [text[s:e] for s, e in spans] == [" Hello! How can I help you today?</s>", " Oui, café é</s>"]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    overlapping = {t for t, (a, b) in enumerate(offsets) for s, e in spans if a < e and max(b, a + 1) > s}
    assert {t for t, lab in enumerate(ex.labels) if lab != IGNORE_INDEX} == overlapping
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]).endswith(
        "café é</s>"
    )
    assert (
        sum(tok.convert_ids_to_tokens(t).startswith("<0x") for t in ex.input_ids) >= 2
    )  # é went through bytes


# --- text after the final message only (Phi-3), a final turn closed differently (gpt-oss) -------------------

PHI3_CHATS = {
    "system-2-turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
    "system-3-turns-untrimmed": [
        {"role": "system", "content": "You are a helpful AI assistant named SmolLM"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris.\n"},
        {"role": "user", "content": "Convert the date to YYYY-MM-DD format: March 5, 2021"},
        {"role": "assistant", "content": "  2021-03-05"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Sure, that's great!"},
    ],
    "empty-system-4-turns": [
        {"role": "system", "content": ""},  # rendered by Phi-3, dropped by Phi-3.5
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
        {"role": "assistant", "content": "six"},
        {"role": "user", "content": "seven"},
        {"role": "assistant", "content": "eight nine ten"},
    ],
    "system-ends-with-user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken?"},
        {"role": "user", "content": "Thanks"},
    ],
    "system-1-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Numbers: one two"},
        {"role": "assistant", "content": "three four"},
    ],
}
GPT_OSS_CHATS = {
    "system-2-turns-reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "thinking": "Greet back.", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "thinking": "A classic.", "content": "Why did the chicken cross the road?"},
    ],
    "system-3-turns-reasoning-content": [
        {"role": "system", "content": "You are a helpful AI assistant named SmolLM"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "reasoning_content": "Easy.", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Convert the date to YYYY-MM-DD format: March 5, 2021"},
        {"role": "assistant", "content": "2021-03-05"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "reasoning_content": "Be polite.\n", "content": "Sure, that's great!"},
    ],
    "system-4-turns-no-reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
        {"role": "assistant", "content": "six"},
        {"role": "user", "content": "seven"},
        {"role": "assistant", "content": "eight nine ten"},
    ],
    "developer-ends-with-user": [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "thinking": "Hm.", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken?"},
        {"role": "user", "content": "Thanks"},
    ],
    "no-system-2-turns": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "thinking": "Hm.", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "thinking": "A classic.", "content": "Why did the chicken cross the road?"},
    ],
}
TWIN_CASES = [(name, shape) for name in ("phi3", "phi3_5") for shape in PHI3_CHATS] + [
    ("gpt_oss", shape) for shape in GPT_OSS_CHATS
]


def twin_reference(name: str, conv: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) transformers gives for the `{% generation %}`-tagged twin of a family."""
    tok, tagged = family(f"{name}_generation")
    ref = tok.apply_chat_template(
        conv, chat_template=tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(ref["input_ids"]), list(ref["assistant_masks"])


def last_run(mask: list[int]) -> list[int]:
    """The mask with only its last run of ones kept."""
    end = len(mask) - mask[::-1].index(1)
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [int(start <= k < end) for k in range(len(mask))]


@pytest.mark.parametrize("name,shape", TWIN_CASES, ids=[f"{n}-{s}" for n, s in TWIN_CASES])
def test_multi_turn_masks_equal_the_tagged_twin(name, shape):
    """Phi-3 writes eos after the final message only; gpt-oss closes the final turn with <|return|> and drops
    earlier reasoning: every turn is still exactly its content and end-of-turn marker, as the twin marks it."""
    conv = (PHI3_CHATS if name.startswith("phi3") else GPT_OSS_CHATS)[shape]
    tok, tmpl = family(name)
    ids, mask = twin_reference(name, conv)
    assert reference_ids(tok, conv, tmpl) == ids  # the twin renders the same text
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl)
    assert ex.input_ids == ids
    assert [int(lab != IGNORE_INDEX) for lab in ex.labels] == mask
    last = tokenize_conversation(tok, conv, "last_assistant", template=tmpl)
    assert last.input_ids == ids and [int(lab != IGNORE_INDEX) for lab in last.labels] == last_run(mask)
    twin = tokenize_conversation(tok, conv, "last_assistant", template=family(f"{name}_generation")[1])
    assert twin.labels == last.labels


def test_phi3_eos_after_the_final_message_is_not_a_target():
    tok, tmpl = family("phi3")
    conv = PHI3_CHATS["system-2-turns"]
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl)
    assert labelled_runs(tok, ex) == [
        "Hello! How can I help you today?<|end|>",
        "Why did the chicken cross the road?<|end|>",
    ]
    assert (
        tok.decode(ex.input_ids[-1:]) == "<|endoftext|>" and ex.labels[-2:] == [IGNORE_INDEX] * 2
    )  # "\n", eos
    for mode in ("last_assistant", "completion"):
        only = tokenize_conversation(tok, conv, mode, template=tmpl)
        assert labelled_runs(tok, only) == ["Why did the chicken cross the road?<|end|>"]


def test_gpt_oss_final_turn_keeps_its_reasoning_and_return():
    tok, tmpl = family("gpt_oss")
    conv = GPT_OSS_CHATS["system-2-turns-reasoning"]
    ex = tokenize_conversation(tok, conv, "assistant", template=tmpl)
    assert labelled_runs(tok, ex) == [
        "<|channel|>final<|message|>Hello! How can I help you today?<|end|>",
        (
            "<|channel|>analysis<|message|>A classic.<|end|><|start|>assistant<|channel|>final<|message|>"
            "Why did the chicken cross the road?<|return|>"
        ),
    ]
    assert "Greet back." not in tok.decode(ex.input_ids)  # earlier reasoning is dropped from history
    assert "<|start|>developer<|message|># Instructions\n\nYou are terse." in tok.decode(ex.input_ids)


def test_final_suffix_needs_the_tokenizers_atoms_to_be_exact():
    """`<|endoftext|>` and `<|assistant|>\\n` both begin with `<|`: only the tokenizer's added tokens tell that
    the text after the final message begins before those characters."""
    tok, tmpl = family("phi3")
    conv = PHI3_CHATS["system-2-turns"]
    with pytest.raises(TemplateError, match="cannot be told exactly"):
        assistant_spans(tmpl, conv, template_kwargs=tok.special_tokens_map)
    text, spans = assistant_spans(
        tmpl, conv, template_kwargs=tok.special_tokens_map, atoms=list(tok.get_added_vocab())
    )
    assert [text[s:e] for s, e in spans] == [
        "Hello! How can I help you today?<|end|>",
        "Why did the chicken cross the road?<|end|>",
    ]


# A Phi-3 layout in plain text: the final-only "### End" and the prompt "### Assistant:" begin alike, in no atom.
PLAIN_FINAL_SUFFIX = (
    "{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% else %}{{ '### End' }}{% endif %}"
)


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant"])
def test_final_suffix_that_cannot_be_told_from_the_prompt_is_refused(tokenizer, loss_on):
    with pytest.raises(TemplateError, match="cannot be told exactly"):
        tokenize_conversation(tokenizer, CONVERSATIONS[2], loss_on, template=PLAIN_FINAL_SUFFIX)


APPENDED = ("chatml", "qwen3", "llama3", "mistral", "gemma", "chatml_tools_generation")


@pytest.mark.parametrize(
    "name", [*APPENDED, "phi3", "phi3_5", "gpt_oss", "phi3_generation", "gpt_oss_generation"]
)
def test_templates_that_only_append_the_generation_prompt_are_told_from_their_syntax(name):
    """Where the syntax tree shows the prompt is only appended, the renderings that look for final-only text are
    skipped: the renderings must agree (checked on every test conversation the template can render)."""
    tok, tmpl = family(name)
    assert appends_generation_prompt(tmpl) == (name in APPENDED)
    convs = [SYSTEM_CHAT, SYSTEM_CHAT[1:], *CONVERSATIONS, *PHI3_CHATS.values(), *GPT_OSS_CHATS.values()]
    for conv in convs if name in APPENDED else []:
        for n in range(1, len(conv) + 1):
            try:
                plain = render(tmpl, conv[:n], **tok.special_tokens_map)
            except TemplateError:
                continue
            assert render(tmpl, conv[:n], add_generation_prompt=True, **tok.special_tokens_map).startswith(
                plain
            )


@pytest.mark.parametrize(
    "tmpl,appended",
    [
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A{% endif %}",
            True,
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt and m %}A{% endif %}",
            True,
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A{% else %}E{% endif %}",
            False,
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if not add_generation_prompt %}E{% endif %}",
            False,
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt or m %}A{% endif %}",
            False,
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}A{% endif %}E",
            False,
        ),
        ("{% for m in messages %}{{ m.content if add_generation_prompt else 'x' }}{% endfor %}", False),
        (
            (
                "{% set add_generation_prompt = true %}{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}A{% endif %}"
            ),
            False,
        ),
    ],
)
def test_appends_generation_prompt_is_conservative(tmpl, appended):
    assert appends_generation_prompt(tmpl) == appended


# --- per-message loss weights ----------------------------------------------------------------------------

CHAT = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross?"},
]


def _targets(tok, messages, fast, loss_on="assistant"):
    kwargs = dict(tok.special_tokens_map)
    renderer = detect_chatml(CHATML_TEMPLATE, kwargs) if fast else None
    ex = tokenize_conversations(
        tok, [messages], loss_on, CHATML_TEMPLATE, [None], fast=renderer, verify=[True]
    )[0]
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("fast", [False, True], ids=["template", "direct"])
@pytest.mark.parametrize("key", ["loss_weight", "weight"])
def test_an_assistant_turn_with_weight_zero_is_not_trained(fast, key):
    tok = build_tokenizer()
    weighted = [CHAT[0], {**CHAT[1], key: 0.0}, CHAT[2], {**CHAT[3], key: 1}]
    assert _targets(tok, CHAT, fast) == "Hi there.<|im_end|>Why did the chicken cross?<|im_end|>"
    assert _targets(tok, weighted, fast) == "Why did the chicken cross?<|im_end|>"
    assert _targets(tok, [CHAT[0], CHAT[1], CHAT[2], {**CHAT[3], key: 0}], fast, "last_assistant") == ""


def test_a_fractional_weight_is_refused():
    tok = build_tokenizer()
    with pytest.raises(TemplateError, match="loss weight must be 0 or 1"):
        tokenize_conversations(
            tok, [[CHAT[0], {**CHAT[1], "loss_weight": 0.5}]], "assistant", CHATML_TEMPLATE, [None]
        )
