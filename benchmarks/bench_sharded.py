"""Memory per process under each engine, in the same run: one process, then 2 processes under DDP,
FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (the recipes in configs/accelerate/), on the embedded demo
(SmolLM2-135M-Instruct, fp32 full fine-tuning, 3 optimizer steps, no checkpoints).

For every process that runs `sftlab.cli train` the peak anonymous memory (RssAnon, sampled from /proc
every 100 ms: weights, gradients, optimizer state and activations, not the shared libraries) is
recorded, with glibc's mmap threshold at 64 KiB so that freed buffers leave RssAnon at once. The
table gives the largest rank and its ratio to one process, next to the ratio the memory table in README ("Scaling out") predicts for the weights/gradients/moments part. Per-step
loss of every engine is printed next to one process's (same global batch, so they should agree).

    python benchmarks/bench_sharded.py              # all engines (DeepSpeed ones when installed)
    python benchmarks/bench_sharded.py --engines ddp,fsdp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_case import _children, _status  # the /proc sampling the other benchmarks use

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "sftlab" / "demo" / "demo.yaml"
RECIPES = {
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
}
# weights + grads + 2 Adam moments = 16 B/param: the share of it one rank holds with 2 ranks
PREDICTED = {"single": 1.0, "ddp": 1.0, "fsdp": 0.5, "zero2": (4 + 12 / 2) / 16, "zero3": 0.5}


def _trainers(root: int) -> list[int]:
    """`root` and its descendants that run `sftlab.cli train` (the ranks, not the launcher)."""
    found = []
    for pid in [root, *_children(root)]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sftlab.cli" in cmd and b"accelerate.commands.launch" not in cmd:
            found.append(pid)
    return found


def run(engine: str, out: Path) -> dict:
    world = 1 if engine == "single" else 2
    overrides = [
        f"train.output_dir={out}",
        "train.overwrite=true",
        "match_eval=null",
        "train.max_steps=3",
        f"train.micro_batch_size={8 // world}",
        "train.grad_accum_steps=1",
        "train.mixed_precision=no",
        "checkpoint.every_steps=null",
        "checkpoint.every_epoch=false",
        "data.eval_fraction=0.0",
    ]
    cmd = [sys.executable, "-m", "sftlab.cli", "train", str(DEMO), *overrides]
    if engine != "single":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs" / "accelerate" / RECIPES[engine]),
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            "-m",
            "sftlab.cli",
            "train",
            str(DEMO),
            *overrides,
        ]
    peak: dict[int, int] = {}  # pid -> peak RssAnon in bytes
    t0 = time.perf_counter()
    # glibc keeps freed heap chunks (FSDP gathers and frees every layer's weights each step): allocations
    # above 64 KiB are mmapped instead, so RssAnon follows the live tensors, for every engine alike
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in _trainers(proc.pid):
                peak[pid] = max(peak.get(pid, 0), _status(pid).get("RssAnon", 0))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed (rc {proc.returncode}):\n{output[-4000:]}")
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "peak": max(peak.values()),
        "ranks": len(peak),
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="ddp,fsdp,zero2,zero3")
    args = ap.parse_args()
    engines = ["single"] + [
        e
        for e in args.engines.split(",")
        if not e.startswith("zero") or importlib.util.find_spec("deepspeed")
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            results[engine] = run(engine, Path(tmp) / engine)
            r = results[engine]
            print(
                f"{engine}: {r['ranks']} process(es), peak RssAnon of the largest {r['peak'] / 2**30:.2f} GiB "
                f"({r['seconds']:.0f}s)",
                flush=True,
            )
    base = results["single"]
    print(
        "\n| engine | processes | peak RssAnon per process | vs 1 process | predicted (states only) | "
        "loss per step (1 process: " + ", ".join(f"{x:.4f}" for x in base["losses"]) + ") |"
    )
    print("|---|---|---|---|---|---|")
    for engine, r in results.items():
        print(
            f"| {engine} | {r['ranks']} | {r['peak'] / 2**30:.2f} GiB | {r['peak'] / base['peak']:.2f}x | "
            f"{PREDICTED[engine]:.2f}x | {', '.join(f'{x:.4f}' for x in r['losses'])} |"
        )


if __name__ == "__main__":
    main()
