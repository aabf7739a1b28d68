"""The training loop end to end on a tiny model: metrics, saved outputs, reload with plain transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.config import SFTConfig
from sftlab.model.loading import ModelLoadError
from sftlab.trainer.loop import RunError, run_training


def make_cfg(model_dir, data, out, **train) -> SFTConfig:
    return SFTConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": [{"path": str(data)}], "eval_fraction": 0.25, "max_seq_length": 256},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {
                "output_dir": str(out),
                "micro_batch_size": 4,
                "grad_accum_steps": 2,
                "max_steps": 4,
                "eval_every": 2,
                **train,
            },
        }
    )


def test_train_saves_loadable_model_and_metrics(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    res = run_training(make_cfg(tiny_model_dir, chat_file, out))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "target_tokens"} <= r.keys()
        assert r["target_tokens"] > 0 and r["loss"] > 0
    assert "eval_loss" in lines[1] and "eval_loss" in lines[3]
    assert lines[-1]["loss"] < lines[0]["loss"]  # it learns
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    # plain transformers loads it, with the chat template, and generates
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    # and the saved weights are the trained ones
    trained = res.history[-1]
    assert trained["step"] == 4


def test_lr_schedule_logged_per_step(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, chat_file, out, max_steps=5)
    cfg.optim.warmup_steps = 2
    cfg.optim.scheduler = "linear"
    res = run_training(cfg)
    lrs = [r["lr"] for r in res.history]
    peak = cfg.optim.lr
    # 2 warmup steps below the peak (none at lr 0), the peak at step 3, then linear decay ending above 0
    assert lrs == pytest.approx([peak / 3, peak * 2 / 3, peak, peak * 2 / 3, peak / 3])


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (1, 1), (0, 5), (2, 5), (9, 4)])
def test_no_step_runs_at_lr_zero(kind, warmup, total):
    from sftlab.config.schema import OptimConfig
    from sftlab.trainer.optim import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=warmup, scheduler=kind), total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert all(0 < lr <= 1 for lr in lrs), lrs
    if warmup < total:
        assert lrs[warmup] == 1.0 and lrs.count(1.0) == (total - warmup if kind == "constant" else 1)


def test_default_first_step_trains_and_a_one_step_run_warns(tiny_model_dir, chat_file, tmp_path):
    """The defaults (warmup_ratio 0.03) with max_steps=1: the one step runs at lr > 0, so the saved model
    is not the base model, and the run says it is a single step."""
    import io

    from rich.console import Console
    from safetensors.torch import load_file

    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=1)
    cfg.optim = {}  # every optimizer default
    printed = io.StringIO()
    res = run_training(cfg, Console(file=printed, width=300))
    assert res.history[0]["lr"] > 0
    assert "warning: this run ends after 1 optimizer step" in printed.getvalue()
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), _saved_weights(tmp_path / "run")
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)


def test_two_step_run_does_not_warn(tiny_model_dir, chat_file, tmp_path):
    import io

    from rich.console import Console

    printed = io.StringIO()
    run_training(
        make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2), Console(file=printed, width=300)
    )
    assert "warning" not in printed.getvalue()


def test_max_seq_length_above_the_models_positions_fails_before_training(tiny_model_dir, chat_file, tmp_path):
    from sftlab.config import ConfigError

    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run")
    cfg.data.max_seq_length = 1024  # the tiny model has 512 positions
    with pytest.raises(
        ConfigError,
        match=r"data.max_seq_length \(1024\) is above the model's "
        r"max_position_embeddings \(512",
    ):
        run_training(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_max_seq_length_above_positions_with_rope_scaling_warns(tiny_model_dir, chat_file, tmp_path):
    import io

    from rich.console import Console

    from sftlab.trainer.data import prepare_run_data

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run")
    cfg.data.max_seq_length = 1024
    printed = io.StringIO()
    prepare_run_data(cfg, Console(file=printed, width=300))
    assert (
        "warning: data.max_seq_length (1024) is above the model's max_position_embeddings (512); its rope "
        "scaling (linear) must cover it" in printed.getvalue()
    )


def test_unwritable_output_dir_fails_before_work(tiny_model_dir, chat_file, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"  # a path below a regular file can never be created, even by root
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    with pytest.raises(RunError, match="not writable"):
        run_training(make_cfg(tiny_model_dir, chat_file, out))


def test_missing_model_path_is_clear(chat_file, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        run_training(make_cfg(tmp_path / "no-such-model", chat_file, tmp_path / "run"))


def test_seeded_runs_are_identical(tiny_model_dir, chat_file, tmp_path):
    a = run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / "a"))
    b = run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / "b"))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_max_grad_norm_at_or_below_zero_trains_as_no_clipping(tiny_model_dir, chat_file, tmp_path):
    """-1 (open-instruct's "off") and 0 must not reverse or zero the gradients: the run equals null's."""
    runs = {}
    for value in (None, -1.0, 0.0):
        cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / f"clip{value}", max_steps=3, eval_every=None)
        cfg.optim.max_grad_norm = value
        runs[value] = run_training(cfg).history
    losses = {value: [r["loss"] for r in history] for value, history in runs.items()}
    assert losses[-1.0] == losses[None] and losses[0.0] == losses[None]
    assert losses[None][-1] < losses[None][0]  # it learns
    assert all(r["grad_norm"] > 0 for history in runs.values() for r in history)  # the norm is still measured


@pytest.mark.parametrize("packing", ["bfd", "wrapped"])
def test_packed_training_runs_and_learns(tiny_model_dir, chat_file, tmp_path, packing):
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=6, micro_batch_size=2)
    cfg.data.packing = packing
    res = run_training(cfg)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(r["target_tokens"] > 0 for r in res.history)


def test_bfd_packing_keeps_the_loss_of_unpacked_training(tiny_model_dir, chat_file, tmp_path):
    """One optimizer step over ALL examples: packed (bfd) and padded batches see the same tokens and
    the same documents in isolation, so the first-step loss (before any update) and gradient norm are the
    same, with per-document attention and with the dense document mask."""
    losses = {}
    for packing, attention in (("none", "auto"), ("bfd", "documents"), ("bfd", "mask")):
        cfg = make_cfg(
            tiny_model_dir,
            chat_file,
            tmp_path / f"{packing}-{attention}",
            max_steps=1,
            micro_batch_size=64,
            packed_attention=attention,
        )
        cfg.data.packing = packing
        cfg.data.eval_fraction = 0.0
        res = run_training(cfg)
        losses[attention] = (
            res.history[0]["loss"],
            res.history[0]["target_tokens"],
            res.history[0]["grad_norm"],
        )
    for attention in ("documents", "mask"):
        assert losses[attention][1] == losses["auto"][1]
        assert losses[attention][0] == pytest.approx(losses["auto"][0], rel=1e-5)
        assert losses[attention][2] == pytest.approx(losses["auto"][2], rel=1e-4)


def test_bad_match_eval_file_fails_before_training(tiny_model_dir, chat_file, tmp_path):
    from conftest import write_jsonl

    from sftlab.data.dataset import DataError

    bad = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Hello!", "completion": "Hi"}, "{broken"])
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run")
    cfg.match_eval = {"path": str(bad)}
    with pytest.raises(DataError, match=r"eval.jsonl:2: invalid JSON"):
        run_training(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_match_eval_before_and_after(tiny_model_dir, chat_file, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2)
    cfg.match_eval = {"path": str(chat_file), "max_examples": 3, "max_new_tokens": 4}
    res = run_training(cfg)
    assert res.match_before.total == res.match_after.total == 3
    summary = json.loads((tmp_path / "run" / "match_eval.json").read_text())
    assert summary["after"]["total"] == 3 and 0 <= summary["after"]["accuracy"] <= 1


def _saved_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    "dtype,mixed,saved",
    [
        ("float32", "bf16", torch.float32),
        ("bfloat16", "no", torch.bfloat16),
        ("bfloat16", "bf16", torch.bfloat16),
    ],
)
def test_bf16_modes_learn_and_save_the_dtype_asked_for(
    tiny_model_dir, chat_file, tmp_path, dtype, mixed, saved
):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, chat_file, out, max_steps=6, mixed_precision=mixed)
    cfg.model.dtype = dtype
    res = run_training(cfg)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    info = json.loads((out / "run.json").read_text())
    assert info["mixed_precision"] == mixed and info["weights_dtype"] == dtype
    assert info["master_weights_fp32"] is (mixed == "bf16" or dtype == "bfloat16")
    assert info["loss_head"] == "target", info["loss_head_reason"]
    assert {w.dtype for w in _saved_weights(out).values()} == {saved}


def test_mixed_bf16_saves_the_fp32_master_weights(tiny_model_dir, chat_file, tmp_path):
    """bf16 compute copies are rounded from fp32 masters: the saved fp32 weights are NOT bf16-representable
    (small updates were kept), and they equal what a resumed run would continue from."""
    out = tmp_path / "run"
    res = run_training(make_cfg(tiny_model_dir, chat_file, out, max_steps=3, mixed_precision="bf16"))
    assert res.history[-1]["step"] == 3
    w = _saved_weights(out)
    off_grid = sum(int((t != t.bfloat16().float()).sum()) for t in w.values())
    assert off_grid > 0.5 * sum(t.numel() for t in w.values())


def test_target_head_and_full_logits_train_the_same(tiny_model_dir, chat_file, tmp_path):
    runs = {}
    for head in ("target", "full"):
        cfg = make_cfg(
            tiny_model_dir,
            chat_file,
            tmp_path / head,
            max_steps=3,
            mixed_precision="no",
            loss_head=head,
            loss_chunk_tokens=7,
        )
        runs[head] = run_training(cfg)
        assert json.loads((tmp_path / head / "run.json").read_text())["loss_head"] == head
    for a, b in zip(runs["target"].history, runs["full"].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["eval_loss" if "eval_loss" in a else "loss"] == pytest.approx(
            b["eval_loss" if "eval_loss" in b else "loss"], rel=1e-5
        )


@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_token_budget_micro_batches_run(tiny_model_dir, chat_file, tmp_path, packing):
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=4, micro_batch_tokens=256)
    cfg.data.packing = packing
    cfg.data.max_seq_length = 128
    res = run_training(cfg)
    for r in res.history:
        assert r["target_tokens"] > 0 and 0 <= r["padding"] < 1 and 0 < r["mfu"] < 1
        assert r["tokens_per_s"] >= r["target_tokens_per_s"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"mfu", "target_tokens_per_s", "padding"} <= lines[0].keys()


def test_micro_batch_tokens_below_max_seq_length_is_refused(tiny_model_dir, chat_file, tmp_path):
    from sftlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        load_config(None, ["train.micro_batch_tokens=100", "data.max_seq_length=256"])


def test_float16_and_auto_weights_train_in_fp32_and_save_their_dtype(tokenizer, chat_file, tmp_path):
    """model.dtype float16: fp32 compute and masters, saved as float16; auto: the dtype the checkpoint holds."""
    from conftest import build_model

    model_dir = tmp_path / "half"
    build_model(len(tokenizer)).to(torch.float16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for dtype in ("float16", "auto"):
        out = tmp_path / dtype
        cfg = make_cfg(model_dir, chat_file, out, max_steps=4, mixed_precision="no")
        cfg.model.dtype = dtype
        res = run_training(cfg)
        assert res.history[-1]["loss"] < res.history[0]["loss"]
        info = json.loads((out / "run.json").read_text())
        assert (info["weights_dtype"], info["compute_dtype"]) == ("float16", "float32")
        assert {w.dtype for w in _saved_weights(out).values()} == {torch.float16}


def test_run_json_carries_each_decision_with_its_reason(tiny_model_dir, chat_file, tmp_path):
    """run.json is written from the run's `Resolved` record: every decision with the reason the console
    printed for it, and the step geometry."""
    out = tmp_path / "run"
    cfg = make_cfg(
        tiny_model_dir, chat_file, out, max_steps=2, mixed_precision="no", gradient_checkpointing="auto"
    )
    cfg.data.packing = "bfd"
    console = Console(record=True, width=400)
    run_training(cfg, console)
    info, printed = json.loads((out / "run.json").read_text()), console.export_text()
    reasons = info["reasons"]
    assert set(reasons) == {
        "mixed_precision",
        "weight_form",
        "gradient_checkpointing",
        "compile",
        "packed_attention",
        "peak_flops",
        "allocator",
    }
    assert all(reasons.values()), reasons
    assert f"allocator: {info['allocator']} ({reasons['allocator']})" in printed
    assert (
        f"MFU against a peak of {info['peak_flops'] / 1e9:,.0f} GFLOP/s ({reasons['peak_flops']})" in printed
    )
    assert f"precision: float32 ({reasons['mixed_precision']})" in printed
    on_off = {True: "on", False: "off"}
    assert reasons["gradient_checkpointing"].startswith("auto: a micro-batch of")
    line = f"gradient checkpointing: {on_off[info['gradient_checkpointing']]} ({reasons['gradient_checkpointing']})"
    assert line in printed
    assert f"compile: {on_off[info['compile']]} ({reasons['compile']})" in printed
    assert info["packed_attention"] in ("documents", "mask") and f"({reasons['packed_attention']})" in printed
    assert (info["weight_form"], reasons["weight_form"]) == ("none", "no bf16 weight copies")
    assert (info["micro_batch_size"], info["grad_accum_steps"], info["num_processes"]) == (4, 2, 1)
    assert (info["global_batch"], info["global_batch_unit"]) == (8, "rows")
    # the packed rows make one micro-batch per epoch, and a step never spans two epochs: 2 steps of 1
    assert (info["total_steps"], info["total_micro_batches"], info["engine"]) == (2, 2, "single")


def test_unpacked_run_json_has_no_packed_attention_reason(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    run_training(
        make_cfg(tiny_model_dir, chat_file, out, max_steps=1, mixed_precision="no", micro_batch_tokens=512)
    )
    info = json.loads((out / "run.json").read_text())
    assert info["packed_attention"] is None and "packed_attention" not in info["reasons"]
    assert (info["global_batch"], info["global_batch_unit"]) == (512 * 2, "tokens")


def _steps(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_normalization_trains_its_mean_and_evaluates_the_token_mean(tiny_model_dir, chat_file, tmp_path):
    """With lr 0 the weights never move: each mode's step-1 loss is its own mean of the same micro-batches,
    and the eval loss (always the token mean) is the same number in every mode."""
    runs = {}
    for mode in ("tokens", "micro_batch_mean", "sequence_mean"):
        cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / mode, loss_normalization=mode, max_steps=2)
        run_training(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.0})}))
        runs[mode] = _steps(tmp_path / mode)
    tokens, micro, seqs = runs["tokens"], runs["micro_batch_mean"], runs["sequence_mean"]
    assert micro[0]["micro_batches"] == 2 * 1 and seqs[0]["sequences"] == 8  # 2 micro-batches of 4 rows
    assert micro[0]["target_tokens"] == seqs[0]["target_tokens"] == tokens[0]["target_tokens"]
    assert len({round(r[0]["loss"], 6) for r in runs.values()}) == 3  # three different means ...
    assert micro[1]["eval_loss"] == pytest.approx(tokens[1]["eval_loss"], rel=1e-6)  # ... one eval loss
    assert seqs[1]["eval_loss"] == pytest.approx(tokens[1]["eval_loss"], rel=1e-6)


def test_global_batch_size_sets_the_accumulation(tiny_model_dir, chat_file, tmp_path, capsys):
    from sftlab.config import ConfigError
    from sftlab.trainer.resolved import with_global_batch

    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, chat_file, out, global_batch_size=8, micro_batch_size=2, max_steps=1)
    run_training(cfg, console=Console(file=None, force_terminal=False, width=200))
    run = json.loads((out / "run.json").read_text())
    assert run["grad_accum_steps"] == 4 and run["global_batch"] == 8
    assert "train.global_batch_size: 8 = micro_batch_size 2 x grad_accum_steps 4 x 1 process(es)" in (
        capsys.readouterr().out
    )
    two = make_cfg(tiny_model_dir, chat_file, out, global_batch_size=12, micro_batch_size=4)
    assert with_global_batch(two, 3)[0].train.grad_accum_steps == 1
    with pytest.raises(
        ConfigError,
        match=r"not a multiple of train.micro_batch_size \(4\) x 2 process\(es\) = 8: use 8 or 16",
    ):
        with_global_batch(two, 2)
    with pytest.raises(ValueError, match="with train.micro_batch_tokens"):
        make_cfg(tiny_model_dir, chat_file, out, global_batch_size=8, micro_batch_tokens=512)


def test_max_seq_length_null_is_the_models_positions(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from sftlab.config import ConfigError
    from sftlab.trainer import data as run_data

    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=1)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_length": None})})
    run_training(cfg)
    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    assert f"max_seq_length: {limit}" in (tmp_path / "run" / "config.yaml").read_text()
    monkeypatch.setattr(run_data, "position_limit", lambda *a: (None, None))
    with pytest.raises(
        ConfigError, match="data.max_seq_length: null takes the model's max_position_embeddings"
    ):
        run_data.with_resolved_length(cfg, None, str(tiny_model_dir), None)


def test_eval_on_start_per_epoch_first_step_and_samples(tiny_model_dir, chat_file, tmp_path):
    """train.eval_on_start: a step-0 record (eval loss, no training loss); eval_every: epoch: a validation
    at each epoch's end; the first step is logged whatever log_every; sample_every: eval: replies to the
    first eval prompts beside each validation, in metrics.jsonl and report.md."""
    out = tmp_path / "run"
    cfg = make_cfg(
        tiny_model_dir,
        chat_file,
        out,
        max_steps=None,
        num_epochs=2,
        eval_every="epoch",
        eval_on_start=True,
        log_every=1000,
        sample_every="eval",
        sample_prompts=2,
        sample_max_new_tokens=4,
    )
    res = run_training(cfg)
    steps = _steps(out)
    assert steps[0]["step"] == 0 and "eval_loss" in steps[0] and "loss" not in steps[0]
    assert steps[1]["step"] == 1 and "eval_loss" not in steps[1]  # logged although log_every is 1000
    evaluated = [r["step"] for r in steps if "eval_loss" in r]
    epoch_end = next(r["step"] for r in res.history if r["step"] and r["epoch"] >= 1.0)
    assert (
        evaluated == [0, epoch_end, res.steps] and 0 < epoch_end < res.steps
    )  # before, and each epoch's end
    for r in steps:
        assert ("samples" in r) == ("eval_loss" in r)
    sample = steps[-1]["samples"][0]
    assert len(steps[-1]["samples"]) == 2 and sample["prompt"] and sample["reference"]
    assert isinstance(sample["reply"], str)
    report = (out / "report.md").read_text()
    assert "## Samples" in report and "| prompt | reference | reply |" in report
    assert f"first / last training loss | {steps[1]['loss']:.4f}" in report
