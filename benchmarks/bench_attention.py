"""Packed-row attention and activation recomputation: one training forward+backward, each way, same run.

On the embedded SmolLM2-135M-Instruct (or `--tiny` for a random 2-layer model), a packed row of
`--length` tokens holding `--docs` documents (restarting position_ids, no attention mask, as sftlab's
packed collate gives it) runs forward + backward with the target-free summed loss over every token:

- `mask`: transformers' SDPA with the dense block-diagonal document mask it builds from the positions
  (the baseline: what packed rows ran before `train.packed_attention`);
- `documents`: sftlab's per-document causal SDPA (model/attention.py), no mask;
- each with gradient checkpointing on (`+gc`): the recompute `train.gradient_checkpointing: auto` avoids
  when memory allows.

The variants alternate within each repeat (so load from other processes hits them alike); the table
gives the median seconds per step, tokens/s and the speed-up against `mask` measured in the same run,
and checks the variants' losses agree (fp32: 1e-5 relative).

    python benchmarks/bench_attention.py                 # SmolLM2-135M, 1024 tokens, 5 documents, 5 repeats
    python benchmarks/bench_attention.py --length 2048 --docs 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_env import cpu_info


def load(tiny: bool):
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import load_model

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    return load_model(ModelConfig())


def packed_row(length: int, docs: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(length - 1, generator=gen)[: docs - 1].add(1).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    ids = torch.randint(3, vocab, (1, length), generator=gen)
    pos = torch.cat([torch.arange(n) for n in sizes])[None]
    return ids, pos


def step(model, ids, pos) -> float:
    start = time.perf_counter()
    out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(out[0, :-1].float(), ids[0, 1:], reduction="sum")
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer model instead of SmolLM2-135M")
    args = ap.parse_args()

    from sftlab.model import attention
    from sftlab.trainer.run_model import enable_activation_checkpointing

    model = load(args.tiny).float().train()
    model.config.use_cache = False
    ids, pos = packed_row(args.length, args.docs, model.config.vocab_size)
    variants = ["mask", "documents", "mask+gc", "documents+gc"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    print(
        f"CPU: {cpu_info()[0]} ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"{'tiny model' if args.tiny else 'SmolLM2-135M-Instruct'}; 1 packed row of {args.length} tokens, "
        f"{args.docs} documents; fp32; {args.repeats} repeats (+1 warm-up)"
    )
    for r in range(args.repeats + 1):
        for v in variants:
            attention.use(model, "documents" if v.startswith("documents") else "mask")
            if v.endswith("+gc"):
                enable_activation_checkpointing(model)
            elif getattr(
                model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)
            ):
                getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
            seconds, loss = step(model, ids, pos)
            if r:
                times[v].append(seconds)
            losses[v] = loss
    base = statistics.median(times["mask"])
    print(f"{'variant':14s} {'s/step':>8s} {'tokens/s':>9s} {'vs mask':>8s} {'loss':>12s}")
    for v in variants:
        med = statistics.median(times[v])
        print(f"{v:14s} {med:8.3f} {args.length / med:9.1f} {base / med:7.2f}x {losses[v]:12.4f}")
    ref = losses["mask"]
    bad = [v for v in variants if abs(losses[v] - ref) > 1e-5 * abs(ref)]
    if bad:
        raise SystemExit(f"losses disagree with mask: {bad}")


if __name__ == "__main__":
    main()
