"""The chat row formats' converters: a row of `messages`, `sharegpt`, `prompt_completion`, `alpaca` or
`dolly` (under the format's field names, fields.Row) -> its list of messages, and its `tools`.

- `messages`: OpenAI-style `[{"role", "content"}]`, roles system/user/assistant/tool, optional
  `tool_calls` on assistant turns and an optional `tools` column for the chat template (a JSON string of the
  list is parsed; bare function schemas are wrapped as `{"type": "function", "function": ...}`; null entries at
  any depth of both are absent, Arrow pads with None: toolcalls.py); their rendering is checked (tool_support.py).
  A content given as a list of text parts is joined; an image part is an `ImageRow`.
- `prompt_completion`: `prompt` and `completion`, each a string or a list of messages.
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`); the user turn is
  `instruction + "\\n\\n" + input` when `input` is non-empty, else `instruction`.
- `dolly` (databricks-dolly-15k): `instruction`, optional `context`, `response`; read as alpaca reads
  instruction, input and output.
- `sharegpt`: `conversations: [{"from", "value"}]`; `from` is human/gpt/system (also user,
  assistant, tool, observation/function_response -> tool); optional `system`, `tools`. A
  `function_call` turn's value is JSON `{"name", "arguments"}` (or a list of them): it becomes an
  assistant message's `tool_calls` (toolcalls.py), joined to the assistant turn right before it
  when there is one (text then calls: one turn), so its target is what the template writes for calls.

formats.py registers these as the formats' converters (READERS).
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.config.fields import ROLES
from sftlab.data.fields import SHAREGPT_ROLES, Row
from sftlab.data.toolcalls import function_calls, without_nulls, wrapped_tools
from sftlab.data.types import ImageRow


def check_messages(r: Row, messages: Any, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise r.bad(field_name, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise r.bad(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise r.bad(f"{where}.role", "missing")
        if role not in ROLES:
            raise r.bad(
                f"{where}.role",
                f"unknown role {role!r} (expected one of {', '.join(ROLES)}; "
                f"map other names in the source's `roles`, e.g. roles: {{{role}: assistant}})",
            )
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", "missing")
        if isinstance(
            content, list
        ):  # OpenAI/HF content parts: text parts joined as the templates render them
            m = {**m, "content": _joined_text_parts(r, content, f"{where}.content")}
            content = m["content"]
        if content is not None and not isinstance(content, str):
            raise r.bad(
                f"{where}.content",
                f"must be a string or a list of content parts, got {type(content).__name__}",
            )
        if role in ("user", "assistant") and not (content or "").strip() and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", f"empty {role} message")
        out.append({k: without_nulls(v) if k == "tool_calls" else v for k, v in m.items() if v is not None})
    return out


IMAGE_PARTS = ("image", "image_url", "input_image")


def _joined_text_parts(r: Row, parts: list, where: str) -> str:
    """`[{"type": "text", "text": ...}, ...]` -> the texts joined (what text templates render of parts);
    LLaMA-Factory v1 files name the text `value` (`{"type": "text", "value": ...}`), read the same.
    An image part is an `ImageRow`: this model path trains text only (reading.py makes the source's
    image rows one error)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text", part.get("value")) if kind == "text" else None
        if isinstance(text, str):
            texts.append(text)
        elif kind in IMAGE_PARTS:
            raise r.bad(
                f"{where}[{j}]",
                f"an {kind} part: images need a vision-language model, and this run "
                "trains a text-only model (drop the image parts, or the rows)",
                ImageRow,
            )
        else:
            raise r.bad(
                f"{where}[{j}]",
                f'must be a content part {{"type": "text", "text": "..."}}, got {str(part)[:60]}',
            )
    return "".join(texts)


def sharegpt_messages(r: Row) -> list[dict[str, Any]]:
    turns = r.get("conversations", list)
    messages = []
    system = r.get("system", str, required=False)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise r.bad(where, f"must be an object with 'from' and 'value', got {type(t).__name__}")
        sender = _sender(t)
        if sender is None:
            raise r.bad(f"{where}.from", "missing")
        role = SHAREGPT_ROLES.get(sender)
        if role is None:
            raise r.bad(
                f"{where}.from",
                f"unknown role {sender!r} (expected one of {', '.join(SHAREGPT_ROLES)}; "
                f"map other names in the source's `roles`, e.g. roles: {{{sender}: assistant}})",
            )
        value = t.get("value") if t.get("value") is not None else t.get("content")
        if value is None:
            raise r.bad(f"{where}.value", "missing")
        if not isinstance(value, str):
            raise r.bad(f"{where}.value", f"must be a string, got {type(value).__name__}")
        if sender != "function_call":
            messages.append({"role": role, "content": value})
            continue
        try:
            calls = function_calls(value)
        except ValueError as e:
            raise r.bad(f"{where}.value", str(e)) from None
        # the calls join the assistant turn right before (its text, or calls made in parallel), else open one
        if (
            i
            and messages[-1]["role"] == "assistant"
            and SHAREGPT_ROLES.get(_sender(turns[i - 1])) == "assistant"
        ):
            messages[-1]["tool_calls"] = messages[-1].get("tool_calls", []) + calls
        else:
            messages.append({"role": "assistant", "tool_calls": calls})
    return check_messages(r, messages, "conversations")


def _sender(turn: dict[str, Any]) -> Any:
    return turn.get("from") if turn.get("from") is not None else turn.get("role")


def alpaca_messages(r: Row) -> list[dict[str, Any]]:
    return _instruction_messages(r, "input", "output", "system")


def dolly_messages(r: Row) -> list[dict[str, Any]]:
    return _instruction_messages(r, "context", "response")


def _instruction_messages(
    r: Row, extra_field: str, answer_field: str, system_field: str | None = None
) -> list[dict[str, Any]]:
    """user: `instruction` (+ "\\n\\n" + the extra field when non-empty), assistant: the answer field."""
    instruction = r.get("instruction", str)
    extra = r.get(extra_field, str, required=False) or ""
    output = r.get(answer_field, str)
    if not instruction.strip():
        raise r.bad("instruction", "empty")
    if not output.strip():
        raise r.bad(answer_field, "empty")
    system = r.get(system_field, str, required=False) if system_field else None
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def prompt_completion_messages(r: Row) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = r.get(key, (str, list))
        if isinstance(value, str):
            if not value.strip():
                raise r.bad(key, f"empty {key}")
            messages.append({"role": role, "content": value})
        else:
            messages.extend(check_messages(r, value, key))
    return messages


def row_tools(r: Row) -> list[dict[str, Any]] | None:
    tools = r.get("tools", (list, str), required=False)
    if isinstance(tools, str):  # ShareGPT exports often store the tool list as a JSON string
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise r.bad("tools", f"invalid JSON string: {e.msg}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise r.bad("tools", "must be a list of tool objects")
    return wrapped_tools(without_nulls(tools)) if tools else None
