"""Token-level causal-LM loss, summed, so callers can normalise over a whole optimizer step.

`labels` are aligned with `input_ids` (IGNORE_INDEX = -100 where no loss); the shift happens
here. Returning the sum (not the mean) lets gradient accumulation divide by the number of target
tokens of the entire optimizer step, across micro-batches and ranks, instead of averaging
per-micro-batch means (which over-weights short micro-batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftlab.data.types import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over target positions (float32 math)."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[..., 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
