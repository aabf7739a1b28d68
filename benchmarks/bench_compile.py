"""torch.compile and packed attention on a packed training step: whole-step options, compile time, same run.

On the embedded SmolLM2-135M-Instruct (or `--tiny`), one packed row of `--length` tokens in `--docs`
documents (the fixed shape a compiled sftlab run gives every micro-batch) runs forward + backward through
sftlab's target-only loss head in each whole-step option `train.compile` x `train.packed_attention` offers:

- eager documents (per-document SDPA, the eager default), eager mask (transformers' dense document mask);
- compiled mask, compiled documents (per-document attention as one opaque operator, model/attention.py);
- on CUDA also eager/compiled flex (FlexAttention with a document block mask: torch 2.13 has no
  FlexAttention backward on a CPU) and eager varlen (flash-attention 2 with the packed position ids, where
  flash-attn is installed; bf16 only, so with `--dtype bf16`).

The options alternate within each repeat (so load from other processes hits them alike). It prints each
compiled option's compile time (first step - a steady one), the median step times, tokens/s, the ratio
against eager documents measured in the same run, and checks the losses agree (fp32: 1e-5 relative; bf16:
1e-2). `--backend`: default inductor.

    python benchmarks/bench_compile.py                   # SmolLM2-135M, 1024 tokens, 5 documents, 3 repeats
    python benchmarks/bench_compile.py --tiny --backend aot_eager --repeats 3
    python benchmarks/bench_compile.py --device cuda --dtype bf16   # + flex, varlen
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from bench_attention import load, packed_row
from bench_env import cpu_info


def options(device: str, dtype: torch.dtype) -> list[tuple[str, str, bool]]:
    """(name, attention, compiled) for each whole-step option valid on this device."""
    found = [
        ("eager documents", "documents", False),
        ("eager mask", "mask", False),
        ("compiled mask", "mask", True),
        ("compiled documents", "documents", True),
    ]
    if device == "cuda":
        found += [("eager flex", "flex", False), ("compiled flex", "flex", True)]
        if importlib.util.find_spec("flash_attn") and dtype != torch.float32:
            found.append(("eager varlen", "flash_attention_2", False))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer model instead of SmolLM2-135M")
    args = ap.parse_args()

    from sftlab.model import attention
    from sftlab.model.loss import TargetLossHead

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = load(args.tiny).to(args.device, dtype).train()
    model.config.use_cache = False
    head = TargetLossHead.for_model(model)
    ids, pos = packed_row(args.length, args.docs, model.config.vocab_size)
    labels = ids.clone()
    labels[0, 0] = -100
    batch = {
        k: v.to(args.device) for k, v in {"input_ids": ids, "position_ids": pos, "labels": labels}.items()
    }
    compiled = torch.compile(model, backend=args.backend, dynamic=False)

    def step(name: str, mode: str, is_compiled: bool) -> tuple[float, float]:
        if mode == "flash_attention_2":
            model.set_attn_implementation(mode)
        else:
            attention.use(model, mode)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = head(compiled if is_compiled else model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        value = loss.item()
        return time.perf_counter() - start, value

    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_info()[0]
    print(
        f"{name} ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"{'tiny model' if args.tiny else 'SmolLM2-135M-Instruct'}; 1 packed row of {args.length} tokens, "
        f"{args.docs} documents; {args.dtype}; backend {args.backend}; {args.repeats} repeats (+1 warm-up)",
        flush=True,
    )
    found = options(args.device, dtype)
    first, times, losses = {}, {n: [] for n, _, _ in found}, {}
    for r in range(args.repeats + 1):
        for n, mode, is_compiled in found:
            seconds, losses[n] = step(n, mode, is_compiled)
            if r:
                times[n].append(seconds)
            elif is_compiled:
                first[n] = seconds
                print(f"{n}: first step {seconds:.1f} s", flush=True)
    meds = {n: statistics.median(t) for n, t in times.items()}
    base = meds["eager documents"]
    print(
        f"{'option':20s} {'s/step':>8s} {'tokens/s':>9s} {'vs eager documents':>19s} {'compile s':>10s} {'loss':>12s}"
    )
    for n, med in meds.items():
        compile_s = f"{max(0.0, first[n] - med):10.0f}" if n in first else f"{'-':>10s}"
        print(
            f"{n:20s} {med:8.3f} {args.length / med:9.1f} {base / med:18.2f}x {compile_s} {losses[n]:12.5f}"
        )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref = losses["eager documents"]
    bad = {n: v for n, v in losses.items() if abs(v - ref) > tol * abs(ref)}
    if bad:
        raise SystemExit(f"losses disagree with eager documents ({ref}): {bad}")


if __name__ == "__main__":
    main()
