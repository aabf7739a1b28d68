"""transformers' private API as sftlab uses it (transformers 5.23.0)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jinja2
from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices


def compile_chat_template(template: str) -> jinja2.Template:
    """`template` compiled as `apply_chat_template` compiles it (sandboxed environment, transformers' filters,
    globals and extensions such as `{% generation %}`), cached per template string. Raises
    jinja2.TemplateSyntaxError.

    Touches: `transformers.utils.chat_template_utils._compile_jinja_template`. Written against 5.23.0.
    Public alternative: `tokenizer.apply_chat_template(...)` renders but never hands out the template."""
    return _compile_jinja_template(template)


def render_with_generation_marks(
    compiled: jinja2.Template,
    messages: list[dict[str, Any]],
    tools: Any,
    documents: Any,
    add_generation_prompt: bool,
    **kwargs: Any,
) -> tuple[str, list]:
    """(text, [(start, end) character offsets of each `{% generation %}` block]) of a compiled template.

    Touches: `transformers.utils.chat_template_utils._render_with_assistant_indices`. Written against 5.23.0.
    Public alternative: `apply_chat_template(..., return_assistant_tokens_mask=True)`: token masks (of the
    tokenizer's encoding), not character spans."""
    return _render_with_assistant_indices(
        compiled, messages, tools, documents, add_generation_prompt, **kwargs
    )


def cached_file_or_none(path: str, name: str, **hub: Any) -> str | None:
    """The local path of file `name` of the model at `path` (a directory or a Hub id), or None when it has no
    such file or the Hub cannot be reached.

    Touches: the private keywords `_raise_exceptions_for_missing_entries` and
    `_raise_exceptions_for_connection_errors` of `transformers.utils.cached_file`. Written against 5.23.0.
    Public alternative: none for directories and Hub ids alike (`huggingface_hub.hf_hub_download` raises)."""
    from transformers.utils import cached_file

    return cached_file(
        path,
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )


def processor_class_named(name: str) -> Any:
    """The processor class transformers knows by `name` (e.g. "LlavaProcessor"), None when it knows none.

    Touches: `transformers.models.auto.processing_auto.processor_class_from_name` (not exported, undocumented).
    Written against 5.23.0. Public alternative: `getattr(transformers, name, None)` (built-in classes only)."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    return processor_class_from_name(name)


def processor_class_for_config(config: Any) -> Any:
    """The processor class AutoProcessor maps the model config's type to, None when it maps none.

    Touches: `transformers.models.auto.processing_auto.PROCESSOR_MAPPING` (not exported, undocumented).
    Written against 5.23.0. Public alternative: `AutoProcessor.from_pretrained`, which also loads every part."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    return PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None


def load_processor_part(cls: type, part: str, path: str, processor_dict: dict, kwargs: dict) -> Any:
    """Sub-processor `part` ("tokenizer", "image_processor", ...) of processor class `cls`, loaded from `path`
    as `cls.from_pretrained` loads it (ImportError when it needs a backend that is not installed): through a
    subclass of `cls` (built with type(), named like it) whose `get_attributes()` lists `part` alone.

    Touches: `ProcessorMixin._get_arguments_from_pretrained` (a private classmethod that loads every part the
    class's `get_attributes()` lists). Written against 5.23.0.
    Public alternative: `cls.from_pretrained(path)`, which loads all parts at once (one failing fails all)."""
    one = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: [part])})
    return one._get_arguments_from_pretrained(path, processor_dict, **kwargs)[0]


def attn_implementation(config: Any, default: str = "sdpa") -> str:
    """The attention implementation a model's config runs ("sdpa", "eager", a registered name), `default`
    where the config has none.

    Touches: `PretrainedConfig._attn_implementation`. Written against 5.23.0.
    Public alternative: none to read it (`model.set_attn_implementation(name)` sets it)."""
    return getattr(config, "_attn_implementation", default)


def no_split_modules(model: Any) -> Collection[str]:
    """The class names transformers keeps whole when it splits the model (device maps; Accelerate's FSDP
    auto-wrap reads the same attribute): a set on a loaded model in 5.23.0, [] when the model lists none.

    Touches: `PreTrainedModel._no_split_modules`. Written against 5.23.0. Public alternative: none."""
    return getattr(model, "_no_split_modules", None) or []


def forget_quantization(model: Any) -> None:
    """Drop a loaded model's quantization markers (its quantizer and `config.quantization_config`) once its
    weights are plain floats (a dequantized GGUF), so that it saves and trains as a float model.

    Touches: `PreTrainedModel.hf_quantizer` (set by from_pretrained, read by save_pretrained and the training
    checks; not documented). Written against 5.23.0. Public alternative:
    `model.hf_quantizer.remove_quantization_config(model)`, which also deletes `quantization_method` and sets
    `is_quantized = False` (not switched to: it changes more of the model than sftlab did, on a path tested
    only end to end with the real GGUF model)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
