"""LoRA / DoRA / QLoRA runs end to end on a tiny model: only the adapter trains, its files load with
plain peft, merging is exact, resume after SIGKILL is bitwise, NEFTune acts in training only."""

from __future__ import annotations

import importlib.util
import json
import signal

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_checkpoint import EXACT, cfg_tree, metrics, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.cli import main as cli_main
from sftlab.config import SFTConfig
from sftlab.model import adapters
from sftlab.trainer.checkpoint import latest_checkpoint
from sftlab.trainer.loop import run_training

PEFT = {"r": 4, "alpha": 8, "dropout": 0.0}


def lora_cfg(model_dir, data, out, peft=None, **train) -> SFTConfig:
    return SFTConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": [{"path": str(data)}], "eval_fraction": 0.25, "max_seq_length": 256},
            "optim": {"lr": 3e-2, "warmup_steps": 0},
            "train": {
                "output_dir": str(out),
                "micro_batch_size": 12,
                "grad_accum_steps": 1,
                "max_steps": 6,
                "mixed_precision": "no",
                **train,
            },
            "peft": {**PEFT, **(peft or {})},
        }
    )


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.tensor([[1, 17, 42, 99, 120, 7, 2]])


def test_only_the_adapter_trains_and_its_files_load_with_plain_peft(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    res = run_training(lora_cfg(tiny_model_dir, chat_file, out, peft={"merge_on_save": True}))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # nothing of the frozen base
    assert not (out / "model.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 4 and cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny_model_dir)
    )

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    with_adapter = PeftModel.from_pretrained(base, out)  # plain peft
    assert all(
        torch.equal(untouched[k], v)
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        .state_dict()
        .items()
    )
    adapted = logits(with_adapter, IDS)
    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), IDS)
    assert not torch.allclose(adapted, plain)  # the adapter changes the model
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)  # no peft needed
    torch.testing.assert_close(logits(merged, IDS), adapted, atol=1e-5, rtol=1e-5)

    # sftlab export and the inference loader give the same merged model
    assert cli_main(["export", str(out), "--merge", "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    torch.testing.assert_close(logits(exported, IDS), adapted, atol=1e-5, rtol=1e-5)
    assert cli_main(["generate", str(out), "--prompt", "Hello!", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_base_weights_are_bitwise_untouched_in_training(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, precision
):
    """Every tensor of the merged model the adapter does not touch (the embeddings, the norms) equals the
    loaded base bitwise, in fp32 and under bf16 mixed precision. The frozen base in memory after training is
    the loaded one, except that under bf16 autocast its linear weights are held as their bf16 rounding (the
    product autocast computes from the fp32 weight): the merged model reloads the base from disk."""
    from sftlab.trainer import outputs

    seen = {}
    real = outputs.save_adapter_run

    def spy(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_adapter_run", spy)
    run_training(
        lora_cfg(
            tiny_model_dir,
            chat_file,
            tmp_path / "run",
            peft={"dropout": 0.1, "merge_on_save": True},
            mixed_precision=precision,
        )
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    trained = seen["model"].get_base_model().state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert set(frozen) == set(base)
    rounded = {k for k in base if "proj" in k} if precision == "bf16" else set()
    expected = {k: v.to(torch.bfloat16).float() if k in rounded else v for k, v in base.items()}
    assert [k for k in base if not torch.equal(frozen[k].float(), expected[k])] == []
    assert precision == "no" or [k for k in rounded if not torch.equal(frozen[k].float(), base[k])]
    merged = load_file(tmp_path / "run" / "merged" / "model.safetensors")
    untouched = [k for k in merged if "proj" not in k]
    assert untouched and [k for k in untouched if not torch.equal(merged[k], base[k])] == []


def test_a_bf16_exact_frozen_base_trains_in_bf16_without_weight_gradients(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """LoRA under bf16 on a base bf16 holds exactly (stored in bf16): the frozen base's linear weights are
    bf16 while training (no fp32 copy, no master), frozen weights get no gradient, and the saved adapter
    starts from the same loss as on the fp32 run within bf16's tolerance."""
    from sftlab.trainer import outputs

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    exact_dir = tmp_path / "exact"
    base.save_pretrained(exact_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(exact_dir)
    seen: list[dict] = []
    real = outputs.save_adapter_run

    def spy(model, *args, **kwargs):  # the model as training left it, before the adapter is saved
        named = list(model.named_parameters())
        seen.append(
            {
                "frozen_linear": {p.dtype for n, p in named if "base_layer.weight" in n},
                "frozen_grads": [n for n, p in named if not p.requires_grad and p.grad is not None],
                "trainable": [n for n, p in named if p.requires_grad],
            }
        )
        return real(model, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_adapter_run", spy)
    runs = {
        mp: run_training(lora_cfg(exact_dir, chat_file, tmp_path / mp, mixed_precision=mp, max_steps=2))
        for mp in ("bf16", "no")
    }
    bf16, fp32 = seen
    assert bf16["frozen_linear"] == {torch.bfloat16} and fp32["frozen_linear"] == {torch.float32}
    for run in seen:
        assert run["frozen_grads"] == [] and run["trainable"] and all("lora_" in n for n in run["trainable"])
    torch.testing.assert_close(
        runs["bf16"].history[0]["loss"], runs["no"].history[0]["loss"], rtol=2e-2, atol=0.0
    )


def test_bad_target_module_fails_before_training_with_the_names(tiny_model_dir, chat_file, tmp_path, capsys):
    cfg = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run")
    cfg["peft"] = {"target_modules": ["q_proj", "qkv_proj"]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().out
    assert "qkv_proj" in err and "q_proj" in err and "o_proj" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sigkill_then_resume_with_lora_is_bitwise(tiny_model_dir, chat_file, tmp_path):
    tree = lambda out, **kw: {
        **cfg_tree(tiny_model_dir, chat_file, out, **kw),
        "peft": {"r": 4, "alpha": 8, "dropout": 0.1},
    }
    rc, log = run_cli(tree(tmp_path / "ref"), tmp_path)
    assert rc == 0, log
    rc, log = run_cli(tree(tmp_path / "cut"), tmp_path, {"SFTLAB_TEST_KILL_AFTER_STEP": "5"})
    assert rc == -signal.SIGKILL, log
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert set(load_file(ckpt / "model.safetensors")) == {
        k for k in load_file(ckpt / "model.safetensors") if "lora_" in k
    }  # trainable tensors only
    rc, log = run_cli(tree(tmp_path / "cut", resume="auto"), tmp_path)
    assert rc == 0 and "resumed" in log, log
    assert [{k: r[k] for k in EXACT} for r in metrics(tmp_path / "cut")] == [
        {k: r[k] for k in EXACT} for r in metrics(tmp_path / "ref")
    ]
    a, b = (
        load_file(tmp_path / "ref" / "adapter_model.safetensors"),
        load_file(tmp_path / "cut" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_peft_setting(tiny_model_dir, chat_file, tmp_path):
    tree = {**cfg_tree(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2), "peft": {"r": 4}}
    tree["checkpoint"] = {"every_steps": 1}
    rc, log = run_cli(tree, tmp_path)
    assert rc == 0, log
    tree["peft"] = {"r": 8}
    tree["train"]["resume"] = "auto"
    rc, log = run_cli(tree, tmp_path)
    assert rc == 2 and "peft.r" in log, log


def test_dora_trains(tiny_model_dir, chat_file, tmp_path):
    res = run_training(lora_cfg(tiny_model_dir, chat_file, tmp_path / "run", peft={"method": "dora"}))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["use_dora"] is True
    assert any(
        "lora_magnitude_vector" in k for k in load_file(tmp_path / "run" / "adapter_model.safetensors")
    )


def test_a_grown_vocabulary_trains_the_embeddings_and_head(tiny_model):
    from sftlab.config.schema import PeftSettings

    names, note = adapters.modules_to_save(
        tiny_model, PeftSettings(modules_to_save=["norm"]), vocab_grew=True
    )
    assert names == ["norm", "embed_tokens", "lm_head"] and "add_chatml_tokens" in note
    assert adapters.modules_to_save(tiny_model, PeftSettings(), vocab_grew=False) == (None, "")
    wrapped, line = adapters.wrap(tiny_model, PeftSettings(r=2), vocab_grew=True)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert "trainable parameters" in line


def test_neftune_noise_only_in_training_forwards(tiny_model):
    from transformers.integrations.neftune import activate_neftune

    ids = IDS
    clean = logits(tiny_model, ids)
    activate_neftune(tiny_model, 5.0)
    tiny_model.train()
    with torch.no_grad():
        noisy = tiny_model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(noisy, clean)
    torch.testing.assert_close(logits(tiny_model, ids), clean)  # eval: no noise


def test_neftune_run_trains_and_evaluates_clean(tiny_model_dir, chat_file, tmp_path):
    base = run_training(lora_cfg(tiny_model_dir, chat_file, tmp_path / "a", max_steps=2))
    noisy = run_training(lora_cfg(tiny_model_dir, chat_file, tmp_path / "b", max_steps=2, neftune_alpha=5.0))
    assert noisy.history[0]["loss"] != base.history[0]["loss"]  # training forwards see the noise


def save_block_model(tokenizer, path, **config) -> None:
    """A tiny Llama whose layer widths are whole 64-value blocks (bitsandbytes' CPU kernels need them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **shape, **config)
    ).save_pretrained(path)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (sftlab[qlora])"
)
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_trains(quantize, tokenizer, chat_file, tmp_path):
    save_block_model(tokenizer, tmp_path / "m", tie_word_embeddings=True)
    tokenizer.save_pretrained(tmp_path / "m")
    res = run_training(lora_cfg(tmp_path / "m", chat_file, tmp_path / "run", peft={"quantize": quantize}))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (sftlab[qlora])"
)
def test_an_eval_forward_leaves_the_nf4_base_trainable(tokenizer, tmp_path):
    """A no-grad forward in eval mode (the loss head's self-check, an evaluation) before training must not
    switch bitsandbytes' CPU 4-bit layers to their inference kernel, which has no backward: the adapter's
    gradients are the same with and without it."""
    from sftlab.config.schema import PeftSettings

    save_block_model(tokenizer, tmp_path / "m")
    settings = PeftSettings(r=4, alpha=8, dropout=0.0, quantize="nf4")
    ids = torch.arange(24).view(2, 12) % len(tokenizer)

    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", dtype=torch.float32, quantization_config=adapters.quantization_config(settings)
        )
        model, _ = adapters.wrap(base, settings)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids[:, :8])
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert plain and all(torch.equal(plain[n], after_eval[n]) for n in plain)


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(adapters.AdapterError, match=r"peft.quantize=nf4 needs bitsandbytes"):
        run_training(lora_cfg(tiny_model_dir, chat_file, tmp_path / "run", peft={"quantize": "nf4"}))


def test_lora_composes_with_packing_bf16_and_the_target_loss_head(
    tiny_model_dir, chat_file, tmp_path, capsys
):
    cfg = lora_cfg(
        tiny_model_dir, chat_file, tmp_path / "run", mixed_precision="bf16", gradient_checkpointing=True
    )
    cfg.data.packing = "bfd"
    res = run_training(cfg)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["loss_head"] == "target" and info["master_weights_fp32"]
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # the fp32 masters, not the bf16 copies
