"""torch's private API as sftlab uses it (torch 2.13.0). `import torch` below is the real torch (absolute
imports); callers import this module as `torch_compat`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

COMPILED_PREFIX = "_orig_mod."  # what a torch.compile'd module puts before its module's state-dict keys


def without_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a state dict saved from a `torch.compile`d module, as Accelerate's save_state saves a compiled
    run's model) with the keys of the module that was compiled.

    Touches: `OptimizedModule._orig_mod` (torch._dynamo.eval_frame), the attribute holding the compiled module,
    whose name prefixes every key. Written against torch 2.13.0. Public alternative: `nn.Module.compile()`
    compiles in place without a wrapper (no prefix; another key layout for sftlab's checkpoints); for the
    module itself, Accelerate's `unwrap_model(model, keep_torch_compile=False)`."""
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}


def version_counter(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter: it grows with every in-place write to the tensor or a view of
    it, so (identity, version) keys a value computed from its contents.

    Touches: `Tensor._version`. Written against torch 2.13.0. Public alternative: none that reads it."""
    return tensor._version


@contextmanager
def autograd_inside_custom_op() -> Iterator[None]:
    """Autograd on inside the implementation of a `torch.library.custom_op` (torch runs it below the autograd
    dispatch keys), so an op's backward can differentiate its own eager recomputation.

    Touches: `torch._C._SetExcludeDispatchKeyGuard`, `DispatchKey.AutogradFunctionality` and
    `DispatchKey.ADInplaceOrView`. Written against torch 2.13.0. Public alternative: an explicit backward
    formula (for attention: the fused kernels' private backward ops)."""
    keys = torch._C.DispatchKey
    with (
        torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False),
        torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False),
        torch.enable_grad(),
    ):
        yield


def cpu_flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention on CPU, (output, logsumexp): the kernel `scaled_dot_product_attention` runs there,
    with the logsumexp its backward needs. key/value may have fewer heads (grouped-query attention).

    Touches: `aten::_scaled_dot_product_flash_attention_for_cpu`. Written against torch 2.13.0. Public
    alternative: `F.scaled_dot_product_attention` (no logsumexp: its backward cannot be chosen)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scale
    )


def softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension written over `z` on CPU (a logits-sized tensor less to allocate and
    page in: 43 against 19 ms for 1024 x 49152 bf16); out of place elsewhere. The CPU kernel finishes
    reading a row before writing it (tests/compat/test_torch.py pins the in-place result to the
    out-of-place one).

    Touches: `aten::_softmax.out` with the input as `out`. Written against torch 2.13.0. Public alternative:
    `torch.softmax(z, -1)`."""
    if z.device.type != "cpu":
        return torch.softmax(z, dim=-1)
    return torch.ops.aten._softmax.out(z, -1, False, out=z)


def cpu_flash_attention_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (query, key, value) of `cpu_flash_attention`, computed in the inputs' dtype.

    Touches: `aten::_scaled_dot_product_flash_attention_for_cpu_backward`. Written against torch 2.13.0.
    Public alternative: autograd through `F.scaled_dot_product_attention` (one more forward)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, out, logsumexp, 0.0, True, scale=scale
    )


def _cpu_probe(name: str) -> bool | None:
    for mod in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        fn = getattr(mod, name, None)
        if callable(fn):
            try:
                return bool(fn())
            except Exception:  # a probe that fails says nothing
                return None
    return None


def cpu_supports(feature: str) -> bool | None:
    """Whether torch finds CPU feature `feature` ("amx_tile", "avx512_bf16", "avx512", "avx2", "vnni",
    "amx_fp16") on this machine; None when this torch has no probe for it or the probe fails.

    Touches: `torch.cpu._is_<feature>_supported` (private functions of the public torch.cpu module; older
    torch kept them in `torch._C._cpu`). Written against torch 2.13.0. Public alternative:
    `torch.backends.cpu.get_cpu_capability()` names the vector ISA torch dispatches to ("AVX512"), not
    AMX or AVX512-BF16; /proc/cpuinfo flags on Linux."""
    return _cpu_probe(f"_is_{feature}_supported")


@contextmanager
def replaced_forward(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """Within: calling `module` runs `forward` instead of its own (its hooks still run around it); after: its
    own forward again, or the forward another library had set on the instance (Accelerate's hooks).

    Touches: how `nn.Module.__call__` finds `self.forward` -- an instance attribute shadows the class's method
    -- and the `forward` slot of the module's `__dict__`, where Accelerate's hooks live too. Written against
    torch 2.13.0. Public alternative: none that skips the module's computation (a forward hook can replace
    its output, after the projection has run and its output exists)."""
    shadowed = module.__dict__.get("forward")
    try:
        module.forward = forward
        yield
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed
