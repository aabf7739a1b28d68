"""Per-message loss weights (LLaMA-Factory v1's `loss_weight`, axolotl's `weight`): an assistant turn with
weight 0 is not trained, on the direct ChatML renderer and on the template path alike; other weights are refused."""

from __future__ import annotations

import pytest
from conftest import CHATML_TEMPLATE, build_tokenizer

from sftlab.data.masking import IGNORE_INDEX, TemplateError, detect_chatml, tokenize_conversations

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
