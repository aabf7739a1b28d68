"""The chat template rendered exactly: a conversation's text, the character span of each assistant turn,
and which of a row's tools the template renders.

`render(template, messages, ...)` renders a conversation as `apply_chat_template(..., tokenize=False)`
does. Templates are compiled once (templates.compiled_template: transformers' cached sandboxed compiler, so
the text is exactly what `apply_chat_template` renders) and rendered directly: `_Renderer` renders prefixes
of one conversation, each once, which is what locating the assistant turns works from.

`assistant_spans(template, messages, ...)` returns the rendered text and the [start, end) character span of
every assistant turn: its text plus the end-of-turn marker that closes it (e.g. `<|im_end|>`). A turn is
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True), right-stripped. Templates
that render history differently from the latest turn are handled exactly where the difference is of a
known kind, and refused (`TemplateError`) otherwise, never guessed:

- text written after the final message only, where the generation prompt would go (Phi-3 writes
  eos when add_generation_prompt is false): it is part of no turn. A turn then ends where its
  *history form* ends: render(messages[:i+1], add_generation_prompt=True) minus the generation
  prompt (render(messages[:i], True) past where it parts from render(messages[:i])). Where the
  final-only text and the prompt begin alike (`<|` of `<|endoftext|>` and `<|assistant|>`), the
  point where they part moves back to the start of the tokenizer's added token it falls in (the
  `atoms`). Where the final-only text from there is exactly one added token (an eos such as
  `<|im_end|>` or `<|endoftext|>`), that is where it begins, whatever the prompt begins with; where
  they share text that is no added token and the final-only text is more than one added token, it
  cannot be told and is refused;
- the final turn is closed differently from the same turn in history (gpt-oss ends it with
  `<|return|>`, not `<|end|>`, and keeps its reasoning only there): earlier turns are located in
  their history form, the final one runs to the end of the rendering;
- the generation prompt is not a prefix of the rendered turn (it opens a reasoning block that
  history lacks, or the template adds a default system prompt before the first message): the
  turn starts after the part of the generation prompt that the rendered turn shares;
- a turn is rendered without a leading part once later messages follow (Qwen3 drops the
  `<think>` reasoning of turns before the last user query): the span is the part history keeps,
  which must still hold the turn's answer and tool-call names;
- text before a turn renders differently (an earlier turn was rewritten): the turn is anchored
  on the end of the previous assistant turn, or found where its exact text occurs exactly once.

A template that reads add_generation_prompt only in trailing `{% if add_generation_prompt %}` blocks
without an else (`appends_generation_prompt`, from its syntax tree) appends its generation prompt and does
nothing else with the flag: it cannot write final-only text, and the renderings that look for it are
skipped. Templates with `{% generation %}` tags (`has_generation_tags`) mark assistant text themselves
(`_Renderer.with_generation_marks`); their marks are used as they are, so masks equal transformers'
`return_assistant_tokens_mask`.

A row can carry tool schemas (`tools`), assistant `tool_calls` and `tool` results. Many templates (SmolLM2's,
the `chatml` built-in) render none of the first two: the schemas and calls would be silently lost, and the
model trained on answers to calls it never saw. `template_support(template, special_tokens)` finds out once
per template text by rendering probe conversations (cached):

- `tools`: a user message rendered with a probe schema; rendered when its name shows in the text;
- `tool_calls`: an assistant message holding only a probe call; rendered when the call's name and
  its argument value show in the text;
- `tool_results`: a `tool` message between two assistant turns; rendered when its text shows.

A probe the template refuses to render (raises) proves nothing: such rows stay per-row bad records.
`handle_tools(conversations, template, kwargs, policy)` applies `data.tools` before the conversations are
tokenized: `error` (the default) raises a run-level DataError at the first row that carries what the
template drops, naming its file and line/row and the fix (a built-in tool template such as
`data.chat_template: chatml_tools`, or a .jinja file); `drop` removes what the template drops (the
schemas, the calls; an assistant message left with neither text nor calls goes too) and returns the number
of rows changed, which the run reports in one warning.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes

from sftlab.compat import jinja as jinja_compat
from sftlab.compat import transformers as transformers_compat
from sftlab.data.records import Conversation
from sftlab.data.templates import compiled_template
from sftlab.data.types import DataError, TemplateError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers uses
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_PROMPT_FLAG = "add_generation_prompt"

Span = tuple[int, int]
Tools = list[dict[str, Any]] | None
Atoms = Sequence[str]  # texts the tokenizer never splits (its added tokens): `<|end|>`, `<|assistant|>`


def has_generation_tags(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def _prepare(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `apply_chat_template` hands the template: keys with None values dropped, reasoning aliased."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _needs_prompt_flag(test: nodes.Node) -> bool:
    """Whether an `{% if %}` test is false whenever `add_generation_prompt` is: the flag, or the flag `and` more."""
    if isinstance(test, nodes.Name):
        return test.name == _PROMPT_FLAG
    return isinstance(test, nodes.And) and (_needs_prompt_flag(test.left) or _needs_prompt_flag(test.right))


def _prompt_block(node: nodes.Node) -> bool:
    """Whether `node` is an `{% if add_generation_prompt [and ...] %}` block without elif or else."""
    return isinstance(node, nodes.If) and not node.elif_ and not node.else_ and _needs_prompt_flag(node.test)


def _flag_reads(node: nodes.Node) -> int:
    """How many times `node` and what it holds name `add_generation_prompt`."""
    names = [node, *node.find_all(nodes.Name)] if isinstance(node, nodes.Name) else node.find_all(nodes.Name)
    return sum(1 for name in names if name.name == _PROMPT_FLAG)


@functools.lru_cache(maxsize=64)
def appends_generation_prompt(template: str) -> bool:
    """Whether the template provably renders the generation prompt by appending it and by nothing else:
    it reads `add_generation_prompt` only in the tests of trailing `{% if add_generation_prompt [and ...] %}`
    blocks without an else. Then text written after the final message only cannot exist, and the
    renderings that would show it are skipped (read from the template's syntax tree, once per template)."""
    compiled, _ = compiled_template(template)
    try:
        body = compiled.environment.parse(template).body
    except jinja2.TemplateError:
        return False
    tail = len(body)
    while tail and _prompt_block(body[tail - 1]):
        tail -= 1
    return sum(map(_flag_reads, body)) == sum(_flag_reads(node.test) for node in body[tail:])


class _Renderer:
    """Renders prefixes of one conversation with a compiled template (each prefix once).

    Equivalent to `Template.render`, without re-merging the template globals on every call. `atoms`:
    the tokenizer's added tokens, where a boundary between renderings must fall between tokens.
    """

    def __init__(
        self,
        template: str,
        messages: list[dict[str, Any]],
        tools: Tools,
        kwargs: dict[str, Any],
        atoms: Atoms = (),
    ):
        self.compiled, template_globals = compiled_template(template)
        self.messages, self.tools, self.kwargs, self.atoms = _prepare(messages), tools, kwargs, atoms
        self.variables = {**template_globals, **kwargs, "tools": tools, "documents": None}
        self.rendered: dict[tuple[int, bool], str] = {}
        self.prompt_appended = appends_generation_prompt(template)

    def __call__(self, n: int, generation_prompt: bool = False) -> str:
        """The first `n` messages, rendered."""
        key = (n, generation_prompt)
        if key not in self.rendered:
            variables = {
                **self.variables,
                "messages": self.messages[:n],
                "add_generation_prompt": generation_prompt,
            }
            try:
                self.rendered[key] = jinja_compat.render_shared(self.compiled, variables)
            except (jinja2.TemplateError, TypeError) as e:
                raise TemplateError(f"the chat template cannot render this conversation: {e}") from None
        return self.rendered[key]

    def with_generation_marks(self) -> tuple[str, list[Span]]:
        """The whole conversation and the spans its `{% generation %}` blocks cover."""
        try:
            text, marks = transformers_compat.render_with_generation_marks(
                self.compiled, self.messages, self.tools, None, False, **self.kwargs
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise TemplateError(f"the chat template cannot render this conversation: {e}") from None
        return text, [(s, e) for s, e in marks if e > s]


def render(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: Tools = None,
    **kwargs: Any,
) -> str:
    """Render a conversation as `apply_chat_template(..., tokenize=False)` does (pass special tokens in kwargs)."""
    return _Renderer(template, messages, tools, kwargs)(len(messages), add_generation_prompt)


# --- the character span of each assistant turn ------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of a and b (compares slices, so the work is done in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _atom_start(text: str, at: int, atoms: Atoms) -> int:
    """`at`, or the start of the earliest atom occurrence in `text` that straddles it."""
    start = at
    for atom in atoms:
        j = text.find(atom, max(0, at - len(atom) + 1), at + len(atom) - 1)
        if 0 <= j < start:
            start = j
    return start


def _opens_with_atom(text: str, at: int, atoms: Atoms) -> bool:
    """Whether `text` from `at` opens (after blanks) with an atom."""
    return text[at:].lstrip().startswith(tuple(atoms))


def _divergence(a: str, b: str, atoms: Atoms) -> int | None:
    """Where two renderings of the same messages part, or None where that point cannot be told exactly.

    The end of their common prefix when one is a prefix of the other. Otherwise both go on with text
    of their own (say an eos token, and a generation prompt), and the characters those texts begin
    with alike (`<|` of `<|endoftext|>` and `<|assistant|>`) look shared: the point moves back to the
    start of an atom that straddles it. It holds where what `a` writes from there (the text after the
    final message only) is exactly one atom, an eos: an atom is never split, so the text cannot begin
    later, and the tokens before it are the history's. Otherwise it holds only where both texts then
    open with an atom.
    """
    n = _common_prefix(a, b)
    if n in (len(a), len(b)):
        return n
    while (back := min(_atom_start(a, n, atoms), _atom_start(b, n, atoms))) < n:
        n = back
    if (
        not a[n:].strip() or not b[n:].strip()
    ):  # what only one of them writes is blank: it is not part of a turn
        return n
    if a[n:] in atoms:  # `a` ends with one added token of its own (eos after the final message)
        return n
    return n if _opens_with_atom(a, n, atoms) and _opens_with_atom(b, n, atoms) else None


def _history_end(r: _Renderer, k: int) -> int | None:
    """Length of the first k messages' rendering without what the template writes after the final
    message only (an eos token, written where a generation prompt would go); None: cannot tell."""
    return len(r(k)) if r.prompt_appended else _divergence(r(k), r(k, True), r.atoms)


def _as_history(r: _Renderer, i: int) -> str | None:
    """Messages 0..i rendered as the history of a longer conversation; None where the template gives no
    such rendering (TemplateError where it does, but its end cannot be told exactly).

    That is the rendering followed by the generation prompt (the one of assistant message i), with the
    prompt cut off again: without any text written after the final message only, and with message i
    closed as a turn in history is (`<|end|>` where the final turn ends `<|return|>`).
    """
    try:
        end = _history_end(r, i)
    except TemplateError:  # e.g. a template that cannot render an empty conversation
        return None
    if end is None:
        raise TemplateError(
            f"assistant message {i}: the template writes text after the final message only, "
            "and where it begins cannot be told exactly (it begins like the generation prompt, "
            "is more than one of the tokenizer's added tokens, and it and the prompt do not both "
            "begin with one)"
        )
    prompt, continued = r(i, True)[end:], r(i + 1, True)
    return continued[: len(continued) - len(prompt)] if continued.endswith(prompt) else None


def _rendered_turn(r: _Renderer, full: str, i: int) -> str:
    """Messages 0..i rendered as the full text holds them, ending where assistant message i ends."""
    if i < len(r.messages) - 1:
        turn = r(i + 1)
        if full.startswith(turn) or r.prompt_appended:
            return turn
        # the rendering may end differently once later messages follow: its history form, where known
        history = _as_history(r, i)
        return turn if history is None else history
    if r.prompt_appended or r(i + 1, True).startswith(full):
        return full  # nothing is written after the final message only
    history = _as_history(r, i)
    if history is None:
        raise TemplateError(
            f"assistant message {i}: the template renders the final message differently with "
            "a generation prompt after it, and gives no history form to compare with"
        )
    # the full text is the history form plus a suffix written after the final message only (an eos);
    # or else the final turn is closed differently (`<|return|>` for `<|end|>`), and runs to the end
    return history if full.startswith(history) else full


def _turn_start(r: _Renderer, i: int, prompt: str, turn: str) -> int:
    """Where assistant message i's own text starts in `turn` (= the first i+1 messages rendered)."""
    if turn.startswith(prompt):
        return len(prompt)
    # The generation prompt is not a prefix of the rendered turn: it opens a block history lacks
    # (e.g. "<think>\n"), or the template renders text before the first message that an empty
    # prompt lacks (a default system prompt, bos). The turn starts after the opener, or after the
    # part of it that the turn shares (what the model is given when it generates this turn).
    before = r(i)
    if not (prompt.startswith(before) and turn.startswith(before)):
        raise TemplateError(
            f"assistant message {i}: the generation prompt does not match the rendered history"
        )
    opener = prompt[len(before) :]
    at = turn.find(opener, len(before)) if opener else -1
    if at >= 0:
        return at + len(opener)
    shared = _common_prefix(opener, turn[len(before) :])
    if not shared:
        raise TemplateError(
            f"assistant message {i}: the rendered turn does not start with the generation prompt"
        )
    return len(before) + shared


def _visible_parts(msg: dict[str, Any]) -> list[str]:
    """Texts of an assistant message that any rendering of it must show: the answer and tool-call names."""
    content = msg.get("content")
    parts = [content.split("</think>")[-1].strip()] if isinstance(content, str) else []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        parts.append(str(fn.get("name") or ""))
    return [p for p in parts if p]


def _kept_length(full: str, start: int, piece: str, msg: dict[str, Any], i: int) -> int:
    """How much of the turn `piece` the full rendering keeps at `start`: all of it, or a suffix."""
    if full.startswith(piece, start):
        return len(piece)
    # History renders the turn without a leading part (e.g. its <think> block): the longest suffix
    # of the turn found at `start` is what the model sees there.
    j = piece.find(full[start : start + 1], 1) if start < len(full) else -1
    while j > 0 and not full.startswith(piece[j:], start):
        j = piece.find(full[start], j + 1)
    kept = piece[j:] if j > 0 else ""
    if not kept or any(p not in kept for p in _visible_parts(msg)):
        raise TemplateError(
            f"assistant message {i}: the template renders it differently once later messages "
            "follow, in a way that cannot be masked exactly (only a dropped leading part, such "
            "as earlier reasoning, is supported)"
        )
    return len(kept)


def _start_in_full(full: str, before: str, cursor: int, previous: str | None, piece: str, i: int) -> int:
    """Start of turn i in `full` when the text before it renders differently there."""
    if previous is not None:
        # anchor on the end of the previous assistant turn: what follows it up to this turn is the same
        at = before.rfind(previous)
        if at >= 0:
            gap = before[at + len(previous) :]
            if full.startswith(gap, cursor):
                return cursor + len(gap)
    if full.count(piece, cursor) == 1:  # the turn's exact text, found once after the previous turn
        return full.index(piece, cursor)
    raise TemplateError(
        f"assistant message {i}: cannot locate it in the rendered conversation (the template "
        "renders earlier messages differently once later ones follow)"
    )


def _span_in(r: _Renderer, full: str, i: int, turn: str, cursor: int, previous: str | None) -> Span:
    """The [start, end) span of assistant message i in the full rendering, from `turn`: messages 0..i
    rendered, ending where message i ends."""
    head = _turn_start(r, i, r(i, True), turn)
    piece = turn[head:].rstrip()
    if not piece:
        raise TemplateError(f"assistant message {i} renders as nothing")
    if full.startswith(turn):
        start, end = head, head + len(piece)
    else:
        start = (
            head
            if full.startswith(turn[:head])
            else _start_in_full(full, turn[:head], cursor, previous, piece, i)
        )
        end = start + _kept_length(full, start, piece, r.messages[i], i)
    if start < cursor:
        raise TemplateError(f"assistant message {i}: its rendered text overlaps the previous assistant turn")
    return start, end


def _locate(r: _Renderer, full: str, i: int, cursor: int, previous: str | None) -> Span:
    """The [start, end) span of assistant message i in the full rendering."""
    return _span_in(r, full, i, _rendered_turn(r, full, i), cursor, previous)


def _last_marks(r: _Renderer, full: str, spans: list[Span], last: int) -> list[Span]:
    """The `{% generation %}` marks of assistant message `last`: those after everything before it."""
    end = _history_end(r, last)
    if end is None or not full.startswith(r(last)[:end]) or any(s < end < e for s, e in spans):
        raise TemplateError("cannot tell the last assistant turn's marks from earlier ones")
    return [s for s in spans if s[0] >= end]


def assistant_spans(
    template: str,
    messages: list[dict[str, Any]],
    tools: Tools = None,
    template_kwargs: dict[str, Any] | None = None,
    last_only: bool = False,
    atoms: Atoms = (),
) -> tuple[str, list[Span]]:
    """Render the conversation; return the text and the [start, end) character span of each assistant turn
    (only the last one with `last_only`). `template_kwargs` should hold the tokenizer's special tokens,
    `atoms` its added tokens (needed where a template writes text after the final message only)."""
    r = _Renderer(template, messages, tools, template_kwargs or {}, atoms)
    turns = [i for i, m in enumerate(r.messages) if m.get("role") == "assistant"]
    if not turns:
        raise TemplateError("the conversation has no assistant message")
    if has_generation_tags(template):
        full, spans = r.with_generation_marks()
        return full, _last_marks(r, full, spans, turns[-1]) if last_only else spans
    full = r(len(r.messages))
    if last_only:
        try:
            return full, [_locate(r, full, turns[-1], 0, None)]
        except TemplateError:
            pass  # the last turn needs its predecessors as anchors: locate them all
    spans: list[Span] = []
    cursor, previous = 0, None
    for i in turns:
        start, end = _locate(r, full, i, cursor, previous)
        spans.append((start, end))
        cursor, previous = end, full[start:end]
    return full, spans[-1:] if last_only else spans


# --- which of a row's tools the template renders, and data.tools -------------------------------------


PROBE_NAME = "sftlab_probe_tool"
PROBE_VALUE = "sftlab-probe-value"
PROBE_RESULT = "sftlab-probe-result"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": PROBE_NAME,
        "description": "probe",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}
_PROBE_CALL = {"type": "function", "function": {"name": PROBE_NAME, "arguments": {"q": PROBE_VALUE}}}
TOOL_TEMPLATES = ("chatml_tools", "llama3_tools")
FIX = (
    f"set data.chat_template to a template that renders tools: a built-in ({', '.join(TOOL_TEMPLATES)}, e.g. "
    "data.chat_template: chatml_tools) or a .jinja file; or set data.tools: drop to train without them"
)


@dataclass(frozen=True)
class ToolSupport:
    """What a template renders (True), drops (False) or refuses to render (None: cannot tell)."""

    tools: bool | None
    tool_calls: bool | None
    tool_results: bool | None


def _shows(
    template: str,
    messages: list[dict[str, Any]],
    needles: tuple[str, ...],
    kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> bool | None:
    try:
        text = render(template, messages, tools=tools, **kwargs)
    except TemplateError:
        return None
    return all(n in text for n in needles)


@functools.lru_cache(maxsize=64)
def _support(template: str, kwargs_items: tuple[tuple[str, str], ...]) -> ToolSupport:
    kwargs = dict(kwargs_items)
    user = {"role": "user", "content": "Hello!"}
    return ToolSupport(
        tools=_shows(template, [user], (PROBE_NAME,), kwargs, [_PROBE_TOOL]),
        tool_calls=_shows(
            template,
            [user, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
            (PROBE_NAME, PROBE_VALUE),
            kwargs,
        ),
        tool_results=_shows(
            template,
            [
                user,
                {"role": "assistant", "content": "Let me look."},
                {"role": "tool", "content": PROBE_RESULT},
                {"role": "assistant", "content": "Done."},
            ],
            (PROBE_RESULT,),
            kwargs,
        ),
    )


def template_support(template: str, special_tokens: dict[str, Any] | None = None) -> ToolSupport:
    """What `template` does with tools, tool calls and tool results (rendered once per template text)."""
    items = tuple(sorted((k, v) for k, v in (special_tokens or {}).items() if isinstance(v, str)))
    return _support(template, items)


def dropped_parts(conv: Conversation, support: ToolSupport) -> list[str]:
    """What of this conversation the template would drop, by kind: its tool schemas, calls and results."""
    calls = [f"messages[{i}]" for i, m in enumerate(conv.messages) if m.get("tool_calls")]
    results = [f"messages[{i}]" for i, m in enumerate(conv.messages) if m.get("role") == "tool"]
    parts = ["tool schemas (`tools`)"] if conv.tools and support.tools is False else []
    if calls and support.tool_calls is False:
        parts.append(
            f"tool calls (`tool_calls` of {', '.join(calls[:3])}{', ...' if len(calls) > 3 else ''})"
        )
    if results and support.tool_results is False:
        parts.append(f"tool results ({', '.join(results[:3])}{', ...' if len(results) > 3 else ''})")
    return parts


def _without_dropped(conv: Conversation, support: ToolSupport) -> None:
    if support.tools is False:
        conv.tools = None
    kept = []
    for m in conv.messages:
        if m.get("role") == "tool" and support.tool_results is False:
            continue
        if m.get("tool_calls") and support.tool_calls is False:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            if not (m.get("content") or "").strip():
                continue
        kept.append(m)
    conv.messages = kept


def handle_tools(
    conversations: list[Conversation], template: str, special_tokens: dict[str, Any], policy: str
) -> int:
    """Apply `data.tools` (`error` | `drop`) to conversations whose tools the template drops; returns the
    number of rows changed (`drop`), or raises DataError at the first such row (`error`)."""
    support = template_support(template, special_tokens)
    if all(v is not False for v in (support.tools, support.tool_calls, support.tool_results)):
        return 0
    changed = 0
    for conv in conversations:
        parts = dropped_parts(conv, support)
        if not parts:
            continue
        if policy != "drop":
            where = f"{conv.source}:{conv.line}" if conv.unit == "line" else f"{conv.source} row {conv.line}"
            raise DataError(
                f"{where}: the row has {' and '.join(parts)}, which the chat template does not render "
                f"(the model would never see them). {FIX[0].upper() + FIX[1:]}"
            )
        _without_dropped(conv, support)
        changed += 1
    return changed
