"""Two processes (Accelerate over torch.distributed/gloo on CPU) train exactly like one.

Each rank takes half of every micro-batch; the loss denominator is the GLOBAL target-token count,
so per-step loss, gradient norm and the final weights match a single process that sees the same
examples in the same order (micro_batch_size x 2). The full fine-tuning launches also train a tiny
LLaVA on image rows (a second run in the same launch, tests/trainer/launch_runs.py): its batches carry
pixel values split between the ranks with their rows, and it matches one process the same way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from vlm_families import save_family, write_image_rows

pytestmark = pytest.mark.multiprocess
LAUNCH_RUNS = str(Path(__file__).with_name("launch_runs.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("peft", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_two_processes_match_one(peft, tiny_model_dir, chat_file, tmp_path):
    def cfg(out, micro, model=tiny_model_dir, data=chat_file):
        tree = {
            "model": {"name_or_path": str(model)},
            "data": {"train": [{"path": str(data)}], "max_seq_length": 256},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "train": {
                "output_dir": str(out),
                "micro_batch_size": micro,
                "grad_accum_steps": 2,
                "max_steps": 3,
                "mixed_precision": "no",
            },  # exact fp32 math: 1e-5 agreement
            "peft": peft,
        }
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    pairs = [(tmp_path / "one", tmp_path / "two", {})]
    if peft is None:  # the vision-language case rides along in the same launches
        pairs.append(
            (
                tmp_path / "vlm-one",
                tmp_path / "vlm-two",
                {"model": save_family("llava", tmp_path / "llava"), "data": write_image_rows(tmp_path)},
            )
        )
    single = [a for one, _, kw in pairs for a in ("0", cfg(one, 4, **kw))]
    double = [a for _, two, kw in pairs for a in (str(free_port()), cfg(two, 2, **kw))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    r1 = subprocess.run(
        [sys.executable, LAUNCH_RUNS, *single], env=env, capture_output=True, text=True, timeout=600
    )
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            LAUNCH_RUNS,
            *double,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert r2.stdout.count("x2 processes") == len(pairs)

    for one, two, _ in pairs:
        m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
        assert len(m1) == 3 and [r["target_tokens"] for r in m1] == [r["target_tokens"] for r in m2]
        for a, b in zip(m1, m2):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        weights = "adapter_model.safetensors" if peft else "model.safetensors"
        w1, w2 = load_file(one / weights), load_file(two / weights)
        # Adam turns float-reduction-order noise in near-zero gradient entries into lr-sized steps,
        # so the weights are compared as whole tensors (relative norm), not element by element.
        for k in w1:  # (a frozen all-zero tensor, such as a vision tower's bias, must stay equal)
            rel = ((w1[k] - w2[k]).norm() / w1[k].norm()).item() if w1[k].any() else float(w2[k].any())
            assert rel < 1e-4, f"{one.name} {k}: relative difference {rel:.2e}"
    if peft is None:
        assert (
            tmp_path / "vlm-two" / "processor_config.json"
        ).is_file()  # the processor saved with the model


def test_killing_the_launcher_stops_its_workers(tiny_model_dir, chat_file, tmp_path):
    """kill -9 of the launcher (torchrun's agent) takes its workers with it at once (parent-death signal),
    so none trains on and writes checkpoints after it; the last complete checkpoint stays the last."""
    import signal
    import time

    out = tmp_path / "run"
    config = tmp_path / "long.yaml"
    tree = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(chat_file)}], "max_seq_length": 256},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 1,
            "max_steps": 100000,
            "mixed_precision": "no",
        },
        "checkpoint": {"every_steps": 1, "keep_last": 2},
    }
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), LAUNCH_RUNS, "0", str(config)]
    launcher = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").is_file():  # training: a checkpoint per step
            assert launcher.poll() is None and time.time() < deadline, "the launch ended or never trained"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        workers = [int(p) for p in children.stdout.split()]
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        killed = time.time()
        while any(os.path.exists(f"/proc/{p}") and "Z" not in _state(p) for p in workers):
            assert time.time() - killed < 20, "workers outlived their launcher"
            time.sleep(0.2)
        after = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        time.sleep(2)
        assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == after  # nothing written after
    finally:
        launcher.kill()


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
