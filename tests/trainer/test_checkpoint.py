"""Checkpoints and resume: a killed run loses nothing, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftlab.config import SFTConfig
from sftlab.trainer import run_model as run_model_mod
from sftlab.trainer.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from sftlab.trainer.inference import load_model_dir
from sftlab.trainer.loop import RunError, run_training

STEPS = 7


def cfg_tree(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 256},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "scheduler": "cosine", "weight_decay": 0.1},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 3,
            "grad_accum_steps": 2,
            "max_steps": STEPS,
            "deterministic": True,
            **train,
        },
        "checkpoint": {"every_steps": 2},
    }


def run_cli(tree: dict, tmp_path: Path, env_extra: dict | None = None, wait: bool = True):
    cfg = tmp_path / f"cfg-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftlab.cli", "train", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


EXACT = ("step", "loss", "grad_norm", "lr", "target_tokens", "epoch")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sigkill_then_resume_is_bitwise_identical(tiny_model_dir, chat_file, tmp_path, precision):
    """fp32, and bf16 mixed precision (bf16 compute copies whose fp32 masters live in the optimizer state)."""
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    rc, log = run_cli(cfg_tree(tiny_model_dir, chat_file, ref_out, mixed_precision=precision), tmp_path)
    assert rc == 0, log
    info = json.loads((ref_out / "run.json").read_text())
    assert info["mixed_precision"] == precision and info["master_weights_fp32"] is (precision == "bf16")

    rc, log = run_cli(
        cfg_tree(tiny_model_dir, chat_file, cut_out, mixed_precision=precision),
        tmp_path,
        {"SFTLAB_TEST_KILL_AFTER_STEP": "5"},
    )
    assert rc == -signal.SIGKILL, log
    assert latest_checkpoint(cut_out).name == "step-00000004"  # step 5 ran but was never saved
    assert not (cut_out / "model.safetensors").exists()

    rc, log = run_cli(
        cfg_tree(tiny_model_dir, chat_file, cut_out, resume="auto", mixed_precision=precision), tmp_path
    )
    assert rc == 0, log
    assert "resumed" in log and "step-00000004" in log
    ref, got = metrics(ref_out), metrics(cut_out)
    assert [{k: r[k] for k in EXACT} for r in got] == [
        {k: r[k] for k in EXACT} for r in ref
    ]  # bitwise floats
    wa, wb = load_file(ref_out / "model.safetensors"), load_file(cut_out / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_a_smaller_micro_batch_trains_the_same_steps(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """Killed after step 4 (micro-batches of 3 x 2 accumulated), resumed with micro_batch_size 1: the
    accumulation becomes 6, so every step trains on the same 6 examples (16 of them: each epoch ends with
    a step of 4) and the losses equal the uninterrupted run's (fp32; the summation order differs)."""
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    tree = cfg_tree(tiny_model_dir, chat_file, ref_out, mixed_precision="no")
    monkeypatch.setenv("SFTLAB_TEST_STEP_UNITS", str(tmp_path / "ref-units.jsonl"))
    run_training(SFTConfig.model_validate(tree))
    cut = cfg_tree(tiny_model_dir, chat_file, cut_out, mixed_precision="no")
    units = {"SFTLAB_TEST_STEP_UNITS": str(tmp_path / "cut-units.jsonl")}
    rc, log = run_cli(cut, tmp_path, {"SFTLAB_TEST_KILL_AFTER_STEP": "4", **units})
    assert rc == -signal.SIGKILL, log
    cut["train"].update(resume="auto", global_batch_size=3)  # the checkpoint's steps hold 3 x 2 rows
    with pytest.raises(RunError, match=r"its global batch is 6 rows per step, train.global_batch_size 3"):
        run_training(SFTConfig.model_validate(cut))
    cut["train"].update(global_batch_size=None, micro_batch_size=1)
    monkeypatch.setenv("SFTLAB_TEST_STEP_UNITS", units["SFTLAB_TEST_STEP_UNITS"])
    run_training(SFTConfig.model_validate(cut))
    ref_units = (tmp_path / "ref-units.jsonl").read_text().splitlines()
    assert (tmp_path / "cut-units.jsonl").read_text().splitlines() == ref_units
    assert [len(json.loads(u)) for u in ref_units] == [6, 6, 4, 6, 6, 4, 6]
    ref, got = metrics(ref_out), metrics(cut_out)
    assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in ref]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    info = json.loads((cut_out / "run.json").read_text())
    assert (info["micro_batch_size"], info["grad_accum_steps"]) == (1, 6)


