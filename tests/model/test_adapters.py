"""LoRA settings brought from other tools: rsLoRA, trained biases, target_modules as a regular expression."""

from __future__ import annotations

import math

import pytest
import torch

from sftlab.config.schema import PeftSettings
from sftlab.model import adapters


def _lora_layers(wrapped):
    return {n: m for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_a_regex_targets_exactly_the_matching_full_names(tiny_model):
    pattern = r".*layers\.0\.self_attn\.(q|v)_proj"
    wrapped, line = adapters.wrap(tiny_model, PeftSettings(r=2, target_modules=pattern))
    names = sorted(n.rsplit("model.", 1)[-1] for n in _lora_layers(wrapped))
    assert names == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"], names
    assert pattern in line


def test_a_regex_matching_nothing_is_refused_with_the_layer_names(tiny_model):
    with pytest.raises(adapters.AdapterError, match=r"matches no linear layer.*q_proj"):
        adapters.wrap(tiny_model, PeftSettings(r=2, target_modules=r".*nothing_here"))


def test_an_invalid_regex_is_a_config_error():
    with pytest.raises(ValueError, match=r"target_modules\s+Value error, not a valid regular expression"):
        PeftSettings(target_modules="(unclosed")


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model):
    wrapped, line = adapters.wrap(tiny_model, PeftSettings(r=4, alpha=8.0, use_rslora=True))
    scale = next(iter(_lora_layers(wrapped).values())).scaling["default"]
    assert scale == pytest.approx(8.0 / math.sqrt(4)) and scale != pytest.approx(8.0 / 4)
    assert "rsLoRA" in line


def test_bias_all_trains_every_bias_and_none_trains_none():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
    )
    trained = {}
    for bias in ("none", "all"):
        wrapped, _ = adapters.wrap(LlamaForCausalLM(cfg), PeftSettings(r=2, bias=bias))
        trained[bias] = [n for n, p in wrapped.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained["none"] == [] and len(trained["all"]) >= 4


def test_settings_of_a_saved_adapter_keep_the_new_settings(tiny_model):
    wrapped, _ = adapters.wrap(
        tiny_model, PeftSettings(r=2, target_modules=r".*q_proj", use_rslora=True, bias="all")
    )
    settings = adapters.settings_of(wrapped.peft_config["default"])
    assert (settings.target_modules, settings.use_rslora, settings.bias) == (r".*q_proj", True, "all")
