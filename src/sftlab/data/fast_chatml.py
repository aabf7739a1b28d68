"""A direct renderer for ChatML-family chat templates, used only where it is checked identical.

Rendering a conversation through Jinja, and rendering its prefixes to locate every assistant turn
(rendering.py), is a large share of data preparation. Templates of the ChatML family render plain
messages as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, optionally preceded by a default system
block when the first message is not a system message (SmolLM2, Qwen2.5), with the generation
prompt `<|im_start|>assistant\\n`. For such a template the text and the assistant spans follow
directly from the messages.

Where it is used, and how it is checked:
- `tokenize.detect_chatml(template, kwargs)` returns a renderer only for templates without
  `{% generation %}` marks, and only when the template's own output
  equals the direct rendering -- text, generation prompt, and the assistant spans rendering.py
  derives -- on the `probes()` conversations, built to expose differences (leading and trailing whitespace
  and newlines, empty contents, several turns, consecutive roles, with and without a system
  message). Any difference: None, and the template path is used.
- It renders only plain conversations: roles system/user/assistant, string contents, no other
  message keys, no tools, no `<think>` tags. Everything else goes through the template.
- During preparation, every conversation of a source's first chunk and one in `VERIFY_EVERY` after
  it are rendered both ways; a difference raises `FastPathMismatch` and the source is prepared
  again from the start through the template, with a warning (tokenize.py, dataset.py).

The spans follow rendering.py's definition: an assistant turn is its content plus the `<|im_end|>`
that closes it.
"""

from __future__ import annotations

from typing import Any

from sftlab.errors import SftlabError

START, END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = f"{START}assistant\n"
VERIFY_EVERY = 64
_PLAIN_ROLES = ("system", "user", "assistant")

Span = tuple[int, int]


class FastPathMismatch(SftlabError, RuntimeError):
    """The direct renderer disagreed with the chat template on a conversation of the data."""


def _plain(messages: list[dict[str, Any]]) -> bool:
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in _PLAIN_ROLES
            or not isinstance(m.get("content"), str)
        ):
            return False
        if any(k not in ("role", "content") and v is not None for k, v in m.items()):
            return False
        if "<think>" in m["content"] or "</think>" in m["content"]:
            return False
    return bool(messages)


class ChatMLRenderer:
    def __init__(self, default_system: str):
        self.default_system = default_system  # the block added before a first non-system message ("" if none)

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[Span]]:
        """The rendered conversation and the [start, end) span of every assistant turn."""
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0
        if messages[0]["role"] != "system" and self.default_system:
            parts.append(self.default_system)
            pos = len(self.default_system)
        for m in messages:
            head = f"{START}{m['role']}\n"
            body = m["content"] + END
            if m["role"] == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            parts += (head, body, "\n")
            pos += len(head) + len(body) + 1
        return "".join(parts), spans

    def text_and_spans(self, messages: list[dict[str, Any]], loss_on: str) -> tuple[str, list[Span]] | None:
        """(text, spans) for `loss_on` as rendering.py defines them, or None: not a plain conversation
        (or a case the template path must judge, such as a completion that does not end the conversation)."""
        if not _plain(messages):
            return None
        text, spans = self.render(messages)
        if loss_on == "all":
            return text, []
        if not spans or (loss_on == "completion" and messages[-1]["role"] != "assistant"):
            return None
        return text, spans if loss_on == "assistant" else spans[-1:]


def probes() -> list[list[dict[str, str]]]:
    """Conversations built to expose a template that renders plain messages other than ChatML does."""

    def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in pairs]

    tricky = [
        "  leading spaces",
        "trailing spaces  ",
        "\nleading newline",
        "trailing newline\n",
        "\n\n",
        "",
        " both \n",
        "tab\there",
        "a<|im_end|>b",
        "{{ not jinja }}",
        "x" * 300,
    ]
    probes = [
        msgs(("user", "Hi"), ("assistant", "Hello!")),
        msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
        msgs(("system", ""), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
        msgs(("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d")),
        msgs(("user", "q"), ("assistant", "a"), ("user", "only a question")),
        msgs(("system", "s"), ("system", "t"), ("assistant", "first"), ("user", "u"), ("assistant", "v")),
    ]
    for k, t in enumerate(tricky):
        other = tricky[(k + 3) % len(tricky)]
        probes.append(
            msgs(("system", t), ("user", other), ("assistant", t), ("user", t), ("assistant", other))
        )
        probes.append(msgs(("user", t), ("assistant", t)))
    return probes
