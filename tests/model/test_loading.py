"""Model loading: local dirs, GGUF resolution, hub ids failing clearly when offline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sftlab.config import ModelConfig
from sftlab.model.loading import ModelLoadError, load_model_and_tokenizer, resolve_model_path


def test_local_dir_loads_float32_without_cache(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert model.config.use_cache is False and tok.pad_token is not None and tok.is_fast


def test_bfloat16_and_eager_options(tiny_model_dir):
    import torch
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16",
                                                    attn_implementation="eager"))
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "x.gguf")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(empty)))


def test_hub_id_offline_fails_with_a_clear_message(tmp_path):
    code = ("from sftlab.config import ModelConfig\n"
            "from sftlab.model.loading import load_model_and_tokenizer, ModelLoadError\n"
            "try:\n    load_model_and_tokenizer(ModelConfig(name_or_path='sftlab-test/no-such-model'))\n"
            "except ModelLoadError as e:\n    print('ERR', e)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("ERR cannot load 'sftlab-test/no-such-model' from the Hugging Face Hub")
    assert "offline" in out


def test_flash_attention_without_cuda_or_package_is_a_clear_error(tmp_path):
    import importlib.util

    import torch

    from sftlab.model.loading import load_model
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is usable here")
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs a CUDA device and the flash-attn"):
        load_model(ModelConfig(name_or_path=str(tmp_path), attn_implementation="flash_attention_2"))
