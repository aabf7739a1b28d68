"""Whether to recompute activations (`train.gradient_checkpointing: auto`): only when memory needs it.

Recomputing a decoder layer's forward in the backward costs about a third more FLOPs. `auto` turns it
on only when the activations the planned micro-batch keeps for the backward would not fit in the
memory free for them; otherwise the run keeps them and is that much faster.

The estimate, per token and decoder layer, counts the tensors a Llama-style layer saves for its
backward: the residual stream and norms, q/k/v, the attention and projection outputs (about 9 hidden
vectors plus 2 key/value vectors) and the MLP's gate, up, activation and product (4 intermediate
vectors), in the compute dtype; times the layers and the longest micro-batch the run will feed
(`planned_tokens`). The memory free for them is the device's free memory now (the weights are
loaded) less the gradients and AdamW's two moments to come (3 fp32 copies of the trainable
parameters), split over the processes sharing the device, of which `auto` uses at most 70%.
Recomputing, a layer keeps only its input (one hidden vector per token) until the backward recomputes it,
plus one layer's activations at a time (`recomputed_bytes`). The log line of `auto` says its choice, the
activations it expects with and without recomputing, the memory free for them and what its choice leaves.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch

HEADROOM = 0.7  # the share of the free memory the activations may take


def activation_bytes(model: Any, tokens: int, compute_dtype: torch.dtype) -> int:
    """Bytes of activations a forward over `tokens` keeps for the backward (module docstring)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    ffn = getattr(config, "intermediate_size", 4 * hidden)
    per_token_layer = 9 * hidden + 2 * kv + 4 * ffn
    elem = torch.tensor([], dtype=compute_dtype).element_size()
    return tokens * config.num_hidden_layers * per_token_layer * elem


def recomputed_bytes(model: Any, tokens: int, compute_dtype: torch.dtype) -> int:
    """Bytes of activations the same forward keeps when each decoder layer is recomputed in the backward:
    every layer's input, plus one layer's activations while it is recomputed."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    elem = torch.tensor([], dtype=compute_dtype).element_size()
    inputs = tokens * config.num_hidden_layers * config.hidden_size * elem
    return inputs + activation_bytes(model, tokens, compute_dtype) // config.num_hidden_layers


def free_bytes(device: torch.device | str) -> int:
    """Memory free on the device for this process: the GPU's free memory, or the RAM available split over
    the processes this machine runs (LOCAL_WORLD_SIZE)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def planned_tokens(cfg: Any, units: Any) -> int:
    """The most tokens one micro-batch will hold: the token budget, or micro_batch_size times the longest
    row (example or packed row) the run has."""
    if cfg.train.micro_batch_tokens is not None:
        return cfg.train.micro_batch_tokens
    lengths = getattr(units, "lengths", None)
    longest = int(max(lengths)) if lengths is not None and len(lengths) else cfg.data.max_seq_length
    return cfg.train.micro_batch_size * min(longest, cfg.data.max_seq_length)


def decide(
    setting: bool | str, model: Any, tokens: int, compute_dtype: torch.dtype, device: torch.device | str
) -> tuple[bool, str]:
    """(recompute or not, why) for `train.gradient_checkpointing`."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"train.gradient_checkpointing: expected true, false or auto, got {setting!r}")
    if setting != "auto":
        return bool(setting), "as configured"
    need = activation_bytes(model, tokens, compute_dtype)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    elsewhere = sum(p.numel() * p.element_size() for p in params if p.device != torch.device(device))
    room = (
        free_bytes(device) - elsewhere - 3 * 4 * trainable
    )  # weights still to move there, grads, AdamW moments
    on = need > HEADROOM * room
    kept = recomputed_bytes(model, tokens, compute_dtype) if on else need
    return on, (
        f"auto: a micro-batch of {tokens:,} tokens keeps ~{need / 2**30:.2f} GiB of activations "
        f"(~{recomputed_bytes(model, tokens, compute_dtype) / 2**30:.2f} GiB recomputing), "
        f"{max(room, 0) / 2**30:.1f} GiB free for them; {'on' if on else 'off'} leaves "
        f"~{(room - kept) / 2**30:.1f} GiB"
    )
