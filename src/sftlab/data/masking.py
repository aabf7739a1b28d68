"""Loss masks for any Jinja chat template: render, locate the assistant turns, tokenize and label.

A conversation is rendered with the chat template (rendering.py) and the character span of every
assistant turn (its text plus the end-of-turn marker that closes it) is located in the rendering
(spans.py). Character spans become token labels through the fast tokenizer's offsets: a token is
a target when it overlaps a span. Masks are by position, never by token id (pad == eos on many
models). Templates with `{% generation %}` tags mark assistant text themselves; their marks are
used as they are, so masks equal transformers' `return_assistant_tokens_mask`.

`loss_on`: `assistant` (every assistant turn), `last_assistant` (the last one), `completion`
(prompt/completion rows `[user..., assistant]`: the final assistant message, which must end the
conversation; the same span as `last_assistant`), `all` (every token).

Speed: templates are compiled once and rendered directly (rendering.py); `tokenize_conversations`
calls the fast tokenizer once for a whole batch. For ChatML-family templates a direct renderer
(fast_chatml.py) replaces the template where it is checked to give the same text and spans
(`detect_chatml`).

The rendering and span functions are importable from here too (`render`, `assistant_spans`, ...).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from sftlab.data.fast_chatml import (
    END,
    GENERATION_PROMPT,
    START,
    ChatMLRenderer,
    FastPathMismatch,
    probes,
)
from sftlab.data.rendering import (
    Atoms,
    Span,
    Tools,
    _Renderer,
    appends_generation_prompt,
    assistant_spans,
    has_generation_tags,
    render,
)
from sftlab.data.templates import resolve_template
from sftlab.data.types import IGNORE_INDEX, TemplateError, TokenizedExample

__all__ = [
    "IGNORE_INDEX",
    "LOSS_ON",
    "Atoms",
    "Span",
    "TemplateError",
    "TokenizedExample",
    "Tools",
    "appends_generation_prompt",
    "assistant_spans",
    "detect_chatml",
    "encode_texts",
    "has_generation_tags",
    "labels_from_spans",
    "render",
    "tokenize_conversation",
    "tokenize_conversations",
]

LOSS_ON = ("assistant", "last_assistant", "completion", "all")


# --- from character spans to token labels ------------------------------------------------------


def _token_ranges(offsets: list[tuple[int, int]], spans: list[Span]) -> list[tuple[int, int]]:
    """[first, last+1) token indices overlapping each span; a zero-width token counts as one character wide.

    Offsets of one sequence are sorted, so each span is two binary searches.
    """
    out = []
    for s, e in spans:
        first = bisect_left(offsets, (s, -1))  # the first token starting at or after s ...
        while first and offsets[first - 1][1] > s:  # ... or straddling s
            first -= 1
        stop = bisect_left(offsets, (e, -1), first)  # the first token starting at or after e
        if first < stop:
            out.append((first, stop))
    return out


def labels_from_spans(offsets: list[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """Mark every token whose character range overlaps one of the spans (spans sorted, disjoint)."""
    mask = [False] * len(offsets)
    for a, b in _token_ranges(offsets, spans):
        mask[a:b] = [True] * (b - a)
    return mask


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in _token_ranges(offsets, spans):
        labels[a:b] = ids[a:b]
    return labels


def _text_and_spans(
    messages: list[dict[str, Any]],
    loss_on: str,
    template: str,
    tools: Tools,
    kwargs: dict[str, Any],
    atoms: Atoms = (),
) -> tuple[str, list[Span]]:
    if loss_on == "all":
        return _Renderer(template, messages, tools, kwargs)(len(messages)), []
    if loss_on == "completion" and (not messages or messages[-1].get("role") != "assistant"):
        raise TemplateError(
            "loss_on=completion needs a conversation that ends with the assistant's completion"
        )
    return assistant_spans(template, messages, tools, kwargs, last_only=loss_on != "assistant", atoms=atoms)


WEIGHT_KEYS = ("loss_weight", "weight")  # LLaMA-Factory v1's and axolotl's per-message loss weights


def _weighted(messages: list[dict[str, Any]], loss_on: str, spans: list[Span]) -> list[Span]:
    """The spans without those of assistant turns whose per-message weight (`loss_weight` / `weight`) is 0;
    a weight other than 0 or 1 cannot be a mask and is refused."""
    turns = [m for m in messages if m.get("role") == "assistant"]
    weights = [next((m[k] for k in WEIGHT_KEYS if m.get(k) is not None), 1) for m in turns]
    if loss_on == "all" or all(w == 1 for w in weights):
        return spans
    if any(w not in (0, 1) for w in weights):
        raise TemplateError(
            f"a message's loss weight must be 0 or 1 (got {[w for w in weights if w not in (0, 1)][0]!r}): "
            "a mask trains a turn or not"
        )
    if loss_on != "assistant":
        return spans if weights[-1] else []
    if len(spans) != len(turns):
        raise TemplateError(
            f"the template marks {len(spans)} spans for {len(turns)} assistant turns: the turns with "
            "loss weight 0 cannot be told apart"
        )
    return [s for s, w in zip(spans, weights) if w]


def _fast_or_template(
    messages: list[dict[str, Any]],
    loss_on: str,
    template: str,
    tools: Tools,
    kwargs: dict[str, Any],
    fast: ChatMLRenderer | None,
    verify: bool,
    atoms: Atoms = (),
) -> tuple[str, list[Span]]:
    """Text and spans from the direct renderer where it applies (checked against the template when
    `verify`), else from the template; assistant turns with loss weight 0 lose their span (`_weighted`)."""
    text, spans = _direct_or_template(messages, loss_on, template, tools, kwargs, fast, verify, atoms)
    return text, _weighted(messages, loss_on, spans)


def _direct_or_template(
    messages: list[dict[str, Any]],
    loss_on: str,
    template: str,
    tools: Tools,
    kwargs: dict[str, Any],
    fast: ChatMLRenderer | None,
    verify: bool,
    atoms: Atoms = (),
) -> tuple[str, list[Span]]:
    got = fast.text_and_spans(messages, loss_on) if fast is not None and tools is None else None
    if got is None:
        return _text_and_spans(messages, loss_on, template, tools, kwargs, atoms)
    if verify:
        try:
            want: Any = _text_and_spans(messages, loss_on, template, tools, kwargs, atoms)
        except TemplateError as e:
            want = e
        if want != got:
            raise FastPathMismatch(
                "the direct ChatML renderer and the chat template disagree on a conversation"
            )
    return got


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text without added special tokens, in one batched call.

    Calls the Rust tokenizer's `encode_batch` directly, which is what the transformers wrapper does
    after setting no truncation and no padding; used only when the backend is in exactly that state
    (else through the wrapper), so the ids are the same.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    direct = (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and getattr(backend, "encode_special_tokens", False)
        == getattr(tokenizer, "split_special_tokens", False)
    )
    if direct:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return [(enc["input_ids"][j], enc.encodings[j].offsets) for j in range(len(texts))]


def detect_chatml(template: str | None, kwargs: dict[str, Any]) -> ChatMLRenderer | None:
    """The direct renderer (fast_chatml.py) when `template` renders every probe exactly as it does:
    text, generation prompt and assistant spans; None otherwise (and for `{% generation %}` templates)."""
    if not template or START not in template or END not in template or has_generation_tags(template):
        return None
    try:
        alone = render(template, [{"role": "user", "content": "x"}], **kwargs)
        own = f"{START}user\nx{END}\n"
        if not alone.endswith(own):
            return None
        default = alone[: -len(own)]
        if default and not (
            default.startswith(f"{START}system\n")
            and default.endswith(f"{END}\n")
            and default.count(START) == 1
            and default.count(END) == 1
        ):
            return None
        fast = ChatMLRenderer(default)
        for probe in probes():
            text, spans = fast.render(probe)
            if (
                render(template, probe, **kwargs) != text
                or render(template, probe, add_generation_prompt=True, **kwargs) != text + GENERATION_PROMPT
                or assistant_spans(template, probe, None, kwargs) != (text, spans)
            ):
                return None
    except TemplateError:
        return None
    return fast


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    loss_on: str = "assistant",
    template: str | None = None,
    tools: list[Tools] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    on_error: Literal["raise", "return"] = "raise",
    fast: ChatMLRenderer | None = None,
    verify: list[bool] | None = None,
) -> list[Any]:
    """Render, tokenize (one fast-tokenizer call for the batch) and label many conversations.

    `tools` holds one tool list (or None) per conversation. With `on_error="return"`, a conversation
    that cannot be masked comes back as its TemplateError instead of a TokenizedExample. `fast`: a
    direct renderer (fast_chatml.py) for plain conversations; those with `verify[k]` are rendered
    through the template too and must agree (else FastPathMismatch).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    if loss_on != "all" and not tokenizer.is_fast:
        raise ValueError("loss masks need a fast tokenizer (character offsets)")
    if template is None:
        template = resolve_template(None, tokenizer)
    kwargs = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
    atoms = tuple(getattr(tokenizer, "added_tokens_encoder", ()))
    tools = tools if tools is not None else [None] * len(conversations)
    verify = verify if verify is not None else [False] * len(conversations)
    results: list[Any] = []
    for messages, conv_tools, check in zip(conversations, tools, verify, strict=True):
        try:
            results.append(
                _fast_or_template(messages, loss_on, template, conv_tools, kwargs, fast, check, atoms)
            )
        except TemplateError as e:
            if on_error == "raise":
                raise
            results.append(e)
    ok = [k for k, res in enumerate(results) if not isinstance(res, TemplateError)]
    if not ok:
        return results
    for (ids, offsets), k in zip(encode_texts(tokenizer, [results[k][0] for k in ok]), ok):
        labels = list(ids) if loss_on == "all" else _labels(ids, offsets, results[k][1])
        results[k] = TokenizedExample(ids, labels)
    return results


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    loss_on: str = "assistant",
    template: str | None = None,
    tools: Tools = None,
    template_kwargs: dict[str, Any] | None = None,
) -> TokenizedExample:
    """Render, tokenize and label one conversation (`template` None: the tokenizer's own)."""
    return tokenize_conversations(tokenizer, [messages], loss_on, template, [tools], template_kwargs)[0]
