"""A record becomes token ids and labels.

`encode_text_rows(rows, ctx, number)` is a text model's part of one chunk of a source (dataset.py:
`encode_chunk`, here or in a `num_proc` worker process). Each raw row becomes a record (records.py:
`to_record`, after the Python API's `formatting_func` where one is given); `data.tools` is applied to the
conversations (rendering.py: `handle_tools`: a row whose tools, tool calls or tool results the template
would not render stops the run, a DataError naming the row, or has them dropped and is counted); the
records are tokenized and labelled (`tokenize_chunk`) in parts of about `TOKENIZE_CHARS` characters, each
example turned into compact arrays at once (`compact_example`). Any example left without a target token
is a bad record.

Chat rows (`tokenize_conversations`): each conversation is rendered with the chat template and the
character span of every assistant turn (its text plus the end-of-turn marker that closes it) is located
in the rendering (rendering.py). The fast tokenizer is called once for the batch (`encode_texts`), and
character spans become token labels through its offsets: a token is a target when it overlaps a span.
Masks are by position, never by token id (pad == eos on many models). Templates with `{% generation %}`
tags mark assistant text themselves; their marks are used as they are, so masks equal transformers'
`return_assistant_tokens_mask`. An assistant turn whose per-message loss weight (`loss_weight` /
`weight`) is 0 is not trained.

`loss_on`: `assistant` (every assistant turn), `last_assistant` (the last one), `completion`
(prompt/completion rows `[user..., assistant]`: the final assistant message, which must end the
conversation; the same span as `last_assistant`), `all` (every token). `data.add_bos`: a conversation
whose template writes no BOS starts with the tokenizer's (never a target).

For ChatML-family templates a direct renderer (fast_chatml.py) replaces the template where it is checked
to give the same text and spans (`detect_chatml`); every conversation of a source's first chunk and one
in `VERIFY_EVERY` after it are rendered both ways.

Text rows (`format: text`) are tokenized without a chat template, with the tokenizer's own special
tokens (e.g. a BOS). A token that overlaps a character of a `loss_masking_spans` span carries no loss;
every other token is a target. The source's response/instruction templates (markers.py) only add spans
to those, when the row is read (records.py), so they are marked the same way. The EOS token is appended,
as a target, unless the text already ends with it, so the model learns where a document stops.
Pretokenized rows are used as they are.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from sftlab.data.fast_chatml import (
    END,
    GENERATION_PROMPT,
    START,
    VERIFY_EVERY,
    ChatMLRenderer,
    FastPathMismatch,
    probes,
)
from sftlab.data.markers import TextMarkers
from sftlab.data.records import ColumnMap, Conversation, Record, TextRecord, formatted_row, to_record
from sftlab.data.rendering import (
    Atoms,
    Span,
    Tools,
    _Renderer,
    assistant_spans,
    handle_tools,
    has_generation_tags,
    render,
)
from sftlab.data.store import example_arrays
from sftlab.data.templates import resolve_template
from sftlab.data.types import IGNORE_INDEX, BadRecord, DataError, TemplateError, TokenizedExample

# --- a conversation -> ids and labels: loss masks from character spans -----------------------------

LOSS_ON = ("assistant", "last_assistant", "completion", "all")


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
    `verify`: a disagreement is a FastPathMismatch), else from the template; assistant turns with loss
    weight 0 lose their span (`_weighted`)."""
    got = fast.text_and_spans(messages, loss_on) if fast is not None and tools is None else None
    if got is None:
        got = _text_and_spans(messages, loss_on, template, tools, kwargs, atoms)
    elif verify:
        try:
            want: Any = _text_and_spans(messages, loss_on, template, tools, kwargs, atoms)
        except TemplateError as e:
            want = e
        if want != got:
            raise FastPathMismatch(
                "the direct ChatML renderer and the chat template disagree on a conversation"
            )
    text, spans = got
    return text, _weighted(messages, loss_on, spans)


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


# --- a chunk's rows -> records -> ids and labels ----------------------------------------------------

RawChunk = list[tuple[int, int, str, Any]]  # (file index, line or row, unit, parsed row or BadRecord)
# characters tokenized in one batch: a chunk of long rows (512 x 4096 tokens) is tokenized in parts,
# each turned into compact arrays before the next, since the tokenizer's output (ids, offsets as Python
# objects) costs ~250 bytes a token; the rows, tokens and arrays are the same as in one batch
TOKENIZE_CHARS = 1 << 20


