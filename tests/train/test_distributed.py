"""Two processes (Accelerate over torch.distributed/gloo on CPU) train exactly like one.

Each rank takes half of every micro-batch; the loss denominator is the GLOBAL target-token count,
so per-step loss, gradient norm and the final weights match a single process that sees the same
examples in the same order (micro_batch_size x 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("peft", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_two_processes_match_one(peft, tiny_model_dir, chat_file, tmp_path):
    def cfg(out, micro):
        tree = {"model": {"name_or_path": str(tiny_model_dir)},
                "data": {"train": [{"path": str(chat_file)}], "max_seq_length": 256},
                "optim": {"lr": 3e-3, "warmup_steps": 0},
                "train": {"output_dir": str(out), "micro_batch_size": micro, "grad_accum_steps": 2, "max_steps": 3,
                              "mixed_precision": "no"},  # exact fp32 math: 1e-5 agreement
                "peft": peft}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", cfg(one, 4)], env=env,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                         "-m", "sftlab.cli", "train", cfg(two, 2)], env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "x2 processes" in r2.stdout

    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["target_tokens"] for r in m1] == [r["target_tokens"] for r in m2]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    w1, w2 = load_file(one / weights), load_file(two / weights)
    # Adam turns float-reduction-order noise in near-zero gradient entries into lr-sized steps,
    # so the weights are compared as whole tensors (relative norm), not element by element.
    for k in w1:
        rel = ((w1[k] - w2[k]).norm() / w1[k].norm()).item()
        assert rel < 1e-4, f"{k}: relative difference {rel:.2e}"