def test_kill_during_checkpoint_write_keeps_previous(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    tree = cfg_tree(tiny_model_dir, chat_file, out)
    proc = run_cli(tree, tmp_path, {"SFTLAB_TEST_PAUSE_IN_SAVE": "4:60"}, wait=False)
    partial = out / "checkpoints" / ".tmp-step-00000004"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (partial / "model.safetensors").exists():
            time.sleep(0.05)
        assert (partial / "model.safetensors").exists(), "the save of step 4 never started"
    finally:
        proc.kill()  # SIGKILL in the middle of writing step 4
        proc.communicate()
    assert partial.exists() and not (partial / "COMPLETE").exists()
    assert latest_checkpoint(out).name == "step-00000002"

    tree["train"]["resume"] = "auto"
    rc, log = run_cli(tree, tmp_path)
    assert rc == 0, log
    assert "resumed" in log and "step-00000002" in log
    assert not partial.exists()  # debris of the killed save is cleaned up
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


def test_rotation_keeps_exactly_k(tiny_model_dir, chat_file, tmp_path):
    tree = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run")
    tree["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    run_training(SFTConfig.model_validate(tree))
    names = [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000006", "step-00000007"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000007"


def test_sigterm_checkpoints_and_exits_143(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    tree = cfg_tree(tiny_model_dir, chat_file, out, max_steps=400)
    tree["checkpoint"] = {"every_steps": 1000}
    proc = run_cli(tree, tmp_path, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "SIGTERM" in log and "resume with: sftlab train " in log and ".yaml train.resume=auto" in log
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == metrics(out)[-1]["step"]
    report = (out / "report.md").read_text()  # the report of an interrupted run, with its checkpoint
    assert "Status: interrupted by SIGTERM after step" in report and ckpt.name in report
    assert (out / "loss.png").is_file()


def _nan_on_call(n: int, monkeypatch):
    """The run's micro-batch loss turns NaN on its n-th call."""
    real_build = run_model_mod.build_loss_fn
    calls = {"n": 0}

    def build(*args, **kwargs):
        real = real_build(*args, **kwargs)

        def fake(model, batch):
            calls["n"] += 1
            out = real(model, batch)
            return out * float("nan") if calls["n"] == n else out

        return fake

    monkeypatch.setattr(run_model_mod, "build_loss_fn", build)


def test_nan_stop_keeps_last_good_checkpoint(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    _nan_on_call(9, monkeypatch)  # micro-batch 9 = step 5 (2 micro-batches a step)
    with pytest.raises(RunError, match=r"non-finite loss at step 5 .*Last good checkpoint: .*step-00000004"):
        run_training(SFTConfig.model_validate(cfg_tree(tiny_model_dir, chat_file, tmp_path / "run")))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"


def test_nan_skip_step_leaves_weights_unchanged(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    _nan_on_call(9, monkeypatch)
    tree = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run", on_nan="skip_step")
    tree["checkpoint"] = {"every_steps": 1}
    res = run_training(SFTConfig.model_validate(tree))
    assert [r["step"] for r in res.history if "skipped" in r] == [5]
    ck = tmp_path / "run" / "checkpoints"
    w4, w5 = (
        load_file(ck / "step-00000004" / "model.safetensors"),
        load_file(ck / "step-00000005" / "model.safetensors"),
    )
    w6 = load_file(ck / "step-00000006" / "model.safetensors")
    assert all(torch.equal(w4[k], w5[k]) for k in w4)
    assert not all(torch.equal(w5[k], w6[k]) for k in w5)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sftlab-pwned",))


def test_tampered_pickle_is_refused(tiny_model_dir, chat_file, tmp_path):
    tree = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2)
    run_training(SFTConfig.model_validate(tree))
    ckpt = latest_checkpoint(tmp_path / "run")
    torch.save({"state": Evil()}, ckpt / "optimizer.bin")
    (tmp_path / "run" / "FINISHED").unlink()  # as if killed after that checkpoint: resume=auto loads it
    tree["train"]["resume"] = "auto"
    tree["train"]["max_steps"] = 2
    with pytest.raises(CheckpointError, match="refusing to load"):
        run_training(SFTConfig.model_validate(tree))
    assert not Path("/tmp/sftlab-pwned").exists()


def test_resume_refuses_breaking_config_changes(tiny_model_dir, chat_file, tmp_path):
    tree = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2)
    run_training(SFTConfig.model_validate(tree))
    bad = json.loads(json.dumps(tree))
    bad["train"].update(resume="auto")
    bad["optim"].update(lr=1e-3)
    with pytest.raises(RunError, match=r"optim.lr: 0.003 -> 0.001"):
        run_training(SFTConfig.model_validate(bad))
    ok = json.loads(json.dumps(tree))
    ok["train"].update(resume="auto", log_every=5, eval_every=3)
    res = run_training(SFTConfig.model_validate(ok))  # safe changes: logging / eval interval
    assert res.history[-1]["step"] == 2


def test_disk_full_during_save_keeps_previous(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import errno

    from sftlab.trainer import checkpoint as ck

    real = ck.save_file
    calls = {"n": 0}

    def full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(
        CheckpointError, match=r"step 4 failed: No space left on device.*step-00000002 is intact"
    ):
        run_training(SFTConfig.model_validate(cfg_tree(tiny_model_dir, chat_file, tmp_path / "run")))
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_each_rank_restores_its_own_rng_and_old_checkpoints_still_load(tmp_path):
    """Per-rank RNG files (rng-{rank}.json + rng_torch-{rank}.safetensors) go back to their own rank; a
    checkpoint from before them (rank 0's rng.json + rng_torch.safetensors) restores rank 0, and leaves
    another rank with the state Accelerate restored from its own random_states_{rank}.pkl."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    from sftlab.trainer.checkpoint import capture_rng, load_rank_rng, restore_rng, save_rank_rng

    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    outer = capture_rng()
    try:
        save_rank_rng(tmp_path, 0)
        after0 = draws()
        save_rank_rng(tmp_path, 1)
        after1 = draws()
        load_rank_rng(tmp_path, 0)
        assert draws() == after0
        load_rank_rng(tmp_path, 1)
        assert draws() == after1
        old = tmp_path / "old"
        old.mkdir()
        meta, tensors = capture_rng()
        (old / "rng.json").write_text(json.dumps(meta))
        save_file(tensors, str(old / "rng_torch.safetensors"))
        expected = draws()
        load_rank_rng(old, 0)
        assert draws() == expected
        mine = capture_rng()
        expected = draws()
        restore_rng(*mine)
        load_rank_rng(old, 1)  # rank 0's states are not rank 1's: left as they are
        assert draws() == expected
    finally:
        restore_rng(*outer)


def test_every_epoch_checkpoints_at_the_epoch_boundary(tiny_model_dir, chat_file, tmp_path):
    # 16 examples, micro-batches of 3 -> 6 micro-batches an epoch; 2 per step -> an epoch ends every 3 steps
    tree = cfg_tree(tiny_model_dir, chat_file, tmp_path / "run", max_steps=6)
    tree["checkpoint"] = {"every_epoch": True}
    run_training(SFTConfig.model_validate(tree))
    ckpts = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000003", "step-00000006"]
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 1 and state["data"]["index"] == 0


def test_second_ctrl_c_exits_at_once(tiny_model_dir, chat_file, tmp_path):
    """First SIGINT: finish the step and save; a second one during that save exits now (130), and no
    incomplete checkpoint is ever taken for a complete one."""
    out = tmp_path / "run"
    tree = cfg_tree(tiny_model_dir, chat_file, out, max_steps=400)
    tree["checkpoint"] = {"every_steps": 1000}
    proc = run_cli(tree, tmp_path, {"SFTLAB_TEST_PAUSE_IN_SAVE": "*:60"}, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    while time.time() < deadline and not list((out / "checkpoints").glob(".tmp-step-*/model.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # while the save sleeps in the test hook
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert "second Ctrl-C" in log
    assert latest_checkpoint(out) is None


def test_tied_embeddings_are_checkpointed_without_accelerates_shared_tensor_note(
    tiny_model_dir, chat_file, tmp_path, caplog
):
    import logging

    from safetensors import safe_open
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_dir).tie_word_embeddings  # the head shares the embedding
    caplog.set_level(logging.WARNING)
    out = tmp_path / "run"
    run_training(SFTConfig.model_validate(cfg_tree(tiny_model_dir, chat_file, out, max_steps=2)))
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
    with safe_open(str(latest_checkpoint(out) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # stored once
    # the filter is scoped to the save: accelerate's note is back afterwards for anyone else
    from accelerate.utils.other import clean_state_dict_for_safetensors

    shared = torch.zeros(2)
    clean_state_dict_for_safetensors({"a": shared, "b": shared})
    assert [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_every_steps_epoch_is_every_epoch():
    from sftlab.config.schema import CheckpointConfig

    cfg = CheckpointConfig(every_steps="epoch")
    assert cfg.every_epoch and cfg.every_steps is None


def test_hf_model_in_each_checkpoint_loads_plainly_and_delete_at_end(tiny_model_dir, chat_file, tmp_path):
    """checkpoint.save_hf_model: every checkpoint holds hf/, a plain transformers directory with the step's
    weights (the last one equals the final model); delete_at_end removes them once the run has finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sftlab

    out = tmp_path / "run"
    tree = cfg_tree(tiny_model_dir, chat_file, out, max_steps=4)
    tree["checkpoint"] = {"every_steps": 2, "save_hf_model": True}
    seen = []

    class Look:
        def on_save(self, ckpt):
            model = AutoModelForCausalLM.from_pretrained(ckpt / "hf")
            assert AutoTokenizer.from_pretrained(ckpt / "hf").chat_template
            seen.append({k: v.clone() for k, v in model.state_dict().items()})

    sftlab.train(tree, callbacks=[Look()])
    assert len(seen) == 2 and not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    final = load_file(out / "model.safetensors")
    assert all(torch.equal(final[k], seen[1][k]) for k in final)

    tree["train"]["output_dir"] = str(tmp_path / "clean")
    tree["checkpoint"] = {"every_steps": 2, "delete_at_end": True}
    sftlab.train(tree)
    assert (tmp_path / "clean" / "model.safetensors").is_file() and not (
        tmp_path / "clean" / "checkpoints"
    ).exists()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_load_best_model_at_end_saves_the_best_evaluated_step(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, precision
):
    """Each evaluation runs as usual and then reports a loss that falls to step 3 and rises after it (so the
    best step is in the middle whatever the precision does to the real losses): the saved model is step 3's
    (equal to that step's checkpoint in an identical run), and rotation kept that checkpoint. Only the weights
    are read back: no whole-checkpoint restore (optimizer, scheduler, RNG)."""
    import accelerate

    import sftlab
    from sftlab.trainer import loop
    from sftlab.trainer.best import best_step

    real, scripted = loop.run_evaluation, [4.0, 2.0, 1.0, 3.0, 5.0]
    reported = itertools.cycle(scripted)  # one evaluation per step, the same script in each run

    def v_shaped(*args):
        return {**real(*args), "eval_loss": next(reported)}

    monkeypatch.setattr(loop, "run_evaluation", v_shaped)

    def tree(out, **ckpt):
        t = cfg_tree(
            tiny_model_dir, chat_file, out, max_steps=len(scripted), eval_every=1, mixed_precision=precision
        )
        t["data"]["eval_fraction"] = 0.25
        t["checkpoint"] = ckpt
        return t

    ref = sftlab.train(tree(tmp_path / "ref", every_steps=1))
    step, _ = best_step(ref.history, "eval_loss")
    assert step == 3, [r["eval_loss"] for r in ref.history]
    t = tree(tmp_path / "best", keep_last=1)
    t["train"]["load_best_model_at_end"] = True
    monkeypatch.setattr(
        accelerate.Accelerator, "load_state", lambda *a, **k: pytest.fail("whole checkpoint loaded")
    )
    res = sftlab.train(t)
    assert res.best_step == step
    assert (tmp_path / "best" / "checkpoints" / f"step-{step:08d}").is_dir()
    # that step's weights as the inference loader reads a checkpoint (bf16 runs: the optimizer's fp32 masters)
    want = load_model_dir(tmp_path / "ref" / "checkpoints" / f"step-{step:08d}")[0].state_dict()
    got = load_file(tmp_path / "best" / "model.safetensors")
    assert got.keys() <= want.keys() and [k for k in got if not torch.equal(got[k], want[k])] == []


def test_load_best_model_at_end_needs_a_logged_metric(tiny_model_dir, chat_file, tmp_path):
    import sftlab

    t = cfg_tree(tiny_model_dir, chat_file, tmp_path / "r", max_steps=2, load_best_model_at_end=True)
    with pytest.raises(RunError, match="needs eval data"):
        sftlab.train(t)
    t["data"]["eval_fraction"] = 0.25
    t["train"]["metric_for_best"] = "eval/other_loss"
    with pytest.raises(RunError, match="it logs eval_loss"):
        sftlab.train(t)