@dataclass
class ChunkContext:
    """What every chunk of one source is encoded with."""

    tokenizer: PreTrainedTokenizerBase
    source: str  # display name, for errors
    files: list[str]  # file index -> name (grows as the source is read; workers get it with the chunk)
    format: str
    loss_on: str
    template: str | None
    ids_dtype: str
    fast: ChatMLRenderer | None = None  # the direct renderer, where the template is ChatML (fast_chatml.py)
    columns: ColumnMap = field(default_factory=ColumnMap)  # the source's `columns` / `roles`
    formatting_func: Any = None  # the Python API's row -> messages | {prompt, completion} | text
    markers: TextMarkers | None = None  # the source's response/instruction templates (text rows)
    tools: str = "error"  # data.tools: tools the template does not render stop the run, or are dropped
    add_bos: bool = False  # data.add_bos: chat rows start with the tokenizer's BOS (never a target)
    processor: Any = None  # a vision-language model's processor: rows are read with their images
    max_seq_length: int | None = None  # vision rows longer than this (images expanded) are bad rows
    image_dir: str | None = None  # where images held in memory are written (the cache entry)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive [start, end] spans -> sorted, disjoint half-open [start, end + 1) spans."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e + 1))
        else:
            out.append((s, e + 1))
    return out


def _tokenize_texts(tokenizer: PreTrainedTokenizerBase, recs: list[TextRecord]) -> list[TokenizedExample]:
    """Text rows: every token a target except those overlapping a loss-masking span; EOS appended."""
    if not tokenizer.is_fast and any(r.spans for r in recs):
        raise DataError(
            "text rows with loss_masking_spans or a response_template need a fast tokenizer "
            "(character offsets)"
        )
    enc = tokenizer([r.text for r in recs], add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
    eos = tokenizer.eos_token_id
    out = []
    for k, r in enumerate(recs):
        ids = list(enc["input_ids"][k])
        masked = (
            labels_from_spans(enc["offset_mapping"][k], _merge(r.spans)) if r.spans else [False] * len(ids)
        )
        labels = [IGNORE_INDEX if m else t for t, m in zip(ids, masked)]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        out.append(TokenizedExample(ids, labels))
    return out


def _tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    convs: list[Conversation],
    loss_on: str,
    template: str | None,
    fast: ChatMLRenderer | None = None,
    verify: list[bool] | None = None,
) -> list[TokenizedExample | BadRecord]:
    """One batched masking call; a conversation the template cannot mask becomes a BadRecord."""
    results = tokenize_conversations(
        tokenizer,
        [c.messages for c in convs],
        loss_on,
        template,
        [c.tools for c in convs],
        on_error="return",
        fast=fast,
        verify=verify,
    )
    return [
        BadRecord(c.source, c.line, "messages", str(res), c.unit) if isinstance(res, TemplateError) else res
        for c, res in zip(convs, results)
    ]


def with_bos(example: TokenizedExample, bos: int | None) -> TokenizedExample:
    """data.add_bos: the example with the BOS token first (no loss on it), unless it already starts with it."""
    if bos is None or (example.input_ids and example.input_ids[0] == bos):
        return example
    return TokenizedExample([bos, *example.input_ids], [IGNORE_INDEX, *example.labels])


