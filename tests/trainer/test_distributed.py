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


def torchrun(procs: int = 2) -> list[str]:
    """`torchrun` for `procs` processes on this machine, on a free port; the program and its arguments follow."""
    program = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    return program + ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def write_config(out: Path, micro: int, model, data, peft=None) -> str:
    """A 3-step run's config beside `out` (exact fp32 math: 1e-5 agreement), micro-batches of `micro`."""
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
        },
        "peft": peft,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("peft", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_two_processes_match_one(peft, tiny_model_dir, chat_file, tmp_path):
    def cfg(out, micro, model=tiny_model_dir, data=chat_file):
        return write_config(out, micro, model, data, peft)

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
        [*torchrun(), LAUNCH_RUNS, *double],
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
    launch = [*torchrun(), LAUNCH_RUNS, "0", str(config)]
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


SCRIPT = """
import os, sys, time
import sftlab
config, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])

def slow(row):  # a first preparation far longer than train.dist_timeout (the cache serves the second)
    time.sleep(0.25)
    return row

if mode == "slow":
    sftlab.train(config, formatting_func=slow)
else:  # each rank with another learning rate: the run must refuse at once, naming the rank
    sftlab.train(config, **{"optim.lr": 1e-3 * (1 + rank)})
print("done", rank, flush=True)
"""


def _launch(tmp_path, mode: str, dist_timeout: int, max_steps: int = 1):
    rows = [{"prompt": f"Q{i}: what is {i} + {i}?", "completion": f" {2 * i}"} for i in range(48)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / f"{mode}.yaml"
    tree = {
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 256, "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / mode), "max_steps": max_steps, "dist_timeout": dist_timeout},
    }
    config.write_text(yaml.safe_dump(tree))
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "SFTLAB_CACHE": str(tmp_path / "c"),
    }
    launch = [*torchrun(), str(script), str(config), mode]
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)


def test_a_first_preparation_longer_than_the_timeout_waits_outside_collectives(tiny_model_dir, tmp_path):
    """Rank 0 prepares for ~12 s under train.dist_timeout: 5; rank 1 waits for its cache outside any
    collective (a barrier would abort after 5 s), then both train."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    r = _launch(tmp_path, "slow", dist_timeout=5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done 0" in r.stdout and "done 1" in r.stdout
    assert (tmp_path / "slow" / "model.safetensors").is_file()


def test_ranks_that_disagree_on_the_config_stop_at_once_naming_the_rank(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    r = _launch(tmp_path, "mismatch", dist_timeout=60)
    assert r.returncode != 0
    assert "rank 1 runs with config = " in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "mismatch" / "checkpoints").exists()


def test_a_killed_rank_stops_the_others_naming_it(tiny_model_dir, chat_file, tmp_path):
    """kill -9 of one worker mid-run: the launcher stops the other within train.dist_timeout (here 30 s;
    it does not wait in a collective) and says which rank died."""
    import signal
    import time

    out = tmp_path / "run"
    config = tmp_path / "long.yaml"
    tree = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(chat_file)}], "max_seq_length": 256},
        "train": {"output_dir": str(out), "micro_batch_size": 1, "max_steps": 100000, "dist_timeout": 30},
        "checkpoint": {"every_steps": 1, "keep_last": 2},
    }
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launch = [*torchrun(), LAUNCH_RUNS, "0", str(config)]
    launcher = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").is_file():
            assert launcher.poll() is None and time.time() < deadline, "the launch ended or never trained"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        workers = sorted(int(p) for p in children.stdout.split())
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        output, _ = launcher.communicate(timeout=60)
        assert time.time() - killed < 30 and launcher.returncode != 0
        assert "exitcode: -9" in output and f"pid: {workers[1]}" in output
        assert not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in workers)
    finally:
        launcher.kill()


def test_two_nodes_match_one_process(tiny_model_dir, chat_file, tmp_path):
    """Two "nodes" on this machine (two torchrun launches, --nnodes 2, one process each, gloo on
    127.0.0.1) train like one process with the same global batch: per-step loss and gradient norm."""

    def cfg(out, micro):
        return write_config(out, micro, tiny_model_dir, chat_file)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    one = subprocess.run(
        [sys.executable, LAUNCH_RUNS, "0", cfg(tmp_path / "one", 4)], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stdout + one.stderr
    port, two = str(free_port()), cfg(tmp_path / "two", 2)
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
            + [
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                LAUNCH_RUNS,
                "0",
                two,
            ],
            env={**env, "SFTLAB_CACHE": str(tmp_path / f"node{rank}-cache")},  # each node's own data cache
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_resume_on_another_world_size_trains_the_same_steps(tiny_model_dir, chat_file, tmp_path):
    """train.global_batch_size 6 over the 16 examples (each epoch: steps of 6, 6, 4). 2 processes killed
    after step 2 resume on 1 (accumulation 3 -> 6), and 1 process killed after step 2 resumes on 2: every
    step trains on the uninterrupted 2-process run's examples, with its loss and gradient norm (fp32)."""

    def config(name: str) -> Path:
        tree = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [{"path": str(chat_file)}], "max_seq_length": 256},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "train": {
                "output_dir": str(tmp_path / name),
                "micro_batch_size": 1,
                "global_batch_size": 6,
                "max_steps": 5,
                "mixed_precision": "no",
            },
            "checkpoint": {"every_steps": 2},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    def train(name: str, procs: int, *overrides: str, kill: bool = False) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        env["SFTLAB_TEST_STEP_UNITS"] = str(tmp_path / f"{name}-units.jsonl")
        if kill:
            env["SFTLAB_TEST_KILL_AFTER_STEP"] = "2"
        launch = [*torchrun(procs), "-m"] if procs > 1 else [sys.executable, "-m"]
        launch += ["sftlab.cli", "train", str(config(name)), *overrides]
        r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
        assert (r.returncode != 0) if kill else (r.returncode == 0), r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    def steps(name: str) -> tuple[list[str], list[dict]]:
        units = (tmp_path / f"{name}-units.jsonl").read_text().splitlines()
        return units, [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    train("ref", 2)
    for name, first, then in (("two-to-one", 2, 1), ("one-to-two", 1, 2)):
        train(name, first, kill=True)
        out = train(name, then, "train.resume=auto")
        assert f"resume on {then} process(es) (the checkpoint: {first})" in " ".join(out.split())
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert (info["num_processes"], info["grad_accum_steps"]) == (then, 6 // then)
    ref_units, ref = steps("ref")
    assert [len(json.loads(u)) for u in ref_units] == [6, 6, 4, 6, 6]
    for name in ("two-to-one", "one-to-two"):
        units, got = steps(name)
        assert units == ref_units, name  # the same examples formed every step
        assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in ref]
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), name
