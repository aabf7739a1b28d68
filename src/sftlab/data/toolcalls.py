"""Tool schemas and tool calls as rows write them, in the form chat templates read.

- `function_calls(value)`: a ShareGPT `function_call` turn's value (LLaMA-Factory / glaive:
  `{"name": ..., "arguments": {...}}`, or a list of those) -> OpenAI/transformers `tool_calls`
  entries `{"type": "function", "function": {"name", "arguments": {...}}}`. `arguments` may be an
  object or a JSON string of one (`parameters` is read as its alias, `{"type": "function",
  "function": {...}}` as it is); it always becomes an object, which is what the Qwen2.5 and
  Llama-3.1 templates render with `tojson`. A value that is not such JSON raises `ValueError`
  with the reason (formats.py turns it into a bad row naming `conversations[i].value`).
- `wrapped_tools(tools)`: a bare function schema `{"name", "description", "parameters"}` (how
  glaive/LLaMA-Factory rows store them) becomes `{"type": "function", "function": schema}`, the
  form transformers' `get_json_schema` and the OpenAI API give and the official tool templates were
  written for; schemas already in that form are kept as they are.
"""

from __future__ import annotations

import json
from typing import Any


def _arguments(call: dict[str, Any], k: int) -> dict[str, Any]:
    args = call.get("arguments", call.get("parameters"))
    if args is None:
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"call {k}: `arguments` is a string that is not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"call {k}: `arguments` must be an object (or a JSON string of one), got "
                         f"{type(args).__name__}")
    return args


def function_calls(value: str) -> list[dict[str, Any]]:
    """The tool calls a ShareGPT `function_call` turn holds, as `tool_calls` entries (ValueError: why not)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f'a function_call turn holds JSON {{"name": ..., "arguments": {{...}}}} (or a list of '
                         f"them); this is not JSON: {e.msg} (column {e.colno})") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise ValueError("a function_call turn holds an empty list of calls")
    out = []
    for k, call in enumerate(calls):
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        name = call.get("name") if isinstance(call, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f'call {k}: expected an object {{"name": ..., "arguments": {{...}}}} with a non-empty '
                             f"name, got {json.dumps(call)[:80]}")
        out.append({"type": "function", "function": {"name": name, "arguments": _arguments(call, k)}})
    return out


def wrapped_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bare function schemas wrapped as `{"type": "function", "function": schema}`; others kept."""
    return [{"type": "function", "function": t} if "name" in t and "type" not in t and "function" not in t else t
            for t in tools]