def tokenize_chunk(
    records: list[Record],
    tokenizer: PreTrainedTokenizerBase,
    loss_on: str,
    template: str | None,
    source: str = "",
    fast: ChatMLRenderer | None = None,
    verify_all: bool = False,
    add_bos: bool = False,
    first: int = 0,
) -> list[TokenizedExample | BadRecord]:
    """Tokenize and label records of any kind, in order; unusable ones come back as BadRecord.

    With a direct renderer `fast`, conversations at positions divisible by VERIFY_EVERY (all of them
    with `verify_all`) are checked against the template; `first`: the position of `records[0]` in its chunk. `add_bos`: conversations whose template
    writes no BOS get the tokenizer's (text rows already have the tokenizer's own special tokens)."""
    out: list[Any] = [None] * len(records)
    by_kind: dict[type, list[int]] = {}
    for i, r in enumerate(records):
        by_kind.setdefault(type(r), []).append(i)
    if Conversation in by_kind and not (template or tokenizer.chat_template):
        raise DataError(
            f"data source {source}: chat rows need a chat template, and the tokenizer has none; "
            "set data.chat_template"
        )
    for kind, idx in by_kind.items():
        group = [records[i] for i in idx]
        if kind is Conversation:
            verify = [verify_all or (first + i) % VERIFY_EVERY == 0 for i in idx]
            results: list[Any] = _tokenize_conversations(tokenizer, group, loss_on, template, fast, verify)
            if add_bos:
                if tokenizer.bos_token_id is None:
                    raise DataError("data.add_bos: the tokenizer has no BOS token")
                results = [
                    with_bos(r, tokenizer.bos_token_id) if isinstance(r, TokenizedExample) else r
                    for r in results
                ]
        elif kind is TextRecord:
            results = _tokenize_texts(tokenizer, group)
        else:
            results = [TokenizedExample(list(r.input_ids), list(r.labels)) for r in group]
        for i, res in zip(idx, results):
            out[i] = res
    for i, (r, res) in enumerate(zip(records, out)):
        if isinstance(res, TokenizedExample) and res.num_targets == 0:
            out[i] = BadRecord(r.source, r.line, None, "no target tokens: every label is masked", r.unit)
    return out


def _size(rec: Record) -> int:
    """About how many characters `rec` renders to (token ids count as 4)."""
    if isinstance(rec, TextRecord):
        return len(rec.text)
    if isinstance(rec, Conversation):
        return sum(len(c) if isinstance(c := m.get("content"), str) else len(str(c)) for m in rec.messages)
    return 4 * len(getattr(rec, "input_ids", ()))


def _batches(records: list[Record], chars: int) -> list[tuple[int, int]]:
    """[a, b) ranges of `records`, each of about `chars` characters at most (at least one record)."""
    out, a, size = [], 0, 0
    for k, rec in enumerate(records):
        n = _size(rec)
        if k > a and size + n > chars:
            out.append((a, k))
            a, size = k, 0
        size += n
    return out + [(a, len(records))] if records else out


def encode_text_rows(rows: RawChunk, ctx: ChunkContext, number: int) -> tuple[list, list, list, int]:
    """Chunk `number`'s rows for a text model -> ([(k, file index, line, compact arrays)], [(k, BadRecord)],
    the rows' records, the rows whose tools were dropped), k the row's place in the chunk."""
    records: list[Record] = []
    places: list[tuple[int, int]] = []
    bad: list[tuple[int, BadRecord]] = []
    vocab = len(ctx.tokenizer)
    for k, (f, line, unit, row) in enumerate(rows):
        try:
            if isinstance(row, BadRecord):
                raise row
            columns = ctx.columns
            if ctx.formatting_func is not None:  # the function reads the row's own fields: no renaming after
                row, columns = formatted_row(ctx.formatting_func, row, ctx.files[f], line, unit), None
            records.append(
                to_record(
                    row,
                    ctx.format,
                    ctx.files[f],
                    line,
                    unit=unit,
                    vocab_size=vocab,
                    columns=columns,
                    markers=ctx.markers,
                )
            )
            places.append((k, f))
        except BadRecord as e:
            bad.append((k, e))
    template = ctx.template or ctx.tokenizer.chat_template
    convs = [r for r in records if isinstance(r, Conversation)]
    dropped = (
        handle_tools(convs, template, ctx.tokenizer.special_tokens_map, ctx.tools)
        if convs and isinstance(template, str)
        else 0
    )
    done = []
    for a, b in _batches(records, TOKENIZE_CHARS):  # long rows: the chunk in parts, each compacted at once
        results = tokenize_chunk(
            records[a:b],
            ctx.tokenizer,
            ctx.loss_on,
            ctx.template,
            ctx.source,
            ctx.fast,
            number == 0,
            ctx.add_bos,
            first=a,
        )
        for (k, f), rec, res in zip(places[a:b], records[a:b], results):
            if isinstance(res, BadRecord):
                bad.append((k, res))
            else:
                done.append((k, f, rec.line, compact_example(res, ctx.ids_dtype)))
        del results
    return done, bad, records, dropped


def compact_example(res: TokenizedExample, ids_dtype: str) -> tuple:
    """An example's arrays (example_arrays), its ids already in the entry's compact dtype."""
    i, t, fp, fv = example_arrays(res.input_ids, res.labels)
    return i.astype(ids_dtype), t, fp, fv
