"""Throughput accounting: model FLOPs per token, the device's peak, and MFU.

Model FLOPs (what the model needs, whatever tricks the implementation uses):
- dense: per token, 2 x (parameters of every matmul, the output head included; embedding lookups
  excluded) for the forward, 2 x them again for the backward's input gradients, and 2 x the trainable
  ones for its weight gradients: 6N for a full fine-tune, about 4N with frozen weights (LoRA);
- attention: the causal QK^T and AV products. In a document of n tokens, token i attends to i
  tokens: each product costs 2 x i x d FLOPs for it, so about n^2 x d per product and layer in the
  forward, 2 n^2 d for both, x3 with the backward: 6 x L x d x n^2 per document (d = heads x
  head_dim). Packing keeps documents apart, so a packed row costs the sum of its documents' squares,
  not the square of its length.
MFU = achieved model FLOP/s / peak FLOP/s. The peak is `train.peak_flops` when set, else measured
once at start by a short square matmul probe in the compute dtype (so it is the machine's achievable
peak, not a datasheet number).
"""

from __future__ import annotations

import time

import torch


def dense_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters taking part in matmuls: every >= 2-D weight except input embeddings (a lookup);
    a tied output head counts once as the head. `trainable_only`: those with a gradient."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_w = emb.weight if emb is not None else None
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or p.ndim < 2:
            continue
        seen.add(id(p))
        if p is emb_w and not (head is not None and head.weight is emb_w):
            continue
        if trainable_only and not p.requires_grad:
            continue
        total += p.numel()
    return total


def attention_width(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, attention width = heads x head_dim) from the model config."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    return layers, heads * int(head_dim)


class FlopCounter:
    """Model FLOPs of training steps, from the documents' lengths."""

    def __init__(self, model: torch.nn.Module):
        self.dense = 4 * dense_params(model) + 2 * dense_params(model, trainable_only=True)
        self.layers, self.width = attention_width(model)

    def step_flops(self, tokens: int, sum_sq_doc_lengths: int) -> float:
        return float(self.dense) * tokens + 6.0 * self.layers * self.width * sum_sq_doc_lengths


_PEAK: dict[tuple[str, torch.dtype], float] = {}  # measured once per process, device and dtype


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s of `device` in `dtype` (a square-matmul probe of about `seconds`, once per
    process for each device and dtype). The probe's operands come from a generator of its own: the
    global random state (dropout, initialisation) is the same with or without a measurement."""
    key = (str(device), dtype)
    if key not in _PEAK:
        _PEAK[key] = _probe(device, dtype, seconds)
    return _PEAK[key]


def _probe(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Square matmuls of 4096 (CUDA) / 2048 (CPU), or -- on a device slow in `dtype` (bf16 on a CPU
    without bf16 instructions), where one of those would take over 4 x `seconds` by the rate of a 256 x
    256 matmul -- the largest smaller power of two that does not, so the probe costs about a second
    there, not minutes."""
    limit = 4096 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    estimate = _rate(256, 1, device, dtype, gen, sync, seconds=0.0)
    n = limit
    while n > 256 and 2.0 * n**3 / estimate > 4 * seconds:
        n //= 2
    return _rate(n, 4 if device.type == "cuda" else 1, device, dtype, gen, sync, seconds)


def _rate(n: int, every: int, device, dtype, gen, sync, seconds: float) -> float:
    """FLOP/s of n x n matmuls repeated for about `seconds` (at least one group after a warm-up), timed in
    groups of `every` (a CPU matmul is synchronous, one can be timed alone): the fastest group's rate, so
    another process taking the cores for part of the probe does not lower the peak."""
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    torch.matmul(a, b)  # warm-up
    sync()
    start = group = time.perf_counter()
    fastest = float("inf")
    reps = 0
    while True:
        torch.matmul(a, b)
        reps += 1
        if reps % every == 0:
            sync()
            now = time.perf_counter()
            fastest, group = min(fastest, now - group), now
            if now - start >= seconds:
                break
    return 2.0 * n**3 * every / fastest
