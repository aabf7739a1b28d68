"""The scale case of bench_data.py: prepare N conversations (e.g. a million) from a JSONL file and start
training on the result, each in its own process, measuring peak memory.

1. Seeded rows are written to a JSONL file one at a time (the generators never hold them all), in
   two shapes: `synthetic` (make_conversations.py: 1-4 turns, ~240 tokens mean, packed at 1024)
   and `chats` (make_chats.py: GSM8K-like problems and ShareGPT-like chats recombined into 1-6
   turns, a third with system prompts, rows up to ~3 kB, max_seq_length 4096; issue 23's shape).
2. `sftlab prepare` runs on each with num_proc 1, then 2 (each into its own empty cache directory),
   in a child process whose memory is sampled every 200 ms from /proc: the peak of RSS and RssAnon
   of the main process, the peak anonymous PSS of main + workers together (Pss_Anon + Pss_Shmem
   from smaps_rollup summed over the process tree: pages the forked workers share with the main
   process are split between them, not counted twice) and the peak total PSS of the tree (mapped
   files included). Examples/s = rows / wall time of the child.
3. `sftlab train` starts on the prepared `synthetic` cache (the embedded SmolLM2-135M model, packing
   bfd at 1024, 3 optimizer steps, no eval, no match eval) and, as the baseline, the same run on the
   first 1000 rows (a separate file, separate cache, prepared first); the RssAnon peaks are compared.

RssAnon (anonymous memory: Python objects, tensors) is the memory a data set must not inflate;
the memory-mapped token arrays show up in RssFile (page cache the kernel can drop).

    python benchmarks/scale_case.py --rows 200000 --shape chats --no-train --dir /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from make_chats import make_chat
from make_conversations import make_conversation

CAPACITY = 1024
SHAPES = {"synthetic": (make_conversation, CAPACITY), "chats": (make_chat, 4096)}  # generator, max_seq_length


def write_conversations(path: Path, n: int, seed: int, shape: str = "synthetic") -> None:
    rng = random.Random(seed)  # the same stream as make_conversations(n, seed) / make_chats.py
    make = SHAPES[shape][0]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(make(rng)) + "\n")


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon (from status) and Pss, Pss_Anon, Pss_Shmem (from smaps_rollup: shared pages split
    between the processes that share them, so forked workers are not counted twice), in bytes."""
    out = {}
    for name, keys in (("status", ("VmRSS", "RssAnon")), ("smaps_rollup", ("Pss", "Pss_Anon", "Pss_Shmem"))):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in keys:
                        out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids + [g for k in kids for g in _children(k)]


@dataclass
class Measured:
    seconds: float
    rc: int
    main_rss: int = 0
    main_anon: int = 0
    tree_rss: int = 0  # total PSS of main + workers (mapped files included)
    tree_anon: int = 0  # anonymous PSS of main + workers: Pss_Anon + Pss_Shmem
    tail: str = ""


