"""The chat template rendered exactly, and each assistant turn located in it (rendering.py).

A template that writes text after the final message only: TRL's Phi-3 template
(tests/data/templates/phi3.jinja, the same text as trl/chat_templates/phi3.jinja) writes `eos_token` where
the generation prompt `<|assistant|>\\n` would go. Paired with the conftest tokenizer, whose eos `<|im_end|>`
is an added token and which knows no `<|assistant|>` token, that final-only text and the prompt both begin
with `<|`: the text is one added token, so where it begins is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONVERSATIONS, build_tokenizer, write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import build_datasets
from sftlab.data.masking import IGNORE_INDEX, TemplateError, tokenize_conversation
from sftlab.data.rendering import assistant_spans

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
