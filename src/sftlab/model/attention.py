"""Document-aware attention for packed rows without a dense mask: one causal SDPA call per document.

A packed row holds several documents; each must attend only to itself. transformers does this by
building a dense (batch, 1, T, T) block-diagonal mask from the restarting `position_ids`, and the CPU
SDPA kernels are slow with a dense mask (issue 8's profile: 31% of a packed step). Here the row is cut
at its document boundaries and each document runs through transformers' own `sdpa_attention_forward`
with `is_causal=True` and no mask: the same arithmetic as attending to the document alone (exact
against the unpacked forward), and the attention FLOPs grow with sum(d_i^2) instead of T^2. On a CPU
the documents run through the SDPA kernel's forward directly (its logsumexp kept) with a backward of
their own, per document in fp32 below `FP32_BACKWARD_BELOW` tokens: torch's bf16 CPU backward costs
>= 0.5 ms per call whatever the length (a bf16 packed 1x1024 step: 530 -> 165 ms of attention backward).

It is registered with transformers as the attention implementation `sftlab_documents`, together with
a mask function that builds no mask where the batch has no padding mask (packed rows, unpadded
rows), so the attention function sees the positions instead. Wherever a mask is needed -- a padded
batch, generation with left padding or a KV cache -- the mask is built and the call is plain SDPA,
so the same model also evaluates and generates correctly. While `torch.compile` traces the model the
cutting is one custom operator, `sftlab::document_sdpa` (query, key, value, position_ids): opaque to the
compiler, so the graph keeps one shape whatever the document layout (no graph break, no recompile)
while the elementwise work around it fuses; its backward is the eager one (on CPU from the operator's
output and logsumexp; elsewhere the per-document forward recomputed and differentiated), so compiled
gradients are the eager ones.

`sftlab_flex` is transformers' FlexAttention with the block mask its mask functions build from the
restarting positions (one per forward, no dense mask), SDPA where a padding mask is needed. torch 2.13
runs FlexAttention's backward on CUDA only ("FlexAttention does not support backward on CPU", eager
and compiled alike), so `flex` trains on CUDA; on a CPU it evaluates only.

`choose(setting, model, device)` decides per run (`train.packed_attention`): `documents`, `flex`, `mask`
(transformers' dense mask), or `auto`, which times documents and mask on the model's own head shape on
this device once per process and picks the faster (trainer/compiling.py then weighs whole steps where
this machine measured them); models with sliding-window layers keep the mask (the window would be
ignored here).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask, sdpa_mask

from sftlab.compat import torch as torch_compat
from sftlab.compat import transformers as transformers_compat

NAME = "sftlab_documents"
FLEX_NAME = "sftlab_flex"


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for batches without a padding mask (the attention function cuts documents by position);
    SDPA's own mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def document_cuts(position_ids: torch.Tensor, rows: int, length: int) -> list[list[int]]:
    """Per batch row, the offsets where its documents start, plus the row length: a document starts
    wherever the position does not grow by exactly 1 (as transformers finds packed sequences)."""
    pos = position_ids.expand(rows, -1)
    starts = (torch.diff(pos, dim=-1) != 1).nonzero().tolist()  # one host sync per forward's first layer
    cuts: list[list[int]] = [[0] for _ in range(rows)]
    for b, t in starts:
        cuts[b].append(t + 1)
    return [c + [length] for c in cuts]


# The cuts of the last position_ids tensor seen: every layer of one forward gets the same tensor object.
# Holding it keeps its id from being reused by another tensor, so identity (and its version) is a safe key.
_CUTS: dict[str, Any] = {"tensor": None, "version": None, "shape": None, "cuts": None}


def _cached_cuts(position_ids: torch.Tensor, rows: int, length: int) -> list[list[int]]:
    version = torch_compat.version_counter(position_ids)
    if not (
        _CUTS["tensor"] is position_ids and _CUTS["version"] == version and _CUTS["shape"] == (rows, length)
    ):
        _CUTS.update(
            tensor=position_ids,
            version=version,
            shape=(rows, length),
            cuts=document_cuts(position_ids, rows, length),
        )
    return _CUTS["cuts"]


# torch's CPU flash-attention backward in bf16 costs >= 0.5 ms per call whatever the length: upcast to fp32
# it is faster below ~384 tokens (128: 0.8 against 2.0 ms; 256-340: 1.1-1.2x), about as fast up to ~600
# and slower beyond (1024: 0.7x) (Intel Xeon with AMX, 9 query / 3 key-value heads of 64). On an AMD EPYC
# with AVX512-BF16 and no AMX the crossover is close by (upcast included: 320 tokens 6.4 against 7.5 ms, 384:
# 9.5 / 10.9, 420-480 about equal, 640: 20.3 / 16.6). Shorter documents take the fp32 backward. A fixed rule,
# so a resumed run computes the same bits.
FP32_BACKWARD_BELOW = 384


def _cpu_forward(query, key, value, sizes: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One row (1, heads, T, head_dim), each document causal on its own, on CPU: (output, logsumexp)."""
    parts = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    outs, lses = zip(*(torch_compat.cpu_flash_attention(q, k, v, scale) for q, k, v in parts))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _cpu_backward(grad, query, key, value, out, lse, sizes: list[int], scale: float) -> list[torch.Tensor]:
    """The gradients of `_cpu_forward` per document: in fp32 below `FP32_BACKWARD_BELOW` tokens, in the
    input dtype above (more exact, and faster there)."""
    given = (grad, query, key, value, out)
    short = [n < FP32_BACKWARD_BELOW for n in sizes]
    wide = [t.float() for t in given] if any(short) and query.dtype != torch.float32 else given
    grads = [torch.empty_like(t) for t in (query, key, value)]  # their layouts: no copy after
    start = 0
    for n, fp32 in zip(sizes, short):
        doc = [t[:, :, start : start + n] for t in (wide if fp32 else given)]
        parts = torch_compat.cpu_flash_attention_backward(*doc, lse[:, :, start : start + n], scale)
        for whole, part in zip(grads, parts):
            whole[:, :, start : start + n].copy_(part)
        start += n
    return grads


