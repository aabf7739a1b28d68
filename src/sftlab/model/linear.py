"""The frozen linear layers' products on a CPU: a matmul plan per shape, one input cast for layers sharing it.

*Plans* (`mm`). oneDNN picks a bf16 matmul's thread blocking from its shape, and on few cores some shapes of
about a thousand rows leave a thread idle. On a 2-core Xeon with AMX (torch 2.13), (1023 x 1536) @ (1536 x 576)
runs at 1.1-1.3 TFLOP/s with two threads, what one thread reaches alone, and (1023 x 576) @ (576 x 576) at
1.2-1.5; the same products written as two calls into the column halves of one output run at 1.7-2.1 and
1.8-2.3, while at 4092 rows, or 1536 columns, the plain call is the fastest. So `mm(a, b)` decides per shape
class (rows to the next power of two, inner and output sizes, which operands are transposed, dtype, threads):
it times the plain call and the product cut in column halves on the tensors at hand (median of three after
one warm-up each) and keeps the cut only if its result equals the plain call's bit for bit and it is 10%
faster. oneDNN's blocking, and with it the order of a sum, follows the exact shape (a cut that matches the
plain call at 1024 rows may not at 1023), so each exact shape met later checks the class's cut against the
plain call once more and takes the plain call where they differ. A plan thus never changes a number:
another run, a resumed one, or another machine computes the same bits whatever it chose. Small products
(under `PLANNED_MACS` multiply-adds or `PLANNED_ROWS` rows), other devices and compiled graphs take
`torch.mm`. (Row halves were a candidate too: no faster in whole steps, and each cut shape costs oneDNN
resident memory: +16 MB peak against +7 MB for the column halves.)

*Shared cast* (`shared_cast`). q, k and v (gate and up) read one normed hidden state, which under autocast
each layer would cast to the compute dtype and save for its backward apart: three copies of (tokens, hidden)
per attention. The cast happens inside the layers' autograd functions, keyed on the memory viewed and its
version counter, so consecutive layers reading the same unchanged tensor share one copy; the input
gradients still meet at the uncast input, summed in its dtype as the separate casts' were.

The LoRA layers' product on a frozen base (model/adapters.py `_LoraProduct`) uses both: its base product
and its input gradient are planned (SmolLM2 LoRA 1x1024 eager on that Xeon: the forward and backward of a
step 1.8% and 2.8% faster in two runs, each the median of 8-10 steps timed A, B, B, A on the same batch;
losses bitwise equal). A full fine-tune's layers do not: the same plans there, with the weight gradients', measured
no gain in whole runs (533 against 545 tokens/s, peak RSS 3753 against 3707 MB).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from sftlab.compat import torch as torch_compat

PLANNED_MACS = 1 << 26  # ~67M multiply-adds: below, a plan saves too little to time it
PLANNED_ROWS = 128
SPEEDUP_NEEDED = 0.9  # a cut's median time must be under 0.9x the plain call's

# Per shape class (rows to the next power of two): the candidate chosen. Per exact shape: the class's candidate
# where it computes the plain call's bits there, else "plain".
_PLANS: dict[tuple, str] = {}
_EXACT: dict[tuple, str] = {}


def _columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[1])
    half = -(-b.shape[1] // 2)
    torch.mm(a, b[:, :half], out=out[:, :half])
    torch.mm(a, b[:, half:], out=out[:, half:])
    return out


CANDIDATES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "plain": torch.mm,
    "columns": _columns,
}


def _key(a: torch.Tensor, b: torch.Tensor, rows: int) -> tuple:
    inner, cols = a.shape[1], b.shape[1]
    transposed = (a.stride(0) == 1 and a.shape[0] > 1, b.stride(0) == 1 and inner > 1)
    return (rows, inner, cols, *transposed, a.dtype, torch.get_num_threads())


def _median_time(product: Callable, a: torch.Tensor, b: torch.Tensor) -> float:
    product(a, b)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        product(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(a: torch.Tensor, b: torch.Tensor) -> str:
    """The fastest candidate for a @ b whose result is the plain call's bit for bit ("plain" unless a cut
    is 10% faster)."""
    reference = torch.mm(a, b)
    times = {"plain": _median_time(torch.mm, a, b)}
    for name, product in CANDIDATES.items():
        if name != "plain" and torch.equal(product(a, b), reference):
            times[name] = _median_time(product, a, b)
    best = min(times, key=times.__getitem__)
    return best if times[best] < SPEEDUP_NEEDED * times["plain"] else "plain"


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-d tensors, computed as this shape's plan says (`choose`, once per shape class); inside
    autograd functions (a plan writes into an output: it is not differentiable)."""
    rows, inner, cols = a.shape[0], a.shape[1], b.shape[1]
    if (
        a.device.type != "cpu"
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        or rows < PLANNED_ROWS
        or rows * inner * cols < PLANNED_MACS
    ):
        return torch.mm(a, b)
    exact = _key(a, b, rows)
    plan = _EXACT.get(exact)
    if plan is None:
        shape_class = _key(a, b, (rows - 1).bit_length())
        if shape_class not in _PLANS:
            plan = _PLANS[shape_class] = choose(a, b)
        else:  # the class's plan, where it computes this exact shape's bits too
            plan = _PLANS[shape_class]
            if plan != "plain" and not torch.equal(CANDIDATES[plan](a, b), torch.mm(a, b)):
                plan = "plain"
        _EXACT[exact] = plan
    return CANDIDATES[plan](a, b)


def plans() -> dict[tuple, str]:
    """The plans chosen so far in this process (shape class -> candidate), for reports and tests."""
    return dict(_PLANS)


# The compute-dtype copy of the last input cast. Each layer gets its own 2-d view of it: the key is the memory
# viewed (address, shape, strides) and the version counter its views share; holding the view keeps that
# memory from being freed and reused meanwhile.
_CAST: dict[str, Any] = {"source": None, "key": None, "cast": None}


def shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, one copy for consecutive calls on the same unchanged tensor (call it inside an autograd
    function: the input gradient still reaches `x` from each caller)."""
    if x.dtype == dtype or torch.compiler.is_compiling():  # compiled: the graph computes the cast once
        return x.to(dtype)
    key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, torch_compat.version_counter(x), dtype)
    if _CAST["key"] != key:
        _CAST.update(source=x, key=key, cast=x.to(dtype))
    return _CAST["cast"]
