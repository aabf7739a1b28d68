"""torch.compile on a packed training step: compile time, steady speed-up, break-even, same run.

On the embedded SmolLM2-135M-Instruct (or `--tiny`), one packed row of `--length` tokens in `--docs`
documents (the fixed shape a compiled sftlab run gives every micro-batch, dense document mask) runs
forward + backward through sftlab's target-only loss head, eager (dense mask, and per-document
attention, the eager default) and compiled (`--backend`, default inductor), alternating within each repeat so load from other processes hits both alike. It prints the
compile time (first compiled step - a steady one), the median step times, the speed-up, the tokens a
run must train before compiling pays back (what `train.compile: auto` weighs), and checks the losses
agree (fp32: 1e-5 relative).

    python benchmarks/bench_compile.py                   # SmolLM2-135M, 1024 tokens, 5 documents, 5 repeats
    python benchmarks/bench_compile.py --tiny --backend aot_eager --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_attention import load, packed_row
from bench_env import cpu_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer model instead of SmolLM2-135M")
    args = ap.parse_args()

    from sftlab.model import attention
    from sftlab.model.loss import TargetLossHead

    model = load(args.tiny).float().train()
    model.config.use_cache = False
    attention.use(model, "mask")  # a compiled packed run uses the dense document mask
    head = TargetLossHead.for_model(model)
    ids, pos = packed_row(args.length, args.docs, model.config.vocab_size)
    labels = ids.clone()
    labels[0, 0] = -100
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    compiled = torch.compile(model, backend=args.backend, dynamic=False)

    def step(m) -> tuple[float, float]:
        start = time.perf_counter()
        loss = head(m, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    print(
        f"CPU: {cpu_info()[0]} ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"{'tiny model' if args.tiny else 'SmolLM2-135M-Instruct'}; 1 packed row of {args.length} tokens, "
        f"{args.docs} documents; fp32; backend {args.backend}; {args.repeats} repeats (+1 warm-up)",
        flush=True,
    )
    first, first_loss = step(compiled)
    print(f"first compiled step: {first:.1f} s", flush=True)
    times: dict[str, list[float]] = {"eager": [], "eager documents": [], "compiled": []}
    losses = {"compiled": first_loss}
    for r in range(args.repeats + 1):
        for name, m in (("eager", model), ("eager documents", model), ("compiled", compiled)):
            attention.use(model, "documents" if name == "eager documents" else "mask")
            seconds, losses[name] = step(m)
            if r:
                times[name].append(seconds)
    meds = {name: statistics.median(t) for name, t in times.items()}
    eager, comp = meds["eager"], meds["compiled"]
    compile_s = max(0.0, first - comp)
    print(f"{'variant':16s} {'s/step':>8s} {'tokens/s':>9s} {'vs eager':>9s} {'loss':>14s}")
    for name, med in meds.items():
        print(f"{name:16s} {med:8.3f} {args.length / med:9.1f} {eager / med:8.2f}x {losses[name]:14.4f}")
    print(
        "(eager: dense document mask, as compiled; eager documents: per-document attention, the eager default)"
    )
    best = min(eager, meds["eager documents"])  # what the run would do without compiling
    saved_per_token = (best - comp) / args.length
    if saved_per_token > 0:
        print(
            f"compile time ~{compile_s:.0f} s; {best / comp:.2f}x the best eager step; pays back after "
            f"~{compile_s / saved_per_token:,.0f} tokens (~{compile_s / (best - comp):,.0f} steps of this row)"
        )
    else:
        print(
            f"compile time ~{compile_s:.0f} s; the compiled step is not faster than the best eager "
            "one here: it never pays back"
        )
    if any(abs(v - losses["eager"]) > 1e-5 * abs(losses["eager"]) for v in losses.values()):
        raise SystemExit(f"losses disagree: {losses}")


if __name__ == "__main__":
    main()