def measure(cmd: list[str], log: Path) -> Measured:
    """Run `cmd`, sampling its memory (and its children's) every 200 ms."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        m = Measured(0.0, 0)
        done = threading.Event()

        def sample():
            while not done.is_set():
                main = _status(proc.pid)
                tree = [main] + [_status(k) for k in _children(proc.pid)]
                m.main_rss = max(m.main_rss, main.get("VmRSS", 0))
                m.main_anon = max(m.main_anon, main.get("RssAnon", 0))
                m.tree_rss = max(m.tree_rss, sum(s.get("Pss", 0) for s in tree))
                m.tree_anon = max(
                    m.tree_anon, sum(s.get("Pss_Anon", 0) + s.get("Pss_Shmem", 0) for s in tree)
                )
                time.sleep(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        m.rc = proc.wait()
        done.set()
        thread.join()
    m.seconds = time.perf_counter() - t0
    m.tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
    return m


def _config(
    path: Path, data_file: Path, cache_dir: Path, num_proc: int, out_dir: Path, max_seq_length: int = CAPACITY
) -> Path:
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "data": {
                    "train": [{"path": str(data_file)}],
                    "eval_fraction": 0.0,
                    "max_seq_length": max_seq_length,
                    "on_overlength": "drop",
                    "packing": "bfd",
                    "num_proc": num_proc,
                    "cache_dir": str(cache_dir),
                },
                "train": {
                    "output_dir": str(out_dir),
                    "micro_batch_size": 1,
                    "grad_accum_steps": 1,
                    "max_steps": 3,
                    "log_every": 1,
                },
                "match_eval": None,
            }
        )
    )
    return path


def sftlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "sftlab.cli", *args]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def prepare_case(rows: int, seed: int, workdir: Path, shape: str) -> dict[int, Path] | None:
    """Write the `shape` rows (once) and prepare them with num_proc 1 and 2; prints a table; returns the
    caches (None when a run failed)."""
    make, capacity = SHAPES[shape]
    data = workdir / (
        f"conversations-{rows}-{seed}.jsonl" if shape == "synthetic" else f"{shape}-{rows}-{seed}.jsonl"
    )
    if not data.is_file():
        t0 = time.perf_counter()
        write_conversations(data, rows, seed, shape)
        print(
            f"wrote {rows} {shape} rows to {data} ({data.stat().st_size / 2**20:.0f} MiB) in "
            f"{time.perf_counter() - t0:.0f}s (not timed)"
        )
    print(f"\n## scale: prepare {rows} {shape} rows from JSONL (pack bfd {capacity}), one process each run")
    print(
        f"{'num_proc':>8s} {'seconds':>8s} {'examples/s':>11s} {'peak RSS main':>14s} {'RssAnon main':>13s} "
        f"{'anon PSS tree':>14s} {'PSS tree':>9s}"
    )
    caches = {}
    for procs in (1, 2):
        caches[procs] = workdir / f"cache-{shape}-p{procs}"
        subprocess.run(["rm", "-rf", str(caches[procs])], check=True)
        cfg = _config(
            workdir / f"prepare-{shape}-p{procs}.yaml", data, caches[procs], procs, workdir / "out", capacity
        )
        m = measure(sftlab("prepare", str(cfg)), workdir / f"prepare-{shape}-p{procs}.log")
        if m.rc != 0:
            print(f"prepare num_proc={procs} failed (rc {m.rc}):\n{m.tail}")
            return None
        print(
            f"{procs:8d} {m.seconds:8.1f} {rows / m.seconds:11.0f} {gib(m.main_rss):>14s} {gib(m.main_anon):>13s} "
            f"{gib(m.tree_anon):>14s} {gib(m.tree_rss):>9s}"
        )
    print("  " + m.tail.splitlines()[-1])
    return caches


def run_scale_case(
    rows: int, seed: int, workdir: Path, shapes: tuple[str, ...] = ("synthetic", "chats"), train: bool = True
) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    caches = {}
    for shape in shapes:
        caches[shape] = prepare_case(rows, seed, workdir, shape)
        if caches[shape] is None:
            return
    if not train or "synthetic" not in caches:
        return
    data = workdir / f"conversations-{rows}-{seed}.jsonl"
    small = workdir / f"conversations-1000-{seed}.jsonl"
    with open(data) as src, open(small, "w") as dst:
        for _ in range(1000):
            dst.write(src.readline())

    print("\n## scale: training start on the prepared cache vs on 1000 rows (SmolLM2-135M, 3 steps)")
    results = {}
    for name, data_file, cache in (
        ("1k rows", small, workdir / "cache-small"),
        (f"{rows} rows", data, caches["synthetic"][1]),
    ):
        cfg = _config(
            workdir / f"train-{name.split()[0]}.yaml", data_file, cache, 1, workdir / f"run-{name.split()[0]}"
        )
        if name == "1k rows":
            subprocess.run(sftlab("prepare", str(cfg)), check=True, capture_output=True)
        m = measure(sftlab("train", str(cfg)), workdir / f"train-{name.split()[0]}.log")
        if m.rc != 0:
            print(f"training on {name} failed (rc {m.rc}):\n{m.tail}")
            return
        results[name] = m
        print(f"{name:>12s}: {m.seconds:6.1f}s, peak RssAnon {gib(m.main_anon)}, peak RSS {gib(m.main_rss)}")
    a, b = results["1k rows"], results[f"{rows} rows"]
    print(
        f"RssAnon difference ({rows} rows - 1k rows): {(b.main_anon - a.main_anon) / 2**30:+.2f} GiB "
        f"(target: within 1 GiB); RSS difference {(b.main_rss - a.main_rss) / 2**30:+.2f} GiB"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--no-train", action="store_true", help="prepare only")
    ap.add_argument("--dir", type=Path, required=True, help="work directory (data files, caches, logs)")
    args = ap.parse_args(argv)
    shapes = tuple(SHAPES) if args.shape == "all" else (args.shape,)
    run_scale_case(args.rows, args.seed, args.dir, shapes, train=not args.no_train)


if __name__ == "__main__":
    main()
