"""Training a vision-language model end to end on tiny random models: `sftlab.train` / `sftlab train` learn with
the vision tower frozen, save model + processor (AutoProcessor loads the run directory), evaluate, train LoRA on
the language model only, and resume after SIGKILL bitwise equal to an uninterrupted run."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import shutil
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_checkpoint import EXACT, metrics, run_cli
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_families import make_image, save_family

import sftlab
from sftlab.cli import main
from sftlab.config.schema import ModelConfig
from sftlab.model.vision import load_processor, part_of
from sftlab.trainer.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    """12 rows, each an image (relative path) and an answer naming its colour class."""
    d = tmp_path_factory.mktemp("vlm-data")
    rows = []
    for k in range(12):
        make_image(d / "img" / f"{k}.png", size=(16, 16), seed=k)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>Which class?"},
                    {"role": "assistant", "content": f"Class {k % 3}."},
                ],
                "images": [f"img/{k}.png"],
            }
        )
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-models")
    return {f: save_family(f, root / f) for f in ("idefics3", "llava")}


def _tree(model_dir, data, out, steps=6, **extra):
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 256, "eval_fraction": 0.25},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 3,
            "max_steps": steps,
            "deterministic": True,
            "eval_every": 3,
        },
        "checkpoint": {"every_steps": 2},
        **extra,
    }


def test_full_fine_tuning_learns_saves_model_and_processor_and_keeps_the_vision_tower(
    model_dirs, vlm_data, tmp_path
):
    out = tmp_path / "run"
    res = sftlab.train(_tree(model_dirs["idefics3"], vlm_data, out))
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < losses[0] - 0.3, losses
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    processor = AutoProcessor.from_pretrained(out, use_fast=False)  # the processor lies next to the model
    assert processor.image_seq_len == 4 and "<image>" in processor.chat_template
    trained = AutoModelForImageTextToText.from_pretrained(out)
    base = load_file(model_dirs["idefics3"] / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    for name, tensor in saved.items():
        same = torch.equal(tensor, base[name])
        assert same if part_of(name) == "vision" else True, name
    assert not all(torch.equal(saved[n], base[n]) for n in saved if part_of(n) == "language")
    assert type(trained).__name__ == "Idefics3ForConditionalGeneration"
    report = json.loads((out / "data_report.json").read_text())
    assert "images: 12 (1.00 per example)" in report["summary"]
    from sftlab.trainer.evaluate import evaluate  # sftlab eval: the file's rows read with their images

    scored = evaluate(out, str(vlm_data), match=True, max_new_tokens=4)
    assert scored["examples"] == 12 and scored["loss"] < losses[0] and scored["exact_match"]["total"] == 12
    image = str(vlm_data.parent / "img" / "0.png")  # sftlab generate --image: the trained model is shown it
    assert (
        main(["generate", str(out), "--prompt", "Which class?", "--image", image, "--max-new-tokens", "3"])
        == 0
    )


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_frozen_weights_are_saved_exactly_as_loaded(model_dirs, vlm_data, tmp_path, precision):
    """Every frozen tensor (the vision tower: half of it on the bf16 grid, as a bf16 checkpoint loads, half
    off it) comes back bitwise in the saved model and in a checkpoint's hf/ copy, in fp32 and under bf16
    mixed precision (bf16 compute copies of the trained weights, fp32 masters)."""
    base = tmp_path / "base"
    shutil.copytree(model_dirs["idefics3"], base)
    weights = load_file(base / "model.safetensors")
    vision = sorted(n for n in weights if part_of(n) == "vision" and weights[n].is_floating_point())
    for name in vision:
        if (
            ".mlp." in name
        ):  # the MLPs as a bf16 checkpoint loads; the attention projections off the bf16 grid
            weights[name] = weights[name].to(torch.bfloat16).float()
    off_grid = [n for n in vision if not torch.equal(weights[n].to(torch.bfloat16).float(), weights[n])]
    assert any("proj.weight" in n for n in off_grid) and any("mlp.fc1.weight" in n for n in vision)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    tree = _tree(base, vlm_data, out, steps=2)
    tree["train"].update(mixed_precision=precision, eval_every=None)
    tree["checkpoint"]["save_hf_model"] = True
    sftlab.train(tree)
    assert json.loads((out / "run.json").read_text())["mixed_precision"] == precision
    for saved in (
        load_file(out / "model.safetensors"),
        load_file(latest_checkpoint(out) / "hf" / "model.safetensors"),
    ):
        assert [n for n in vision if not torch.equal(saved[n], weights[n])] == []
        assert any(not torch.equal(saved[n], weights[n]) for n in saved if part_of(n) == "language")


def test_generate_with_an_image_needs_a_vision_model(tiny_model_dir, vlm_data, capsys):
    image = str(vlm_data.parent / "img" / "0.png")
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hi", "--image", image]) != 0
    assert "text-only model" in capsys.readouterr().out


def test_lora_trains_the_language_model_only_and_loads_with_peft(
    model_dirs, vlm_data, tmp_path, monkeypatch, capsys
):
    from peft import PeftModel

    out = tmp_path / "lora"
    res = sftlab.train(
        _tree(
            model_dirs["llava"],
            vlm_data,
            out,
            peft={"r": 4, "alpha": 8, "merge_on_save": True},
            optim={"lr": 1e-2},
        )
    )
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # the language model's linear layers, as a pattern
    keys = load_file(out / "adapter_model.safetensors")
    assert keys and all(part_of(k) == "language" for k in keys) and any("q_proj" in k for k in keys)
    base = AutoModelForImageTextToText.from_pretrained(model_dirs["llava"])
    model = PeftModel.from_pretrained(base, out)
    assert sum("lora_" in n for n, _ in model.named_parameters()) == len(keys)
    assert AutoProcessor.from_pretrained(out, use_fast=False).image_processor is not None
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")  # peft.merge_on_save: a plain model
    assert AutoProcessor.from_pretrained(out / "merged", use_fast=False) and not any(
        "lora" in n for n in merged.state_dict()
    )
    exported = tmp_path / "exported"  # sftlab export --merge: a full vision model, its processor beside it
    assert main(["export", str(out), "--merge", "--out", str(exported)]) == 0
    full = AutoModelForImageTextToText.from_pretrained(exported).eval()
    assert type(full).__name__ == "LlavaForConditionalGeneration" and not any(
        "lora" in n for n in full.state_dict()
    )
    proc = AutoProcessor.from_pretrained(exported, use_fast=False)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
    )
    inputs = proc(text=[text], images=[[make_image(size=(16, 16), seed=5)]], return_tensors="pt")
    with torch.no_grad():
        want, got = model.eval()(**inputs).logits, full(**inputs).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=0)
    image = str(vlm_data.parent / "img" / "1.png")  # the adapter merged into its base, the base's processor
    monkeypatch.setattr("sys.stdin", io.StringIO("Which class?\n"))
    assert main(["chat", str(out), "--image", image, "--max-new-tokens", "2"]) == 0
    assert "model>" in capsys.readouterr().out


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (sftlab[qlora])"
)
def test_qlora_quantizes_the_language_model_only(vlm_data, tmp_path):
    """peft.quantize on a LLaVA: bitsandbytes quantizes the language model's linear layers (64 wide: its
    CPU kernels need a 64-value block); the vision tower, projector and head stay fp32 and frozen."""
    from bitsandbytes.nn import Linear4bit

    from sftlab.config import SFTConfig
    from sftlab.trainer.run_model import RunTokens, build_run_model

    base, out = save_family("llava", tmp_path / "llava", text_hidden=64), tmp_path / "qlora"
    tree = _tree(
        base,
        vlm_data,
        out,
        steps=3,
        peft={"r": 4, "alpha": 8, "quantize": "nf4"},
        optim={"lr": 1e-2},
        checkpoint={"every_steps": None},
    )
    tree["data"]["eval_fraction"], tree["train"]["eval_every"] = 0, None
    tok = AutoProcessor.from_pretrained(base, use_fast=False).tokenizer
    model = build_run_model(SFTConfig(**tree), RunTokens(str(base), tok, len(tok))).model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    quantized = {n for n, m in linears.items() if isinstance(m, Linear4bit)}
    assert quantized and all(part_of(n) == "language" and "lm_head" not in n for n in quantized)
    assert {n for n in linears if part_of(n) == "language" and "lm_head" not in n} == quantized
    others = [(n, p) for n, p in model.named_parameters() if part_of(n) != "language"]
    assert others and all(p.dtype == torch.float32 and not p.requires_grad for _, p in others)
    res = sftlab.train(tree)
    assert (
        all(math.isfinite(r["loss"]) for r in res.history)
        and res.history[-1]["loss"] < res.history[0]["loss"]
    )
    keys = load_file(out / "adapter_model.safetensors")
    assert keys and all(part_of(k) == "language" for k in keys)


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(model_dirs, vlm_data, tmp_path):
    """`sftlab train` killed (SIGKILL) after step 5, its last checkpoint step 4, resumed: every step's record
    and the saved weights equal the uninterrupted run's bit for bit (both runs in their own process)."""
    rc, log = run_cli(_tree(model_dirs["idefics3"], vlm_data, tmp_path / "ref"), tmp_path)
    assert rc == 0, log
    tree = _tree(model_dirs["idefics3"], vlm_data, tmp_path / "cut")
    rc, log = run_cli(tree, tmp_path, {"SFTLAB_TEST_KILL_AFTER_STEP": "5"})
    assert rc == -signal.SIGKILL, log
    tree["train"]["resume"] = "auto"
    rc, log = run_cli(tree, tmp_path)
    assert rc == 0 and "step-00000004" in log, log
    got, want = metrics(tmp_path / "cut"), metrics(tmp_path / "ref")
    keys = EXACT + ("eval_loss",)
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]
    wa, wb = (
        load_file(tmp_path / "ref" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qwen2_vl_trains_without_torchvision_and_its_output_reloads(tmp_path, caplog):
    """A saved Qwen2-VL names a video processor that needs torchvision: the processor is built without it
    (one warning), trains on rows of three image sizes (three lengths: padded batches), and the run's
    model + processor reload; the M-RoPE positions (from image_grid_thw) make a padded batch lose as
    its rows alone."""
    d = tmp_path / "data"
    rows = []
    for k in range(9):
        size = [(16, 16), (8, 16), (16, 8)][k % 3]
        make_image(d / "img" / f"{k}.png", size=size, seed=k)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>Which class?"},
                    {"role": "assistant", "content": f"Class {k % 3}."},
                ],
                "images": [f"img/{k}.png"],
            }
        )
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, out = save_family("qwen2_vl", tmp_path / "qwen2_vl"), tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sftlab.model.processors"):
        tree = _tree(base, d / "train.jsonl", out, steps=4, checkpoint={"every_steps": None})
        tree["data"]["eval_fraction"], tree["train"]["eval_every"] = 0, None
        res = sftlab.train(tree)
    assert any(
        "without its video_processor" in r.message and "videos are not supported" in r.message
        for r in caplog.records
    )
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and "video_processor" in saved  # written back
    processor = load_processor(ModelConfig(name_or_path=str(out)), str(out))
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.image_processor.merge_size == 2
    assert (
        type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "Qwen2VLForConditionalGeneration"
    )
    from sftlab.trainer.evaluate import evaluate

    alone, padded = (evaluate(out, str(d / "train.jsonl"), batch_size=b) for b in (1, 9))
    assert alone["examples"] == 9 and alone["target_tokens"] == padded["target_tokens"]
    assert padded["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_the_cli_prepares_and_shows_image_rows(model_dirs, vlm_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_tree(model_dirs["llava"], vlm_data, tmp_path / "run")))
    assert main(["prepare", str(cfg), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "<image 16x16>" in out and "images: 12" in out
    bad = _tree(model_dirs["llava"], vlm_data, tmp_path / "run")
    bad["data"]["packing"] = "bfd"
    cfg.write_text(yaml.safe_dump(bad))
    assert main(["prepare", str(cfg)]) != 0
    assert "not supported for vision-language models" in capsys.readouterr().out


def test_bf16_with_gradient_checkpointing_trains_a_llava(model_dirs, vlm_data, tmp_path):
    """train.mixed_precision: bf16 and train.gradient_checkpointing: true together (vision tower frozen)."""
    out = tmp_path / "bf16-gc"
    tree = _tree(
        model_dirs["llava"], vlm_data, out, steps=4, checkpoint={"every_steps": None}, optim={"lr": 1e-2}
    )
    tree["data"]["eval_fraction"], tree["train"]["eval_every"] = 0, None
    tree["train"].update(mixed_precision="bf16", gradient_checkpointing=True)
    losses = [r["loss"] for r in sftlab.train(tree).history]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    info = json.loads((out / "run.json").read_text())
    assert info["gradient_checkpointing"] is True and info["mixed_precision"] == "bf16"
    model = AutoModelForImageTextToText.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and saved
    assert torch.equal(
        model.state_dict()["lm_head.weight"], saved["language_model.lm_head.weight"].to(model.dtype)
    )
