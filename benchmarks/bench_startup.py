"""How fast each `sftlab` command answers a missing path, against `python -c "import sftlab"` in the same run.

Every command should check its paths and arguments before importing torch or transformers, and a
local-looking model path (`./run`) should never be looked up on the Hub; so a typo answers in about the
time Python takes to import sftlab's light modules. Each round runs the baseline and every command once,
alternating; the table reports the minimum over the rounds, its ratio to the baseline's minimum, the
exit code and the first words of the answer.

    python benchmarks/bench_startup.py                      # this checkout's src/, 3 rounds
    python benchmarks/bench_startup.py --src /other/src     # another checkout (e.g. main, for "before")
    python benchmarks/bench_startup.py --repeat 5 --timeout 30

A command still running after --timeout seconds (a Hub lookup retrying) is reported as `>TIMEOUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, arguments): each names a path that does not exist (data.jsonl exists: the run directory is missing)
COMMANDS = [
    ("prepare", ["prepare", "--data", "./no_such_file.jsonl"]),
    ("train", ["train", "--data", "./no_such_file.jsonl"]),
    ("eval", ["eval", "./no_such_run", "--data", "data.jsonl"]),
    ("generate", ["generate", "./no_such_run", "--prompt", "Hi"]),
    ("chat", ["chat", "./no_such_run"]),
    ("export", ["export", "./no_such_run", "--merge", "--out", "merged"]),
    ("push", ["push", "./no_such_run"]),
    ("report", ["report", "./no_such_run"]),
]
BASELINE = ("import sftlab", ["-c", "import sftlab"])


def timed(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[float, int | None, str]:
    """(seconds, exit code or None on timeout, the first line of the output) of `python ARGS`."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None, ""
    took = time.perf_counter() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return took, proc.returncode, (lines[0] if lines else "")


def run(src: Path, repeat: int, timeout: float) -> list[tuple[str, float, int | None, str]]:
    """Per command (the baseline first): (name, min seconds, exit code, first output line)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cases = [BASELINE] + [(name, ["-m", "sftlab.cli", *args]) for name, args in COMMANDS]
    best: dict[str, tuple[float, int | None, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cwd = Path(tmp)
        (cwd / "data.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
        for _ in range(repeat):
            for name, args in cases:
                if name in best and best[name][1] is None:  # it hung once (a Hub lookup): enough to know
                    continue
                took, rc, line = timed(args, cwd, env, timeout)
                if name not in best or took < best[name][0] or rc is None:
                    best[name] = (took, rc, line)
    return [(name, *best[name]) for name, _ in cases]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--src",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "src",
        help="the src/ directory whose sftlab is timed (default: this checkout's)",
    )
    p.add_argument("--repeat", type=int, default=3, help="rounds; the minimum is reported")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a command counts as hanging")
    args = p.parse_args()
    print(
        f"src {args.src}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; min of {args.repeat}"
    )
    rows = run(args.src, args.repeat, args.timeout)
    base = rows[0][1]
    print(f"{'command':<14} {'seconds':>8} {'ratio':>7}  rc  answer")
    for name, seconds, rc, line in rows:
        shown = f">{args.timeout:.0f}" if rc is None else f"{seconds:.2f}"
        ratio = "-" if rc is None else f"{seconds / base:.1f}x"
        print(f"{name:<14} {shown:>8} {ratio:>7} {'-' if rc is None else rc:>3}  {line[:90]}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
