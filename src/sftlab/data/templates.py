"""Choosing the chat template: built-in templates, resolving `data.chat_template`, and ChatML tokens.

`resolve_template(spec, tokenizer)` turns the config value into template text: None (the
tokenizer's own), a built-in name (`BUILTIN_TEMPLATES`), or a path to a `.jinja` file.
`load_template(data_cfg, tokenizer)` does the same for a run config (resolved once per run).
`compiled_template` compiles template text as transformers does (cached); `add_chatml_tokens`
prepares a tokenizer without chat tokens for the `chatml` template (the model is resized to match
by `sftlab.model.vocab`).

The built-ins render the reference layout of each family:

- `chatml`:  `<|im_start|>{role}\\n{content}<|im_end|>\\n`, prompt `<|im_start|>assistant\\n`
- `llama3`:  bos, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content, trimmed}<|eot_id|>`
- `tulu`:    `<|{role}|>\\n{content}\\n`; assistant `<|assistant|>\\n{content}{eos}` (+ `\\n` unless last)
- `zephyr`:  `<|{role}|>\\n{content}{eos}\\n`, prompt `<|assistant|>\\n`
- `alpaca`:  for base models: the Alpaca preamble (or the system message), `### Instruction:` and
  `### Response:` sections, each response closed by eos

With tools (rows' `tools`, assistant `tool_calls`, `tool` results), reproducing the official layouts;
without them each renders exactly as its plain variant:

- `chatml_tools`: Qwen2.5 / Hermes: the schemas as JSON lines in `<tools></tools>` in the system turn
  (after the system message), calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
  in the assistant turn (after its text), results as `<tool_response>` blocks in one user turn
  (Qwen2.5's default system prompt is not written: as `chatml`, no system message, no system turn)
- `llama3_tools`: Llama 3.1: `Environment: ipython` and the dates in the system turn, the schemas
  (JSON, indent 4) in the first user message, a call as `{"name": ..., "parameters": ...}<|eot_id|>`,
  results as `ipython` turns

A template that does not render a row's tools is caught before training (rendering.py).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from sftlab.compat import transformers as transformers_compat
from sftlab.config.schema import DataConfig
from sftlab.data.types import DataError, TemplateError

log = logging.getLogger(__name__)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    ),
    "tulu": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|assistant|>\n' + message['content'] + eos_token + ('' if loop.last else '\n') }}"
        "{%- else %}{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
    ),
    "zephyr": (
        "{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
    ),
    "alpaca": (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set preamble = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set preamble = '" + ALPACA_PREAMBLE + "' %}{%- set turns = messages %}{%- endif %}"
        "{{- preamble }}"
        "{%- for message in turns %}"
        "{%- if message['role'] == 'user' %}{{- '\n\n### Instruction:\n' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}{{- '\n\n### Response:\n' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('the alpaca template has no ' + message['role'] + ' role') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '\n\n### Response:\n' }}{%- endif %}"
    ),
}

# Qwen2.5's tool layout (Hermes style) on the `chatml` built-in: without tools, tool calls and tool results
# it renders exactly as `chatml` (no default system prompt; examples/templates/chatml_tools.jinja is the
# same layout with SmolLM2's default system prompt). Tool-call `arguments` may be an object or a JSON string.
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)
BUILTIN_TEMPLATES["chatml_tools"] = (
    r"""
{%- set has_system = messages and messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' + (messages[0].content + '\n\n' if has_system else '') + PREAMBLE }}
    {%- for tool in tools %}{{- '\n' + tool | tojson }}{%- endfor %}
    {{- FORMAT + '<|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' + ('\n' + message.content if message.content else '') }}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif not (loop.first and has_system) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
""".strip()
    .replace("PREAMBLE", repr(_TOOLS_PREAMBLE))
    .replace("FORMAT", repr(_TOOLS_FORMAT))
)

# Llama-3.1's official tool layout on the `llama3` built-in: with tools, the system turn says `Environment:
# ipython` and the dates (`date_string`, default 26 Jul 2024), and the tool schemas (JSON, indent 4) open
# the first user message (`tools_in_user_message=False`: the system turn); a call is
# `{"name": ..., "parameters": {...}}` closed by <|eot_id|> (one call per message, as Llama 3.1 makes them;
# `arguments` an object, or a JSON string written as it is);
# tool results are `ipython` turns, their content JSON-encoded as the official template does. Without tools,
# tool calls and tool results it renders exactly as `llama3`.
_LLAMA_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
    "its value}.Do not use variables.\n\n"
)
BUILTIN_TEMPLATES["llama3_tools"] = r"""
{{- bos_token }}
{%- if tools %}
    {%- set in_user = tools_in_user_message if tools_in_user_message is defined else true %}
    {%- if messages and messages[0].role == 'system' %}
        {%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
    {%- else %}
        {%- set system_message = '' %}
    {%- endif %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: '
        'December 2023\nToday Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\n\n' }}
    {%- if not in_user %}
        {{- 'You have access to the following functions. To call a function, please respond with JSON for a '
            'function call.' + FORMAT }}
        {%- for t in tools %}{{- t | tojson(indent=4) + '\n\n' }}{%- endfor %}
    {%- endif %}
    {{- system_message + '<|eot_id|>' }}
    {%- if in_user %}
        {%- if not messages %}
            {{- raise_exception('llama3_tools puts the tools in the first user message, and there is none') }}
        {%- endif %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a '
            'JSON for a function call with its proper arguments that best answers the given prompt.\n\n' + FORMAT }}
        {%- for t in tools %}{{- t | tojson(indent=4) + '\n\n' }}{%- endfor %}
        {{- messages[0].content | trim + '<|eot_id|>' }}
        {%- set messages = messages[1:] %}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'tool' or message.role == 'ipython' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {{- (message.content | tojson if message.content is mapping or message.content is iterable
             else message.content) + '<|eot_id|>' }}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception('llama3_tools: Llama 3.1 makes one tool call per assistant message') }}
        {%- endif %}
        {%- set call = message.tool_calls[0] %}{%- set fn = call.function if call.function is defined else call %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + fn.name + '", "parameters": '
            + (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim
            + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
""".strip().replace("FORMAT", repr(_LLAMA_FORMAT))


@functools.lru_cache(maxsize=64)
def compiled_template(template: str) -> tuple[jinja2.Template, dict[str, Any]]:
    """The template compiled as transformers compiles it, and its globals as one plain dict."""
    try:
        compiled = transformers_compat.compile_chat_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None
    return compiled, dict(compiled.globals)


def check_template(template: str) -> None:
    """Raise TemplateError when the template does not compile."""
    compiled_template(template)


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def resolve_template(spec: str | None, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The template text for `data.chat_template`: None (the tokenizer's own), a built-in name, or a .jinja path."""
    names = ", ".join(BUILTIN_TEMPLATES)
    if spec is None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template; set data.chat_template to a built-in "
                f"(e.g. data.chat_template: chatml, with data.add_chatml_tokens: true; "
                f"built-ins: {names}) or to a .jinja file"
            )
        try:
            text = tokenizer.get_chat_template()  # a named-template dict resolves to its default
        except ValueError as e:
            raise TemplateError(str(e)) from None
        where = "the tokenizer's chat template"
    elif spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            if path.suffix == ".jinja" or "/" in spec:
                raise TemplateError(f"chat template file not found: {path}")
            raise TemplateError(
                f"unknown chat template {spec!r}: expected a built-in ({names}) or a path to a .jinja file"
            )
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        check_template(text)
    except TemplateError as e:
        raise TemplateError(f"{where}: {e}") from None
    return text


def load_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> str | None:
    """The chat template text for `data.chat_template` (templates.resolve_template); None when it is
    unset and the tokenizer has none (fine for text and pretokenized rows; chat rows then fail)."""
    if cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return resolve_template(cfg.chat_template, tokenizer)
    except TemplateError as e:
        raise DataError(f"data.chat_template: {e}") from None


def add_chatml_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make `<|im_start|>`/`<|im_end|>` special tokens (when missing) and eos `<|im_end|>`.

    Returns the number of tokens added to the vocabulary; the model is sized to match once it is
    loaded (`sftlab.model.vocab.resize_for_new_tokens`).
    """
    missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_added_vocab()]
    before = len(tokenizer)
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    tokenizer.eos_token = CHATML_TOKENS[1]
    added = len(tokenizer) - before
    if added:
        log.warning(
            "added %d ChatML tokens (%s) to the vocabulary; the model's embeddings grow to match, and "
            "with LoRA the embeddings and LM head must be trainable too (peft modules_to_save="
            "['embed_tokens', 'lm_head'])",
            added,
            ", ".join(missing),
        )
    return added
