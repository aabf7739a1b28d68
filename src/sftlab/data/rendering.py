"""Render a conversation with any Jinja chat template, exactly as `apply_chat_template` does.

Templates are compiled once (transformers' cached sandboxed compiler, so the text is exactly what
`apply_chat_template` renders) and rendered directly: `_Renderer` renders prefixes of one
conversation (each once), which is what locating assistant turns (spans.py) works from.

A template that reads add_generation_prompt only in trailing `{% if add_generation_prompt %}`
blocks without an else (`appends_generation_prompt`, from its syntax tree) cannot write final-only
text, and the renderings that look for it are skipped. Templates with `{% generation %}` tags
(`has_generation_tags`) mark assistant text themselves: `_Renderer.with_generation_marks`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2 import nodes

from sftlab.compat import jinja as jinja_compat
from sftlab.compat import transformers as transformers_compat
from sftlab.data.templates import compiled_template
from sftlab.data.types import TemplateError

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
