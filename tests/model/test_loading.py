"""Model loading: local dirs, GGUF resolution, hub ids failing clearly when offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sftlab.config.schema import ModelConfig
from sftlab.model.loading import ModelLoadError, load_model, load_tokenizer, resolve_model_path


def test_local_dir_loads_float32_without_cache(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tok = load_model(cfg), load_tokenizer(cfg)
    assert model.config.use_cache is False and tok.pad_token is not None and tok.is_fast


def test_bfloat16_and_eager_options(tiny_model_dir):
    import torch

    model = load_model(
        ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16", attn_implementation="eager")
    )
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "x.gguf")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(empty)))


@pytest.mark.parametrize(
    "spec", ["./missing", "../missing", "~/sftlab-no-such-model", "/no/such/model", "runs/a/b"]
)
def test_a_local_looking_model_path_is_never_sent_to_the_hub(spec, tmp_path, monkeypatch, no_hub):
    from sftlab.model.loading import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    hub_note = "not found: .*never looked up on the Hugging Face Hub"
    with pytest.raises(ModelLoadError, match="model path " + hub_note):
        resolve_model_path(ModelConfig(name_or_path=spec))
    with pytest.raises(ModelLoadError, match="model.tokenizer: directory " + hub_note):
        load_tokenizer(ModelConfig(tokenizer=spec))
    with pytest.raises(ModelLoadError, match="model path " + hub_note):
        load_tokenizer(ModelConfig(), spec)
    with pytest.raises(ModelLoadError, match="model path " + hub_note):
        load_model(ModelConfig(), spec)
    assert no_hub == []


def test_the_no_hub_fixture_sees_a_hub_id_being_asked(no_hub):
    from sftlab.model.loading import load_tokenizer

    with pytest.raises(Exception):  # noqa: B017 - whatever transformers makes of the refusal
        load_tokenizer(ModelConfig(name_or_path="sftlab-test/no-such-model"))
    assert no_hub  # so an empty list in the test above means the Hub was never asked


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file: a model is a directory"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "weights.bin")))


def test_hub_id_offline_fails_with_a_clear_message(tmp_path):
    code = (
        "from sftlab.config.schema import ModelConfig\n"
        "from sftlab.model.loading import load_model, ModelLoadError\n"
        "try:\n    load_model(ModelConfig(name_or_path='sftlab-test/no-such-model'))\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    ).stdout
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


def test_dtype_auto_is_the_dtype_the_weights_were_saved_in(tiny_model, tokenizer, tmp_path):
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import stored_dtype

    tiny_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_model.to(torch.float16).save_pretrained(tmp_path / "fp16")
    assert stored_dtype(ModelConfig(), str(tmp_path / "bf16")) == "bfloat16"
    assert stored_dtype(ModelConfig(), str(tmp_path / "fp16")) == "float16"


def test_init_kwargs_reach_from_pretrained_and_owned_keys_are_refused(tiny_model_dir):
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), init_kwargs={"num_hidden_layers": 1}))
    assert model.config.num_hidden_layers == 1  # config overrides pass through from_pretrained's kwargs
    with pytest.raises(ValueError, match="init_kwargs.torch_dtype: set by sftlab; use model.dtype"):
        ModelConfig(init_kwargs={"torch_dtype": "bfloat16"})


def test_a_separate_tokenizer_is_loaded_from_model_tokenizer(tiny_model_dir, tmp_path, tokenizer):
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import ModelLoadError, load_tokenizer

    other = tmp_path / "tok"
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), tokenizer=str(other)))
    assert "<extra_token>" in tok.get_vocab()
    with pytest.raises(ModelLoadError, match="model.tokenizer: directory not found"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), tokenizer="./nope"))
