"""compat/liger.py against the installed liger-kernel (skipped without it; the kernels run on CUDA only, so
this checks that the private patcher exists and takes what compat passes it)."""

from __future__ import annotations

import inspect

import pytest


def test_apply_liger_kernel_to_instance_exists_and_takes_the_kernel_switches():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    params = inspect.signature(_apply_liger_kernel_to_instance).parameters
    assert "model" in params
    assert any(p.kind is p.VAR_KEYWORD for p in params.values()) or {
        "fused_linear_cross_entropy",
        "cross_entropy",
    } <= set(params)
    assert {"reduction", "softcap"} <= set(inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters)