class _CPUDocuments(torch.autograd.Function):
    """`_cpu_forward` with `_cpu_backward` as its gradient (eager runs)."""

    @staticmethod
    def forward(ctx, query, key, value, sizes: list[int], scale: float):
        out, lse = _cpu_forward(query, key, value, sizes, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.sizes, ctx.scale = sizes, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        return *_cpu_backward(grad, *ctx.saved_tensors, ctx.sizes, ctx.scale), None, None


def _row_sizes(cuts: list[list[int]]) -> list[list[int]]:
    return [[e - s for s, e in zip(c[:-1], c[1:])] for c in cuts]


def _per_document(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cuts: list[list[int]], scale: float
) -> torch.Tensor:
    """(batch, heads, T, head_dim) -> the same, each document of each row causal on its own."""
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for q, k, v, sizes in zip(query.split(1), key.split(1), value.split(1), _row_sizes(cuts)):
        if q.device.type == "cpu":
            rows.append(_CPUDocuments.apply(q, k, v, sizes, scale))
            continue
        parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
        rows.append(
            torch.cat(
                [
                    torch.nn.functional.scaled_dot_product_attention(
                        qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa
                    )
                    for qd, kd, vd in parts
                ],
                dim=2,
            )
        )
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


@torch.library.custom_op("sftlab::document_sdpa", mutates_args=())
def document_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document causal SDPA as one operator the compiler does not look into: a compiled graph keeps one
    shape whatever the document layout (the cuts are read from `position_ids` when it runs). Returns
    (output, logsumexp); the logsumexp (batch, heads, T) float32 on CPU, where the backward reuses it, and
    empty elsewhere (the backward recomputes the forward)."""
    rows, length = query.shape[0], query.shape[2]
    cuts = _cached_cuts(position_ids, rows, length)
    if query.device.type != "cpu":
        out = _per_document(query, key, value, cuts, scale).contiguous()
        return out, query.new_empty(0, dtype=torch.float32)
    outs, lses = zip(
        *(
            _cpu_forward(q, k, v, n, scale)
            for q, k, v, n in zip(query.split(1), key.split(1), value.split(1), _row_sizes(cuts))
        )
    )
    return torch.cat(outs).contiguous(), torch.cat(lses).contiguous()


@document_sdpa.register_fake
def _(query, key, value, position_ids, scale):
    batch, heads, length = query.shape[:3]
    lse = (batch, heads, length) if query.device.type == "cpu" else (0,)
    return torch.empty_like(query, memory_format=torch.contiguous_format), query.new_empty(
        lse, dtype=torch.float32
    )


@torch.library.custom_op("sftlab::document_sdpa_backward", mutates_args=())
def document_sdpa_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `document_sdpa`: on CPU from its output and logsumexp (`_cpu_backward`, as eager);
    elsewhere its forward recomputed (one attention forward more) and differentiated, so they are those of
    the eager per-document calls."""
    rows, length = query.shape[0], query.shape[2]
    cuts = _cached_cuts(position_ids, rows, length)
    if query.device.type == "cpu":
        tensors = (grad, query, key, value, out, lse)
        per_row = [
            _cpu_backward(*row, n, scale) for *row, n in zip(*(t.split(1) for t in tensors), _row_sizes(cuts))
        ]
        return tuple(torch.cat(parts).contiguous() for parts in zip(*per_row))
    q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
    with torch_compat.autograd_inside_custom_op():
        recomputed = _per_document(q, k, v, cuts, scale)
    dq, dk, dv = torch.autograd.grad(recomputed, (q, k, v), grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # the layout the fake promises


@document_sdpa_backward.register_fake
def _(grad, query, key, value, out, lse, position_ids, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value))


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, value, position_ids, scale = inputs
    ctx.save_for_backward(query, key, value, *output, position_ids)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple:
    query, key, value, out, lse, position_ids = ctx.saved_tensors
    dq, dk, dv = document_sdpa_backward(
        grad.contiguous(), query, key, value, out, lse, position_ids, ctx.scale
    )
    return dq, dk, dv, None, None


document_sdpa.register_autograd(_backward, setup_context=_setup)


def document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query/key/value (batch, heads, T, head_dim) -> output
    (batch, T, heads, head_dim). Causal per document where there is no mask; plain SDPA otherwise."""
    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None or query.shape[2] != key.shape[2] or query.shape[2] == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if position_ids is None:
        raise RuntimeError(
            f"{type(module).__name__} does not hand position_ids to its attention function, so "
            "packed documents cannot be told apart: set train.packed_attention: mask"
        )
    rows, length = query.shape[0], query.shape[2]
    if torch.compiler.is_compiling():  # one operator: no graph break, no recompile per document layout
        if dropout:
            raise RuntimeError("compiled per-document attention has no attention dropout: set it to 0")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        query, key, value = _autocast_inputs(query, key, value)
        out, _ = document_sdpa(query, key, value, position_ids.expand(rows, -1), scale)
        return out.transpose(1, 2).contiguous(), None
    cuts = _cached_cuts(position_ids, rows, length)
    if query.device.type == "cpu" and not dropout:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        query, key, value = _autocast_inputs(query, key, value)
        return _per_document(query, key, value, cuts, scale).transpose(1, 2).contiguous(), None
    if all(len(c) == 2 for c in cuts):  # one document per row: a single causal call
        return sdpa_attention_forward(
            module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs
        )
    # split(), not slicing: its backward is one concatenation, where each slice's backward would fill a
    # zero tensor of the whole row (measured: 9% of a packed step)
    out = []
    for q, k, v, sizes in zip(query.split(1), key.split(1), value.split(1), _row_sizes(cuts)):
        out.append(
            torch.cat(
                [
                    sdpa_attention_forward(
                        module, qd, kd, vd, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs
                    )[0]
                    for qd, kd, vd in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
                ],
                dim=1,
            )
        )
    return (out[0] if len(out) == 1 else torch.cat(out, dim=0)), None


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the dtype SDPA runs in under autocast (autocast does not reach into an autograd
    Function or a custom operator); unchanged without autocast."""
    device = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensors[0].dtype
    return tuple(t.to(dtype) for t in tensors)


def _flex_mask(
    *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> BlockMask | torch.Tensor | None:
    """A FlexAttention block mask for batches without a padding mask (transformers' mask function already
    keeps packed documents apart and causal by their restarting positions), built once per forward;
    SDPA's own mask otherwise (padded batches, generation)."""
    if attention_mask is None and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0:
        return flex_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def flex_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' FlexAttention where the mask is a block mask (packed or unpadded rows); SDPA otherwise."""
    if isinstance(attention_mask, BlockMask):
        kwargs.pop("position_ids", None)
        return flex_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(NAME, document_attention)
AttentionMaskInterface.register(NAME, _mask)
AttentionInterface.register(FLEX_NAME, flex_document_attention)
AttentionMaskInterface.register(FLEX_NAME, _flex_mask)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def has_sliding_window(model: Any) -> bool:
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(sliding) or any("sliding" in str(t) for t in layer_types)


@functools.lru_cache(maxsize=8)
def _measure(device: str, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds for one forward+backward of a 1024-token row of four documents, each way, on this device."""
    gen = torch.Generator(device=device).manual_seed(0)
    docs, length = [200, 312, 256, 256], 1024
    q = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(1, heads, length, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    doc = torch.repeat_interleave(torch.arange(len(docs), device=device), torch.tensor(docs, device=device))
    t = torch.arange(length, device=device)
    mask = ((doc[:, None] == doc[None, :]) & (t[:, None] >= t[None, :]))[None, None]

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def per_document():
        return torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                for qd, kd, vd in zip(q.split(docs, dim=2), k.split(docs, dim=2), v.split(docs, dim=2))
            ],
            2,
        )

    times = {}
    for name, fn in (("mask", dense), ("documents", per_document)):
        fn().sum().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            fn().sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / 3
    return times


def choose(
    setting: str, model: Any, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[str, str]:
    """(`documents`, `flex` or `mask`, why) for `train.packed_attention` on this model and device; `auto`
    picks between `documents` and `mask` by the attention alone (trainer/compiling.py weighs whole steps)."""
    implementation = transformers_compat.attn_implementation(model.config)
    if implementation not in ("sdpa", NAME, FLEX_NAME):
        return "mask", f"model.attn_implementation is {implementation}"
    if has_sliding_window(model):
        if setting in ("documents", "flex"):
            raise ValueError(
                f"train.packed_attention: {setting} ignores sliding-window attention, which this model "
                "uses; use mask or auto"
            )
        return "mask", "the model has sliding-window layers"
    if setting == "flex" and torch.device(device).type == "cpu":
        raise ValueError(
            "train.packed_attention: flex trains on CUDA only: FlexAttention does not support backward on "
            f"CPU (torch {torch.__version__}); use documents (it compiles too) or auto"
        )
    if setting != "auto":
        return setting, "as configured"
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    times = _measure(
        str(torch.device(device)), heads, getattr(config, "num_key_value_heads", heads), head_dim, dtype
    )
    best = min(times, key=times.get)
    return best, (
        f"auto: per-document SDPA {times['documents'] * 1e3:.1f} ms vs dense mask "
        f"{times['mask'] * 1e3:.1f} ms per 1024-token row of 4 documents on this device"
    )


def use(model: Any, mode: str) -> None:
    """Switch the model (and what it wraps) to per-document attention, FlexAttention, or back to SDPA."""
    target = getattr(model, "get_base_model", lambda: model)()
    target.set_attn_implementation({"documents": NAME, "flex": FLEX_NAME}.get(mode, "sdpa"))
