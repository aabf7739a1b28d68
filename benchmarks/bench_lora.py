"""LoRA vs full fine-tuning on the embedded demo, in the same run: trainable parameters, peak RSS,
tokens/s and held-out exact match.

Runs `sftlab train` on src/sftlab/demo/demo.yaml (full) and demo_lora.yaml (LoRA r=16 on all linear
layers), each in its own process, alternating, with its memory sampled from /proc (peak RSS of the
process). Tokens/s is the median of the per-step `tokens_per_s` in metrics.jsonl over steps 2..N
(step 1 includes warm-up). Exact match before/after comes from match_eval.json.

    python benchmarks/bench_lora.py                 # both configs once
    python benchmarks/bench_lora.py --repeats 2     # alternate twice, report the best tokens/s
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_case import gib, measure, sftlab

DEMO = Path(__file__).resolve().parent.parent / "src" / "sftlab" / "demo"


def run_one(config: Path, out: Path, log: Path) -> dict:
    m = measure(sftlab("train", str(config), f"train.output_dir={out}"), log)
    if m.rc != 0:
        raise SystemExit(f"{config.name} failed (rc {m.rc}):\n{m.tail}")
    text = log.read_text()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    match = json.loads((out / "match_eval.json").read_text())
    peft_line = re.search(r"peft: .*?: ([\d,]+) trainable parameters of ([\d,]+)", text)
    if peft_line:
        trainable, total = (int(g.replace(",", "")) for g in peft_line.groups())
    else:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:  # full fine-tuning: every parameter
            total = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        trainable = total
    return {
        "seconds": m.seconds,
        "peak_rss": m.main_rss,
        "trainable": trainable,
        "total": total,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in metrics[1:]),
        "before": match["before"]["correct"],
        "after": match["after"]["correct"],
        "n": match["after"]["total"],
        "final_loss": metrics[-1]["loss"],
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    configs = {"full": DEMO / "demo.yaml", "lora": DEMO / "demo_lora.yaml"}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory(prefix="sftlab-bench-lora-") as work:
        for rep in range(args.repeats):
            for name in list(configs) if rep % 2 == 0 else list(configs)[::-1]:
                res = run_one(configs[name], Path(work) / f"{name}-{rep}", Path(work) / f"{name}-{rep}.log")
                results[name].append(res)
                print(
                    f"  repeat {rep + 1}: {name}: {res['seconds']:.0f}s, {res['tokens_per_s']:.0f} tokens/s, "
                    f"peak RSS {gib(res['peak_rss'])}, exact match {res['before']} -> {res['after']}/{res['n']}"
                )
    print(
        f"\n{'run':6s} {'trainable params':>22s} {'peak RSS':>10s} {'tokens/s':>9s} {'exact match':>14s} {'final loss':>11s}"
    )
    for name, rs in results.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        share = f"{best['trainable']:,} ({best['trainable'] / best['total']:.1%})"
        print(
            f"{name:6s} {share:>22s} {gib(min(r['peak_rss'] for r in rs)):>10s} {best['tokens_per_s']:9.0f} "
            f"{best['before']:>5d} -> {best['after']:>3d}/{best['n']} {best['final_loss']:11.4f}"
        )
    f, lo = results["full"], results["lora"]
    print(
        f"ratio lora/full: tokens/s {max(r['tokens_per_s'] for r in lo) / max(r['tokens_per_s'] for r in f):.2f}x, "
        f"peak RSS {min(r['peak_rss'] for r in lo) / min(r['peak_rss'] for r in f):.2f}x"
    )


if __name__ == "__main__":
    main()
