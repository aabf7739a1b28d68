"""GPU paths: run where CUDA exists (skipped with the reason on CPU); the CPU-side errors always run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import yaml

from sftlab.config import SFTConfig
from sftlab.trainer.loop import RunError, run_training

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_liger = pytest.mark.skipif(
    not CUDA or importlib.util.find_spec("liger_kernel") is None,
    reason="needs a CUDA device and liger-kernel",
)


def make_cfg(model_dir, data, out, **train) -> SFTConfig:
    return SFTConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": [{"path": str(data)}], "max_seq_length": 256, "packing": "bfd"},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "train": {
                "output_dir": str(out),
                "micro_batch_size": 2,
                "grad_accum_steps": 2,
                "max_steps": 4,
                **train,
            },
        }
    )


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_liger_without_cuda_is_a_clear_error(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(RunError, match="train.liger: .*CUDA device"):
        run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / "run", liger=True))


@needs_cuda
def test_cuda_bf16_auto_trains_packed(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    res = run_training(make_cfg(tiny_model_dir, chat_file, out))
    info = json.loads((out / "run.json").read_text())
    assert (
        info["device"].startswith("cuda")
        and info["mixed_precision"] == "bf16"
        and info["loss_head"] == "target"
    )
    assert res.history[-1]["loss"] < res.history[0]["loss"]


@needs_cuda
def test_cuda_target_head_equals_full_logits(tiny_model_dir, chat_file, tmp_path):
    runs = {
        h: run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / h, loss_head=h, mixed_precision="no"))
        for h in ("target", "full")
    }
    for a, b in zip(runs["target"].history, runs["full"].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@needs_liger
def test_liger_trains_like_the_plain_path(tiny_model_dir, chat_file, tmp_path):
    """In a subprocess: Liger patches transformers' modeling functions for the whole process."""
    plain = run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / "plain", mixed_precision="no"))
    cfg = make_cfg(tiny_model_dir, chat_file, tmp_path / "liger", mixed_precision="no", liger=True)
    path = tmp_path / "liger.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    done = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "train", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    liger = [json.loads(x) for x in (tmp_path / "liger" / "metrics.jsonl").read_text().splitlines()]
    assert liger[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-3)
    assert liger[-1]["loss"] < liger[0]["loss"]
