"""Chat-template rendering and loss masks for any Jinja chat template.

A conversation is rendered once with the template. The character span of every assistant
message (its content plus the end-of-turn marker that closes it, e.g. `<|im_end|>`) is found by
rendering prefixes of the conversation: the text added by message i is
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True). Where a template
re-renders history differently (e.g. drops earlier reasoning), the span is located in the full
render by searching for that text instead. Character spans become token labels through the fast
tokenizer's offset mapping: a token is a target when it overlaps a span (the same rule as
transformers' `return_assistant_tokens_mask` for `{% generation %}` templates). Masks are by
position, never by token id (pad == eos on many models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where no loss

    @property
    def num_targets(self) -> int:
        # the first position is never predicted, so it never counts
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


class TemplateError(ValueError):
    """The chat template cannot render this conversation in a way we can mask exactly."""


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=template,
        add_generation_prompt=add_generation_prompt, **kwargs,
    )
    return rendered[0]


def assistant_spans(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the [start, end) character span of each assistant turn."""
    kw = template_kwargs or {}
    full = render(template, messages, tools=tools, **kw)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(template, messages[:i], add_generation_prompt=True, tools=tools, **kw) if i else ""
        upto = render(template, messages[: i + 1], tools=tools, **kw)
        if upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor:
            chunk = upto[len(prefix):].rstrip()
            start = len(prefix)
        else:
            # The template renders the turn differently in history than as the latest turn, or the
            # generation prompt is not a prefix of the rendered turn: locate the turn's text instead.
            start, chunk = _locate(full, upto, prefix, msg, cursor)
        if not chunk:
            continue
        spans.append((start, start + len(chunk)))
        cursor = start + len(chunk)
    return full, spans


def _locate(full: str, upto: str, prefix: str, msg: dict[str, Any], cursor: int) -> tuple[int, str]:
    """Find the assistant turn's text in `full` at or after `cursor` (fallback path)."""
    # Longest common prefix of `upto` and `prefix` is where the turn starts in `upto`.
    n = 0
    for a, b in zip(upto, prefix):
        if a != b:
            break
        n += 1
    chunk = upto[n:].rstrip()
    content = (msg.get("content") or "").strip()
    if content and content in chunk:
        chunk = chunk[chunk.index(content):]  # drop header text that the generation prompt did not share
    pos = full.find(chunk, cursor)
    if pos >= 0:
        return pos, chunk
    if content:
        pos = full.find(content, cursor)
        if pos >= 0:
            # extend over the end-of-turn marker as it follows the content in `upto`
            tail = upto[upto.rfind(content) + len(content):].rstrip()
            end = pos + len(content)
            if tail and full.startswith(tail, end):
                end += len(tail)
            return pos, full[pos:end]
    raise TemplateError(
        "cannot locate an assistant turn in the rendered conversation "
        f"(content starts {content[:40]!r}); the template may rewrite message contents"
    )


def labels_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Mark every token whose character range overlaps one of the spans (spans sorted, disjoint)."""
    mask = [False] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        if e <= s:  # zero-width tokens (e.g. some added special tokens) take the next char's verdict
            e = s + 1
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and spans[j][0] < e and s < spans[j][1]:
            mask[t] = True
    return mask


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                          loss_on: str = "assistant", template: str | None = None,
                          tools: list[dict[str, Any]] | None = None) -> TokenizedExample:
    """Render, tokenize and label one conversation."""
    template = template or tokenizer.chat_template
    if not template:
        raise TemplateError("the tokenizer has no chat template; set data.chat_template")
    text, spans = assistant_spans(template, messages, tools=tools)
    if loss_on == "last_assistant":
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    if loss_on == "all":
        return TokenizedExample(ids, list(ids))
    mask = labels_from_spans(enc["offset_mapping"], spans)
    return TokenizedExample(ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)])
