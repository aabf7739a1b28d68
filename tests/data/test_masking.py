"""Loss masks: decode the labelled tokens and compare with the assistant texts, exactly."""

from __future__ import annotations

import pytest
from conftest import CHATML_TEMPLATE, CONVERSATIONS

from sftlab.data.masking import IGNORE_INDEX, assistant_spans, tokenize_conversation


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


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["single-turn-default-system", "system-prompt", "multi-turn"])
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
    assert text[spans[0][0]:spans[0][1]] == "Paris<|im_end|>"
    assert spans[0][0] > text.index("Paris")


GEN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_equals_transformers_assistant_mask_on_generation_template(tokenizer, conv):
    ref = tokenizer.apply_chat_template(conv, chat_template=GEN_TEMPLATE, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ex = tokenize_conversation(tokenizer, conv, "assistant", template=GEN_TEMPLATE)
    assert ex.input_ids == ref["input_ids"]
    assert [int(lab != IGNORE_INDEX) for lab in ex.labels] == list(ref["assistant_masks"])
