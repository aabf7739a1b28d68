"""Loading any model for generate/chat/eval: a checkpoint directory is rebuilt from its stored config and
holds exactly the weights the run had at that step (full, bf16 masters, LoRA); an unfinished run falls back
to its latest checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sftlab.cli import main
from sftlab.config import SFTConfig
from sftlab.trainer.checkpoint import latest_checkpoint
from sftlab.trainer.inference import load_adapter_dir, load_model_dir
from sftlab.trainer.loop import run_training


def run(model_dir, data, out, peft=None, **train):
    cfg = SFTConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": [{"path": str(data)}], "max_seq_length": 256},
            "optim": {"lr": 3e-2 if peft else 3e-3, "warmup_steps": 0},
            "train": {"output_dir": str(out), "micro_batch_size": 4, "max_steps": 2, **train},
            "checkpoint": {"every_steps": 1},
            "peft": peft,
        }
    )
    run_training(cfg)
    return latest_checkpoint(out)


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_a_checkpoint_holds_the_weights_the_run_saved(tiny_model_dir, chat_file, tmp_path, mixed):
    """The last checkpoint is the final model: equal bitwise (bf16 runs: the fp32 masters from optimizer.bin)."""
    out = tmp_path / "run"
    ckpt = run(tiny_model_dir, chat_file, out, mixed_precision=mixed)
    if mixed == "bf16":  # the checkpoint's model file holds bf16 compute copies of the matmul weights
        assert any(t.dtype == torch.bfloat16 for t in load_file(ckpt / "model.safetensors").values())
    model, tok = load_model_dir(ckpt)
    final = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())
    assert tok.chat_template and model.config.use_cache and not model.training


def test_an_unfinished_run_loads_its_latest_checkpoint(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    ckpt = run(tiny_model_dir, chat_file, out, mixed_precision="no")
    final = load_file(out / "model.safetensors")
    for name in ("model.safetensors", "config.json", "FINISHED"):
        (out / name).unlink()
    model, _ = load_model_dir(out)
    assert ckpt.name == "step-00000002"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())


def test_a_lora_checkpoint_is_the_base_plus_its_adapter(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    ckpt = run(
        tiny_model_dir, chat_file, out, peft={"r": 4, "alpha": 8, "dropout": 0.0}, mixed_precision="no"
    )
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))  # only the adapter tensors
    from_ckpt, _ = load_model_dir(ckpt)
    merged, _ = load_adapter_dir(out)  # the run's saved adapter, merged
    a, b = from_ckpt.state_dict(), merged.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.allclose(a[k], base[k]) for k in base)  # the adapter changed the weights


def test_generate_and_eval_from_a_checkpoint_dir(tiny_model_dir, chat_file, tmp_path, capsys):
    ckpt = run(tiny_model_dir, chat_file, tmp_path / "run", mixed_precision="no")
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "Hello!", "--max-new-tokens", "3"]) == 0
    assert main(["eval", str(ckpt), "--data", str(chat_file), "--json"]) == 0
    assert '"loss"' in capsys.readouterr().out


def test_a_directory_without_a_model_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "Hi"]) == 2
    assert "holds no model: no config.json" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["./missing-run", "missing-run/checkpoints/step-2", "~/sftlab-no-such-run"])
def test_a_missing_local_run_is_named_and_never_looked_up_on_the_hub(spec, tmp_path, monkeypatch, no_hub):
    import re
    from pathlib import Path

    from sftlab.model.loading import ModelLoadError

    monkeypatch.chdir(tmp_path)
    for given in (spec, Path(spec)):  # a Path is local even where its str() reads like a hub id
        with pytest.raises(
            ModelLoadError, match=f"model path not found: {re.escape(str(given))}.*never looked up"
        ):
            load_model_dir(given)
    assert no_hub == []
