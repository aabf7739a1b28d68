"""Whether a chat template renders tools, and what a run does with rows whose tools it would drop.

A row can carry tool schemas (`tools`), assistant `tool_calls` and `tool` results. Many templates
(SmolLM2's, the `chatml` built-in) render none of the first two: the schemas and calls would be
silently lost, and the model trained on answers to calls it never saw. `template_support(template,
special_tokens)` finds out once per template text by rendering probe conversations (cached):

- `tools`: a user message rendered with a probe schema; rendered when its name shows in the text;
- `tool_calls`: an assistant message holding only a probe call; rendered when the call's name and
  its argument value show in the text;
- `tool_results`: a `tool` message between two assistant turns; rendered when its text shows.

A probe the template refuses to render (raises) proves nothing: such rows stay per-row bad records,
as before. `handle_tools(conversations, template, kwargs, policy)` applies `data.tools`: `error`
(the default) raises a run-level DataError at the first row that carries what the template drops,
naming its file and line/row and the fix (a built-in tool template such as `data.chat_template:
chatml_tools`, or a .jinja file); `drop` removes what the template drops (the schemas, the calls; an
assistant message left with neither text nor calls goes too) and returns the number of rows changed,
which the run reports in one warning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sftlab.data.records import Conversation
from sftlab.data.rendering import render
from sftlab.data.types import DataError, TemplateError

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
