"""Sequence parallelism (train.sequence_parallel: 2) through DeepSpeed Ulysses on 2 CPU processes (gloo),
launched with `accelerate launch` and configs/accelerate/deepspeed_zero2.yaml as a user would, a tiny
Llama, fp32 math.

- Padded rows and packed rows (per-document attention by position ids): every step's loss, gradient norm
  and target count equal one process with the same global batch within 1e-5 (both processes of a group
  train on the same rows, each on half their length).
- A checkpoint of the 2-process run resumes (train.resume=auto) and continues exactly as uninterrupted.
- Settings that cannot run are refused before the model loads, each with what would work.

The launches are skipped (with the reason) where `deepspeed` is not installed; `make setup` installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tokenizer, chat_rows, save_tiny_model, write_jsonl

from sftlab.config.loading import resolve_config
from sftlab.trainer import sequence_parallel

ROOT = Path(__file__).resolve().parents[2]
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="deepspeed is not installed (make setup installs it)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp")
    return {
        "root": root,
        "model": save_tiny_model(root / "tiny-model", build_tokenizer()),
        "data": write_jsonl(root / "chat.jsonl", chat_rows()),
    }


def config(lab: dict[str, Path], name: str, micro: int, packing: str = "none", **train) -> Path:
    tree = {
        "model": {"name_or_path": str(lab["model"])},
        "data": {"train": [{"path": str(lab["data"])}], "max_seq_length": 256, "packing": packing},
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "train": {
            "output_dir": str(lab["root"] / name),
            "micro_batch_size": micro,
            "grad_accum_steps": 2,
            "max_steps": 3,
            "mixed_precision": "no",
            **train,
        },
        "checkpoint": {"every_steps": 1, "keep_last": None},
    }
    path = lab["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(cfg: Path, *overrides: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    program = ["-m", "sftlab.cli", "train", str(cfg), *overrides]
    cmd = [sys.executable, *program]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2)]
        cmd += ["--num_processes", str(processes), "--main_process_port", str(free_port()), *program]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    (cfg.parent / f"{cfg.stem}.log").write_text(r.stdout + r.stderr)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(one: list[dict], two: list[dict]) -> None:
    assert len(one) == len(two) == 3
    assert [r["target_tokens"] for r in one] == [r["target_tokens"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@needs_deepspeed
@pytest.mark.multiprocess
@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_two_way_sequence_parallel_equals_one_process(lab, packing):
    """Both processes train on the same micro-batch (the data-parallel world is 1), so one process with
    the same micro_batch_size trains on exactly the same rows."""
    one = config(lab, f"one-{packing}", 2, packing)
    two = config(lab, f"sp-{packing}", 2, packing, sequence_parallel=2)
    launch(one, processes=1)
    launch(two)
    assert_same_steps(steps(lab["root"] / f"one-{packing}"), steps(lab["root"] / f"sp-{packing}"))
    info = json.loads((lab["root"] / f"sp-{packing}" / "run.json").read_text())
    assert info["reasons"]["sequence_parallel"] == "auto: the launch runs DeepSpeed (Ulysses)"


@needs_deepspeed
@pytest.mark.multiprocess
def test_a_sequence_parallel_run_resumes_exactly(lab):
    """Resumed from the uninterrupted run's step-2 checkpoint (its ZeRO partitions) into a new output_dir:
    step 3 as uninterrupted."""
    full = lab["root"] / "sp-none"
    if not (full / "metrics.jsonl").is_file():
        launch(config(lab, "sp-none", 2, sequence_parallel=2))
    launch(
        config(lab, "sp-resumed", 2, sequence_parallel=2),
        f"train.resume={full / 'checkpoints' / 'step-00000002'}",
    )
    resumed, uninterrupted = steps(lab["root"] / "sp-resumed"), steps(full)
    assert resumed[-1]["step"] == 3
    assert resumed[-1]["loss"] == pytest.approx(uninterrupted[-1]["loss"], rel=1e-6)
    assert resumed[-1]["grad_norm"] == pytest.approx(uninterrupted[-1]["grad_norm"], rel=1e-6)


def refusal(lab, tmp_path, world: int, deepspeed: bool = True, cuda: bool = False, **changes) -> str:
    tree = yaml.safe_load(config(lab, "refused", 2).read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        tree[section][name] = value
    cfg = resolve_config(tree)
    with pytest.raises(sequence_parallel.SequenceParallelError) as e:
        sequence_parallel.choose_backend(cfg, world, deepspeed, cuda)
        sequence_parallel.check_settings(cfg)
    return str(e.value)


@pytest.mark.parametrize(
    "case, expected",
    [
        ({"world": 3}, "must divide the number of processes (3)"),
        ({"world": 1}, "must divide the number of processes (1)"),
        ({"world": 2, "deepspeed": False}, "torch context parallel needs CUDA"),
        ({"world": 2, "deepspeed": False, "cuda": True}, "torch context parallel is not wired"),
        ({"world": 2, "train__sequence_parallel_backend": "torch"}, "torch context parallel needs CUDA"),
        (
            {"world": 2, "deepspeed": False, "train__sequence_parallel_backend": "deepspeed"},
            "needs a DeepSpeed launch",
        ),
        ({"world": 2, "train__loss_normalization": "sequence_mean"}, "use tokens"),
        ({"world": 2, "train__packed_attention": "mask", "data__packing": "bfd"}, "use documents or auto"),
        ({"world": 2, "model__attn_implementation": "eager"}, "use sdpa or flash_attention_2"),
    ],
)
def test_settings_that_cannot_run_are_refused_with_what_would(lab, tmp_path, case, expected):
    sizes = {"train__sequence_parallel": 2 if case["world"] != 3 else 2}
    assert expected in refusal(lab, tmp_path, **{**sizes, **case})


def test_micro_batch_tokens_is_refused(lab, tmp_path):
    message = refusal(
        lab, tmp_path, 2, train__sequence_parallel=2, train__micro_batch_tokens=512, train__micro_batch_size=1
    )
    assert "set train.micro_batch_size instead" in message


def test_one_process_is_refused_before_the_model_loads(lab):
    r = launch(config(lab, "alone", 2, sequence_parallel=2), processes=1, check=False)
    assert r.returncode != 0
    assert "train.sequence_parallel: 2 must divide the number of processes (1)" in r.stdout + r.stderr
    assert not (lab["root"] / "alone" / "run.json").exists()
