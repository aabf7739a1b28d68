"""Tool schemas and tool calls as rows write them, in the form chat templates read.

- `function_calls(value)`: a ShareGPT `function_call` turn's value (LLaMA-Factory / glaive:
  `{"name": ..., "arguments": {...}}`, or a list of those) -> OpenAI/transformers `tool_calls`
  entries `{"type": "function", "function": {"name", "arguments": {...}}}`. `arguments` may be an
  object or a JSON string of one (`parameters` is read as its alias, `{"type": "function",
  "function": {...}}` as it is); it always becomes an object, which is what the Qwen2.5 and
  Llama-3.1 templates render with `tojson`. A value that is not such JSON raises `ValueError`
  with the reason (records.py turns it into a bad row naming `conversations[i].value`).
- `wrapped_tools(tools)`: a bare function schema `{"name", "description", "parameters"}` (how
  glaive/LLaMA-Factory rows store them) becomes `{"type": "function", "function": schema}`, the
  form transformers' `get_json_schema` and the OpenAI API give and the official tool templates were
  written for; schemas already in that form are kept as they are.
- `without_nulls(value)`: a tool schema or tool call with every `null` object entry removed, at any
  depth. `datasets`/Arrow merges the structs of all rows, so a row's schema and call arguments get
  the keys of every other row's filled in with None (`"arguments": {"city": "Paris", "amount": null}`);
  the model must never see those. So inside `tools` and `tool_calls` a null entry counts as absent,
  whatever the source (a JSONL row's explicit `"unit": null` argument is dropped too); a null list
  item (`"enum": ["a", null]`) is a value and kept.
- `read_tools_file(path)`: the tool schemas of `sftlab generate|chat --tools FILE`: a JSON file
  holding a list of schemas (wrapped as above); anything else is a DataError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftlab.data.types import DataError


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
        raise ValueError(
            f"call {k}: `arguments` must be an object (or a JSON string of one), got {type(args).__name__}"
        )
    return args


def function_calls(value: str) -> list[dict[str, Any]]:
    """The tool calls a ShareGPT `function_call` turn holds, as `tool_calls` entries (ValueError: why not)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'a function_call turn holds JSON {{"name": ..., "arguments": {{...}}}} (or a list of '
            f"them); this is not JSON: {e.msg} (column {e.colno})"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise ValueError("a function_call turn holds an empty list of calls")
    out = []
    for k, call in enumerate(calls):
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        name = call.get("name") if isinstance(call, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f'call {k}: expected an object {{"name": ..., "arguments": {{...}}}} with a non-empty '
                f"name, got {json.dumps(call)[:80]}"
            )
        out.append({"type": "function", "function": {"name": name, "arguments": _arguments(call, k)}})
    return out


def without_nulls(value: Any) -> Any:
    """`value` with the entries of its objects that are None removed, at any depth (list items kept)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def wrapped_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bare function schemas wrapped as `{"type": "function", "function": schema}`; others kept."""
    return [
        {"type": "function", "function": t} if "name" in t and "type" not in t and "function" not in t else t
        for t in tools
    ]


def read_tools_file(path: str | Path) -> list[dict[str, Any]]:
    """The tool schemas in a JSON file holding a list of them (DataError naming the file otherwise)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"--tools: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--tools {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"--tools {path}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno}); expected a "
            'list of tool schemas, e.g. [{"name": "get_weather", "parameters": {...}}]'
        ) from None
    if not isinstance(tools, list) or not tools:
        what = (
            "one JSON object (put it in [ ])"
            if isinstance(tools, dict)
            else "an empty list"
            if tools == []
            else f"a JSON {type(tools).__name__}"
        )
        raise DataError(f"--tools {path}: expected a non-empty JSON list of tool schemas, got {what}")
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise DataError(
                f"--tools {path}: item {i} is a {type(t).__name__}, not a tool schema (a JSON object)"
            )
    return wrapped_tools(without_nulls(tools))
