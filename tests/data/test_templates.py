"""Built-in chat templates render each family's reference layout; resolving data.chat_template; ChatML tokens."""

from __future__ import annotations

import pytest
from conftest import CORPUS, build_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sftlab.data.rendering import render
from sftlab.data.templates import ALPACA_PREAMBLE, BUILTIN_TEMPLATES, add_chatml_tokens, resolve_template
from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX, TemplateError

EOS, BOS = "</s>", "<s>"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
]


# Reference layouts, written out per family.
def ref_chatml(conv, gen):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv) + (
        "<|im_start|>assistant\n" if gen else ""
    )


def ref_llama3(conv, gen):
    return (
        BOS
        + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            for m in conv
        )
        + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")
    )


def ref_tulu(conv, gen):
    out = ""
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            out += f"<|assistant|>\n{m['content']}{EOS}" + ("" if i == len(conv) - 1 else "\n")
        else:
            out += f"<|{m['role']}|>\n{m['content']}\n"
    return out + ("<|assistant|>\n" if gen else "")


def ref_zephyr(conv, gen):
    return "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in conv) + (
        "<|assistant|>\n" if gen else ""
    )


def ref_alpaca(conv, gen):
    out = conv[0]["content"] if conv[0]["role"] == "system" else ALPACA_PREAMBLE
    for m in conv[1:] if conv[0]["role"] == "system" else conv:
        if m["role"] == "user":
            out += f"\n\n### Instruction:\n{m['content']}"
        else:
            out += f"\n\n### Response:\n{m['content']}{EOS}"
    return out + ("\n\n### Response:\n" if gen else "")


# Without tools, tool calls and tool results the tool templates render as their plain variants
# (with them: tests/data/test_tool_templates.py).
REFERENCES = {
    "chatml": ref_chatml,
    "llama3": ref_llama3,
    "tulu": ref_tulu,
    "zephyr": ref_zephyr,
    "alpaca": ref_alpaca,
    "chatml_tools": ref_chatml,
    "llama3_tools": ref_llama3,
}
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "tulu": EOS,
    "zephyr": EOS,
    "alpaca": EOS,
    "chatml_tools": "<|im_end|>",
    "llama3_tools": "<|eot_id|>",
}


def test_every_builtin_has_a_reference():
    assert set(BUILTIN_TEMPLATES) == set(REFERENCES)


@pytest.mark.parametrize("gen", [False, True], ids=["conversation", "generation-prompt"])
@pytest.mark.parametrize("conv", [CHAT, CHAT[1:], CHAT[1:3]], ids=["system", "no-system", "single-turn"])
@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_renders_the_reference_layout(name, conv, gen):
    if gen:
        conv = conv[:-1]
    text = render(BUILTIN_TEMPLATES[name], conv, add_generation_prompt=gen, bos_token=BOS, eos_token=EOS)
    assert text == REFERENCES[name](conv, gen)


def test_alpaca_is_the_stanford_prompt():
    conv = [{"role": "user", "content": "Convert the date."}, {"role": "assistant", "content": "2021-03-05"}]
    assert render(BUILTIN_TEMPLATES["alpaca"], conv, eos_token=EOS) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nConvert the date.\n\n### Response:\n2021-03-05" + EOS
    )
    with pytest.raises(TemplateError, match="no tool role"):
        render(BUILTIN_TEMPLATES["alpaca"], [{"role": "tool", "content": "x"}], eos_token=EOS)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_masks_are_the_assistant_turns(name):
    tok = build_tokenizer(BUILTIN_TEMPLATES[name])
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS})
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    ex = tokenize_conversation(tok, CHAT, "assistant", template=BUILTIN_TEMPLATES[name])
    runs = [tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])]
    assert runs == ["".join(m["content"] + END_OF_TURN[name] for m in CHAT if m["role"] == "assistant")]
    assert (
        ex.input_ids
        == tok.apply_chat_template(
            CHAT, chat_template=BUILTIN_TEMPLATES[name], tokenize=True, return_dict=True
        )["input_ids"]
    )


# --- resolve_template ------------------------------------------------------------------------


def test_resolve_none_is_the_tokenizers_own(tokenizer):
    assert resolve_template(None, tokenizer) == tokenizer.chat_template


def test_resolve_none_without_a_template_suggests_chatml():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="data.chat_template: chatml"):
        resolve_template(None, tok)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_resolve_builtin(name):
    assert resolve_template(name, None) == BUILTIN_TEMPLATES[name]


def test_resolve_jinja_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["zephyr"], encoding="utf-8")
    assert resolve_template(str(path), None) == BUILTIN_TEMPLATES["zephyr"]


def test_resolve_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(TemplateError, match=f"not found: {missing}"):
        resolve_template(str(missing), None)


def test_resolve_unknown_name_lists_builtins():
    with pytest.raises(TemplateError, match="unknown chat template 'chatlm'.*chatml, llama3"):
        resolve_template("chatlm", None)


# --- add_chatml_tokens -----------------------------------------------------------------------


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A base-model tokenizer without ChatML tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_add_chatml_tokens_is_idempotent():
    tok = plain_tokenizer()
    add_chatml_tokens(tok)
    n = len(tok)
    assert add_chatml_tokens(tok) == 0 and len(tok) == n
    # a tokenizer that already has them (SmolLM2-like): nothing added, eos set
    assert add_chatml_tokens(build_tokenizer()) == 0


def test_resolve_invalid_jinja_names_the_file(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for message in messages %}{{ message['content'] }}", encoding="utf-8")
    with pytest.raises(TemplateError, match=f"{path}: the chat template is not valid Jinja"):
        resolve_template(str(path), None)
