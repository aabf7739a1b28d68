"""Optional fused GPU kernels: Liger (`train.liger: true`), only on CUDA with `liger-kernel` installed.

`apply_liger(model)` swaps in Liger's RMSNorm, RoPE and SwiGLU kernels for the model's
architecture, and returns Liger's fused linear cross-entropy as a loss function for the
target-only head (`TargetLossHead.fused_ce`): it takes the target positions' hidden states, the
output weight and the targets, and never materialises logits either. Anything missing is a
`KernelError` naming what is required, never a traceback from deep inside.

Note: Liger patches transformers' modeling functions (e.g. `apply_rotary_pos_emb`) for the whole
process, so every later model of that architecture in the same process runs Liger's Triton kernels.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from sftlab.compat import liger as liger_compat
from sftlab.errors import SftlabError


class KernelError(SftlabError, RuntimeError):
    """An optional kernel was asked for where it cannot run; the message says what is required."""


def apply_liger(model: torch.nn.Module, device_type: str, softcap: float | None = None) -> Callable:
    if device_type != "cuda":
        raise KernelError(
            f"train.liger: Liger kernels are Triton GPU kernels and need a CUDA device; this run is "
            f"on {device_type}. Set train.liger=false"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise KernelError(
            "train.liger: the liger-kernel package is not installed: pip install 'sftlab[liger]' "
            "(or pip install liger-kernel)"
        )
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger_compat.apply_kernels_to_instance(model)
    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)

    def fused_ce(
        weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = hidden.dtype
        return flce(weight.to(dtype), hidden, targets, None if bias is None else bias.to(dtype)).float()

    return fused_ce
