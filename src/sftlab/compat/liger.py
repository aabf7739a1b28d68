"""liger-kernel's private API as sftlab uses it (liger-kernel 0.8.5, optional: imported on use only)."""

from __future__ import annotations

from typing import Any


def apply_kernels_to_instance(model: Any) -> None:
    """Swap Liger's RMSNorm, RoPE and SwiGLU kernels into the loaded `model` (whatever its architecture Liger
    supports), without Liger's cross-entropy or fused linear cross-entropy forward (sftlab's loss head calls
    `LigerFusedLinearCrossEntropyLoss` itself). CUDA only; liger-kernel must be installed.

    Touches: `liger_kernel.transformers.monkey_patch._apply_liger_kernel_to_instance` (dispatches on the model
    type to the public per-architecture patchers). Written against liger-kernel 0.8.5.
    Public alternative: `liger_kernel.transformers.apply_liger_kernel_to_<architecture>(model=model, ...)`
    (one per architecture, chosen by the caller) or `AutoLigerKernelForCausalLM` at load time."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
