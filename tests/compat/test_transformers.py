"""compat/transformers.py against the installed transformers, on tiny real objects: the chat-template compiler and
its `{% generation %}` renderer, `cached_file`'s private keywords, the processor-class lookups, the one-part
processor load, `config._attn_implementation`, `_no_split_modules` and `hf_quantizer`."""

from __future__ import annotations

import json
import types

import jinja2
import pytest
from conftest import CHATML_TEMPLATE, CONVERSATIONS, build_model, build_tokenizer
from transformers import AutoImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor
from vlm_families import save_family

from sftlab.compat import jinja as jinja_compat
from sftlab.compat import transformers as transformers_compat

GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
)


def test_compile_chat_template_renders_what_apply_chat_template_renders():
    compiled = transformers_compat.compile_chat_template(CHATML_TEMPLATE)
    assert isinstance(compiled, jinja2.Template)
    assert transformers_compat.compile_chat_template(CHATML_TEMPLATE) is compiled  # cached per string
    tok = build_tokenizer()
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            variables = {
                **compiled.globals,
                "messages": messages,
                "add_generation_prompt": prompt,
                "tools": None,
                "documents": None,
            }
            assert jinja_compat.render_shared(compiled, variables) == tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
    with pytest.raises(jinja2.TemplateSyntaxError):
        transformers_compat.compile_chat_template("{% for m in messages %}")


def test_render_with_generation_marks_gives_the_assistant_spans():
    compiled = transformers_compat.compile_chat_template(GENERATION_TEMPLATE)
    messages = CONVERSATIONS[2]
    text, marks = transformers_compat.render_with_generation_marks(compiled, messages, None, None, False)
    tok = build_tokenizer(GENERATION_TEMPLATE)
    assert text == tok.apply_chat_template(messages, tokenize=False)
    spans = [text[s:e] for s, e in marks if e > s]
    assert spans == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_cached_file_or_none(tmp_path):
    d = save_family("llava", tmp_path / "llava")
    found = transformers_compat.cached_file_or_none(str(d), "processor_config.json")
    assert found is not None and json.loads(open(found).read())["processor_class"] == "LlavaProcessor"
    assert transformers_compat.cached_file_or_none(str(d), "video_preprocessor_config.json") is None


def test_processor_class_lookups():
    assert transformers_compat.processor_class_named("LlavaProcessor") is LlavaProcessor
    assert transformers_compat.processor_class_named("NoSuchProcessor") is None
    assert transformers_compat.processor_class_for_config(LlavaConfig()) is LlavaProcessor
    assert transformers_compat.processor_class_for_config(LlamaConfig()) is None


def test_load_processor_part_loads_one_part_as_from_pretrained_does(tmp_path):
    d = str(save_family("llava", tmp_path / "llava"))
    assert hasattr(LlavaProcessor, "_get_arguments_from_pretrained")
    processor_dict, _ = LlavaProcessor.get_processor_dict(d)
    whole = LlavaProcessor.from_pretrained(d)
    images = transformers_compat.load_processor_part(LlavaProcessor, "image_processor", d, processor_dict, {})
    assert type(images) is type(whole.image_processor) is type(AutoImageProcessor.from_pretrained(d))
    assert images.to_dict() == whole.image_processor.to_dict()
    tokenizer = transformers_compat.load_processor_part(LlavaProcessor, "tokenizer", d, processor_dict, {})
    assert tokenizer.get_vocab() == whole.tokenizer.get_vocab()


def test_attn_implementation():
    model = build_model(64)
    assert transformers_compat.attn_implementation(model.config) == model.config._attn_implementation
    assert transformers_compat.attn_implementation(model.config) in ("sdpa", "eager")
    model.set_attn_implementation("eager")
    assert transformers_compat.attn_implementation(model.config) == "eager"
    assert transformers_compat.attn_implementation(types.SimpleNamespace()) == "sdpa"


def test_no_split_modules():
    model = build_model(64)
    assert set(transformers_compat.no_split_modules(model)) == {"LlamaDecoderLayer"}
    assert set(transformers_compat.no_split_modules(model)) <= {type(m).__name__ for m in model.modules()}
    assert list(transformers_compat.no_split_modules(types.SimpleNamespace())) == []


def test_forget_quantization_lets_a_marked_model_save_as_float(tmp_path):
    model = build_model(64)
    assert getattr(model, "hf_quantizer", None) is None
    model.hf_quantizer = types.SimpleNamespace(
        quantization_config=types.SimpleNamespace(quant_method="gguf"), is_serializable=lambda: False
    )
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="quantized"):  # save_pretrained reads model.hf_quantizer
        model.save_pretrained(tmp_path / "refused")
    transformers_compat.forget_quantization(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
