"""The longest sequence one full fine-tuning step trains, one process against N-way sequence parallelism
(train.sequence_parallel: N, DeepSpeed Ulysses on N CPU processes), and the peak RSS of each process.
SmolLM2-135M-Instruct has 9 attention heads (3 KV heads), which Ulysses splits 3 ways, not 2: the default
compares 1 process with 3; `--model random-1b` (a Llama-3.2-1B shape, 32 heads) splits 2 ways.

    python benchmarks/bench_sequence.py                      # SmolLM2-135M-Instruct (default), fp32
    python benchmarks/bench_sequence.py --start 1024 --cap-gib 5 --max-len 16384 --json out.json

One pretokenized row of L random token ids (every token a target, packing off, micro_batch_size 1, one
step, no checkpoint) is trained with `sftlab train` in one process, then under `accelerate launch` with
configs/accelerate/deepspeed_zero2.yaml and train.sequence_parallel: 2. L doubles from --start until a run
fails or a process's RSS passes --cap-gib (the run is then killed: it is counted as not fitting), so the
machine is never exhausted. Peak RSS is sampled every 0.2 s over the launcher's process tree (per process);
with --device cuda also the peak memory used per GPU (nvidia-smi, sampled the same way).

    python benchmarks/bench_sequence.py --device cuda --lengths 8192 16384   # benchmarks/gpu_check.sh
    python benchmarks/bench_sequence.py --sp 1 3 --recompute on   # both sides recompute (equal work)

`--recompute auto|on|off` sets train.gradient_checkpointing (auto: sftlab's own choice, which knows the
machine's free memory but not --cap-gib). The run's error line is kept when it fails (e.g. a length past
the model's max_position_embeddings).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_env (the model presets)
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"


def write_case(work: Path, length: int, sp: int, model: str, recompute: str = "auto") -> Path:
    rng = random.Random(length)
    data = work / f"row-{length}.jsonl"
    if not data.exists():
        data.write_text(json.dumps({"input_ids": [rng.randrange(100, 40000) for _ in range(length)]}) + "\n")
    tree = {
        "model": {"name_or_path": model},
        "data": {"train": [{"path": str(data)}], "max_seq_length": length, "packing": "none"},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "train": {
            "output_dir": str(work / f"run-{length}-sp{sp}-{recompute}"),
            "micro_batch_size": 1,
            "grad_accum_steps": 1,
            "max_steps": 1,
            "mixed_precision": "no",
            "compile": False,
            "sequence_parallel": sp,
            "gradient_checkpointing": {"auto": "auto", "on": True, "off": False}[recompute],
        },
        "checkpoint": {"every_steps": None, "every_epoch": False},
    }
    path = work / f"run-{length}-sp{sp}-{recompute}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def gpu_used_gib() -> list[float]:
    """Memory in use on each GPU (nvidia-smi), GiB."""
    q = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    out = subprocess.run(q, capture_output=True, text=True, check=False).stdout
    return [int(x) / 1024 for x in out.split()]


def run(config: Path, sp: int, cap: float, timeout: float, cuda: bool = False) -> dict:
    """One training step; {"ok", "peak_rss_gib" (per worker), "peak_gpu_gib" (per GPU), "seconds", "why"}."""
    cmd = [sys.executable, "-m", "sftlab.cli", "train", str(config)]
    if sp > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2)]
        cmd = launch + ["--num_processes", str(sp), "-m", "sftlab.cli", "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // sp))}
    t0, peaks, why, gpu = time.time(), {}, "", [0.0] * len(gpu_used_gib() if cuda else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            for p in tree:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss / 2**30)
        except psutil.Error:
            pass
        if cuda:
            gpu = [max(a, b) for a, b in zip(gpu, gpu_used_gib())]
        if peaks and max(peaks.values()) > cap:
            why = f"RSS over the {cap} GiB cap"
        elif time.time() - t0 > timeout:
            why = f"over {timeout:.0f} s"
        if why:
            for p in reversed([top, *top.children(recursive=True)]):
                p.kill()
            break
        time.sleep(0.2)
    out = proc.communicate()[0]
    ok = not why and proc.returncode == 0
    if not ok and not why:
        lines = [x for x in out.splitlines() if x.strip().strip("=-") and "rror" in x] or out.splitlines()
        why = lines[-1].strip()[:200] if lines else f"exit {proc.returncode}"
    workers = sorted(peaks.values(), reverse=True)[: max(sp, 1)]  # the workers, not the launcher
    return {
        "ok": ok,
        "peak_rss_gib": [round(x, 2) for x in workers],
        "seconds": round(time.time() - t0, 1),
        "why": why,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--start", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=32768)
    ap.add_argument("--cap-gib", type=float, default=5.0, help="per-process RSS cap")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument(
        "--sp", type=int, nargs="+", default=[1, 3], help="SmolLM2-135M's 9 heads split 3 ways, not 2"
    )
    ap.add_argument("--lengths", type=int, nargs="+", help="these lengths, each run whatever the last gave")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: also peak memory per GPU")
    ap.add_argument(
        "--recompute", choices=["auto", "on", "off"], default="auto", help="train.gradient_checkpointing"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if (
            model != "default"
        ):  # a directory, a preset (random-1b: 32 heads, any 2-way split) or a .json shape
            from bench_env import resolve_model

            from sftlab.config.schema import ModelConfig
            from sftlab.model.loading import resolve_model_path

            model = resolve_model(model, Path(tmp), resolve_model_path(ModelConfig()))[0]
        for sp in args.sp:
            todo = list(args.lengths or [])
            length = todo.pop(0) if todo else args.start
            while length <= args.max_len or args.lengths:
                r = {
                    "sequence_parallel": sp,
                    "length": length,
                    "recompute": args.recompute,
                    **run(
                        write_case(Path(tmp), length, sp, model, args.recompute),
                        sp,
                        args.cap_gib,
                        args.timeout,
                    ),
                }
                results.append(r)
                print(json.dumps(r), flush=True)
                if args.lengths:  # each given length, whatever the last gave
                    if not todo:
                        break
                    length = todo.pop(0)
                    continue
                if not r["ok"]:
                    break
                length *= 2
    for sp in args.sp:
        fits = [r["length"] for r in results if r["sequence_parallel"] == sp and r["ok"]]
        print(f"sequence_parallel {sp}: longest that trained: {max(fits) if fits else 'none'} tokens")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
