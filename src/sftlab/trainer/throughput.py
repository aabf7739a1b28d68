"""Throughput accounting: model FLOPs of a step, the device's peak, and MFU.

Model FLOPs (what the model needs, whatever tricks the implementation uses; recompute is not counted):
- the body's matmuls (every Linear, by in x out features, so a 4-bit base counts as the matmul it
  computes; other >= 2-D weights by size; input embeddings excluded: a lookup): per token 2 x them for the
  forward, 2 x them again for the backward's input gradients, and 2 x the trainable ones for its weight
  gradients: 6N for a full fine-tune, 4N + 2 x the adapters' for LoRA (their matmuls are Linears too);
- the output head (hidden x vocabulary, tied or not): the same three terms, but only at the positions
  whose logits are computed: every token with full logits, the target tokens with the target-only head
  (model/loss.py: `TargetLossHead`);
- attention: the causal QK^T and AV products. In a document of n tokens, token i attends to i
  tokens: each product costs 2 x i x d FLOPs for it, so about n^2 x d per product and layer in the
  forward, 2 n^2 d for both, x3 with the backward: 6 x L x d x n^2 per document (d = heads x
  head_dim). Packing keeps documents apart, so a packed row costs the sum of its documents' squares,
  not the square of its length.
MFU = achieved model FLOP/s / peak FLOP/s. The peak is `train.peak_flops` when set, else measured once at
start in the run's compute dtype on the model's own matmul shapes (`model_shape`: micro-batch tokens x
hidden x the widest Linear, forward and both backward products), so it is the rate this model's matmuls
can reach on this machine, not a datasheet number nor a square matmul of another size.
"""

from __future__ import annotations

import time

import torch


def _linear_flops(model: torch.nn.Module) -> dict[int, int]:
    """id(weight) -> in x out features of every Linear-like module (a quantized weight's packed storage
    would undercount it); other weights are counted by their size."""
    out = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if w is not None and all(isinstance(f, int) for f in features):
            out[id(w)] = features[0] * features[1]
    return out


def dense_params(model: torch.nn.Module, trainable_only: bool = False, head: bool = True) -> int:
    """Parameters taking part in matmuls: every >= 2-D weight except input embeddings (a lookup);
    a tied output head counts once as the head. `trainable_only`: those with a gradient; `head`: the
    output head included."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_w = emb.weight if emb is not None else None
    head_w = getattr(out, "weight", None)
    linear, seen, total = _linear_flops(model), set(), 0
    for p in model.parameters():
        if id(p) in seen or p.ndim < 2:
            continue
        seen.add(id(p))
        if (p is emb_w and p is not head_w) or (p is head_w and not head):
            continue
        if trainable_only and not p.requires_grad:
            continue
        total += linear.get(id(p), p.numel())
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
    """Model FLOPs of training steps, from the tokens, target tokens and documents' lengths."""

    def __init__(self, model: torch.nn.Module, target_head: bool = False):
        body = dense_params(model, head=False)
        body_trainable = dense_params(model, trainable_only=True, head=False)
        head_all = dense_params(model) - body
        head_trainable = dense_params(model, trainable_only=True) - body_trainable
        self.body = 4 * body + 2 * body_trainable  # per token
        self.head = 4 * head_all + 2 * head_trainable  # per position whose logits are computed
        self.dense = self.body + self.head  # per token with full logits
        self.target_head = target_head  # logits only at target positions (model/loss.py: TargetLossHead)
        self.layers, self.width = attention_width(model)

    def step_flops(self, tokens: int, sum_sq_doc_lengths: int, targets: int | None = None) -> float:
        """A step's model FLOPs: the body over every token, the head over every token (full logits) or
        the `targets` (target-only head), attention over the documents' squared lengths."""
        head_positions = targets if self.target_head and targets is not None else tokens
        return (
            float(self.body) * tokens
            + float(self.head) * head_positions
            + 6.0 * self.layers * self.width * sum_sq_doc_lengths
        )


def model_shape(model: torch.nn.Module, tokens: int) -> tuple[int, int, int]:
    """(M, K, N) of the model's typical training matmul: `tokens` rows (a micro-batch's, at most 4096) x
    the hidden size x the widest Linear's other side (an MLP's up projection); the probe runs it forward
    and both backward products."""
    linears = [m for m in model.modules() if isinstance(getattr(m, "in_features", None), int)]
    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    widest = max(
        (max(m.in_features, m.out_features) for m in linears if m is not head), default=hidden or 1024
    )
    return max(1, min(int(tokens), 4096)), hidden or widest, widest


_PEAK: dict[tuple[str, torch.dtype], float] = {}  # measured once per process, device and dtype


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, seconds: float = 0.3, shape: tuple[int, int, int] | None = None
) -> float:
    """Achievable matmul FLOP/s of `device` in `dtype`: on the model's `shape` (M, K, N: forward and both
    backward products, see `model_shape`), else a square-matmul probe; about `seconds`, once per process
    for each device, dtype and shape. The probe's operands come from a generator of its own: the global
    random state (dropout, initialisation) is the same with or without a measurement."""
    key = (str(device), dtype, shape)
    if key not in _PEAK:
        _PEAK[key] = (
            _probe(device, dtype, seconds) if shape is None else _shape_rate(device, dtype, shape, seconds)
        )
    return _PEAK[key]


def _shape_rate(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], seconds: float
) -> float:
    """FLOP/s of the three products of a Linear's training step at `shape` (M, K, N): X[M,K] @ W[K,N],
    G[M,N] @ W^T, X^T @ G; the fastest of repeated groups (another process taking the cores for part of
    the probe does not lower the peak)."""
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x, w, g = (torch.randn(*s, device=device, generator=gen).to(dtype) for s in ((m, k), (k, n), (m, n)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def group():
        x @ w, g @ w.t(), x.t() @ g

    group()  # warm-up
    sync()
    fastest, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        group()
        sync()
        fastest = min(fastest, time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds:
            break
    return 3 * 2.0 * m * k * n / fastest


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
