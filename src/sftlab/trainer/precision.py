"""Numeric precision of training: which mixed-precision mode runs, and which weights hold bf16 copies.

`resolve_mixed_precision(setting, device)` turns the config value (`auto|no|bf16|fp16`) into what
`Accelerator(mixed_precision=...)` takes, with a one-line reason for the log: bf16 where the hardware
runs it fast (a CUDA GPU with bf16, a CPU with AMX-BF16 or AVX512-BF16, see `cpu_has_fast_bf16`), fp32
otherwise. fp16 is refused on CPU (it needs loss scaling and has no fast CPU kernels).
`SFTLAB_AUTO_MIXED_PRECISION=bf16|no` forces what `auto` resolves to, whatever the hardware (the test
suite runs both ways on any CPU).

`bf16_weight_form(mixed, weights_dtype, optimizer)` then says how bf16 compute is held: bf16 copies of
fp32 masters (trainer/master_weights.py) where the optimizer keeps masters (AdamW), else fp32 weights
under autocast.

For a run: `run_precision(cfg)` is the mode and its reason on the device Accelerate will pick
(`run_device_type`), with the refusals as RunError; `print_precision` says what computes in which dtype;
`compute_dtype` is the forward's dtype (run.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env
from rich.console import Console

from sftlab.compat import torch as torch_compat
from sftlab.config.schema import SFTConfig
from sftlab.trainer.rundir import RunError

MIXED_PRECISION_SETTINGS = ("auto", "no", "bf16", "fp16")
AUTO_ENV = "SFTLAB_AUTO_MIXED_PRECISION"  # forces what train.mixed_precision: auto resolves to (bf16 | no)


# ---------------------------------------------------------------------------- hardware and autocast mode


def cpuinfo_field(name: str, path: str = "/proc/cpuinfo") -> str:
    """The first CPU's `name` field of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k.strip() == name), "")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    return set(cpuinfo_field("flags", path).split())


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware: AMX-BF16 (Sapphire Rapids+) or AVX512-BF16. Asks
    torch's probes first (AMX tiles: every CPU with AMX has AMX-BF16), then /proc/cpuinfo flags."""
    probes = [torch_compat.cpu_supports("amx_tile"), torch_compat.cpu_supports("avx512_bf16")]
    if any(probes):
        return True
    if all(p is not None for p in probes):
        return False
    return bool(_cpuinfo_flags() & {"amx_bf16", "avx512_bf16"})


def _cuda_bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation argument
        return bool(torch.cuda.is_bf16_supported())


def forced_auto() -> str | None:
    """What `auto` is forced to by the environment (`SFTLAB_AUTO_MIXED_PRECISION=bf16|no`), else None: the
    same run (or the whole test suite) takes the bf16 or the fp32 path whatever the CPU offers."""
    value = os.environ.get(AUTO_ENV, "").strip().lower()
    if not value:
        return None
    forced = {"bf16": "bf16", "no": "no", "fp32": "no"}.get(value)
    if forced is None:
        raise ValueError(f"{AUTO_ENV}={value!r}: expected bf16 or no (fp32)")
    return forced


def resolve_mixed_precision(
    setting: str, device: torch.device | str, weights_dtype: str = "float32"
) -> tuple[str, str]:
    """(mode for `Accelerator(mixed_precision=...)`: "no" | "bf16" | "fp16", one-line reason for the log).

    auto: bf16 on a CUDA device that supports it and on a CPU with AMX-BF16/AVX512-BF16, else no;
    with bfloat16 weights (`model.dtype`) the compute is bf16 anyway, so auto picks bf16 wherever
    bf16 runs at all.
    Explicit values are honoured where they can work: fp16 on CPU and bf16 on a CUDA device without bf16
    raise ValueError; bf16 on a CPU without fast bf16 runs (correctly, but likely slower than fp32).
    """
    if setting not in MIXED_PRECISION_SETTINGS:
        raise ValueError(
            f"mixed precision {setting!r}: expected one of {', '.join(MIXED_PRECISION_SETTINGS)}"
        )
    dev = torch.device(device)
    if (
        setting == "auto"
        and weights_dtype == "bfloat16"
        and not (dev.type == "cuda" and not _cuda_bf16_supported())
    ):
        return "bf16", "auto: the weights are bfloat16 (model.dtype), so the compute is bf16"
    forced = forced_auto()
    if setting == "auto" and forced is not None:
        if forced == "bf16" and dev.type == "cuda" and not _cuda_bf16_supported():
            raise ValueError(f"{AUTO_ENV}=bf16: this CUDA device does not support bf16")
        return forced, f"auto: {forced} ({AUTO_ENV}={os.environ[AUTO_ENV]})"
    if setting == "no":
        return "no", "mixed precision off as configured (no autocast: compute in the model's dtype)"
    if dev.type == "cpu":
        return _on_cpu(setting)
    if dev.type == "cuda":
        return _on_cuda(setting)
    if setting == "auto":
        return "no", f"auto: no fast bf16 known for device type {dev.type!r}"
    return setting, f"{setting} as configured on device type {dev.type!r}"


def _on_cpu(setting: str) -> tuple[str, str]:
    """`resolve_mixed_precision` on a CPU: bf16 where it is fast (or as configured), never fp16."""
    fast = cpu_has_fast_bf16()
    if setting == "fp16":
        raise ValueError(
            "mixed precision fp16 is not supported on CPU (it needs gradient scaling and CPUs "
            "have no fast fp16 kernels); use bf16 or no"
        )
    if setting == "auto":
        return (
            ("bf16", "auto: CPU has AMX-BF16/AVX512-BF16, bf16 autocast is fast")
            if fast
            else ("no", "auto: CPU has no AMX-BF16/AVX512-BF16, bf16 would be slower than fp32")
        )
    return "bf16", (
        "bf16 as configured; CPU has AMX-BF16/AVX512-BF16"
        if fast
        else "bf16 as configured; this CPU has no AMX-BF16/AVX512-BF16, so bf16 math is emulated "
        "and will likely be slower than fp32"
    )


def _on_cuda(setting: str) -> tuple[str, str]:
    """`resolve_mixed_precision` on a CUDA device: bf16 where it has it, fp16 only as configured."""
    bf16 = _cuda_bf16_supported()
    if setting == "auto":
        return (
            ("bf16", "auto: CUDA device supports bf16")
            if bf16
            else ("no", "auto: CUDA device has no bf16; fp16 (with loss scaling) only if set explicitly")
        )
    if setting == "bf16":
        if not bf16:
            raise ValueError("mixed precision bf16: this CUDA device does not support bf16; use fp16 or no")
        return "bf16", "bf16 as configured; CUDA device supports bf16"
    return "fp16", "fp16 as configured (Accelerate scales the loss to avoid gradient underflow)"


# ---------------------------------------------------------------------------- which weights hold bf16 copies

OPTIMIZERS_WITH_MASTERS = ("adamw",)  # MasterWeightAdamW; the others update the parameters they are given


def bf16_weight_form(
    mixed: str, weights_dtype: str, optim_name: str, engine_casts: bool = False
) -> tuple[str, str]:
    """Which parameters train as bf16 copies of fp32 masters: "none" | "matmul" | "all", and why (the log).

    bf16 compute (`mixed` bf16, or bfloat16 weights) keeps the matmul weights as bf16 copies whose fp32
    masters live in `MasterWeightAdamW` ("matmul"; "all" for pure bf16 without autocast). Only AdamW keeps
    masters: for SGD, Adafactor and the 8-bit AdamWs the weights stay fp32 and bf16 autocast casts them at
    each op, which computes the same bf16 products ("none"). Pure bf16 (bfloat16 weights, no autocast)
    with such an optimizer would drop every update below half a bf16 ulp: refused (ValueError) with the fix.
    `engine_casts`: FSDP/DeepSpeed or a quantized base cast the weights themselves ("none").
    """
    if engine_casts or not (mixed == "bf16" or weights_dtype == "bfloat16"):
        return "none", "no bf16 weight copies"
    form = "matmul" if mixed == "bf16" else "all"
    if optim_name in OPTIMIZERS_WITH_MASTERS:
        return form, "bf16 copies of fp32 masters held by the optimizer"
    if form == "all":
        raise ValueError(
            f"optim.name: {optim_name} keeps no fp32 master weights, so bfloat16 weights without "
            "autocast (model.dtype: bfloat16, train.mixed_precision: no) would lose every update "
            "smaller than a bf16 ulp; use train.mixed_precision: bf16 (fp32 weights under bf16 "
            "autocast, still saved as bfloat16) or optim.name: adamw"
        )
    return (
        "none",
        f"optim.name: {optim_name} keeps no fp32 master weights, so the weights it updates stay fp32",
    )


# ---------------------------------------------------------------------------- a run's precision


def run_device_type() -> str:
    """The device Accelerate will pick (asked before it is built: mixed precision is fixed then)."""
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def run_precision(cfg: SFTConfig) -> tuple[str, str]:
    """The mixed-precision mode and its reason; refusals (a mode this device cannot run, pure bf16 with an
    optimizer that keeps no fp32 masters) as RunError."""
    try:
        mixed, why = resolve_mixed_precision(cfg.train.mixed_precision, run_device_type(), cfg.model.dtype)
    except ValueError as e:
        raise RunError(f"train.mixed_precision: {e}") from None
    try:
        bf16_weight_form(mixed, cfg.model.dtype, cfg.optim.name)  # pure bf16 needs an optimizer with masters
    except ValueError as e:
        raise RunError(str(e)) from None
    return mixed, why


def print_precision(
    cfg: SFTConfig, console: Console, mixed: str, why: str, engine_casts: tuple[str, str] | None
) -> None:
    """One line: what computes in which dtype, and why. `engine_casts`: the engine's own (compute,
    masters) description when it casts the weights itself (they stay fp32), else None."""
    quantized = cfg.peft is not None and cfg.peft.quantize is not None
    form, form_why = bf16_weight_form(mixed, cfg.model.dtype, cfg.optim.name, quantized)
    compute = {
        "matmul": "bf16 autocast, matmul weights as bf16 copies of fp32 masters"
        + (" (the frozen base's: their bf16 rounding, the product autocast computes)" if cfg.peft else ""),
        "all": "bf16 weights (copies of fp32 masters), no autocast",
    }.get(form)
    if compute is None:
        compute = {
            "bf16": "bf16 autocast"
            + (" on a quantized base" if quantized else f" on fp32 weights ({form_why})"),
            "fp16": "fp16 autocast with loss scaling",
        }.get(mixed, compute_dtype(cfg.model.dtype, mixed))
    masters = "; fp32 master weights in the optimizer" if form != "none" else ""
    if engine_casts is not None:
        compute, masters = engine_casts
    console.print(
        f"[bold]precision[/bold]: {compute} ({why}){masters}; saved as {cfg.model.dtype}", highlight=False
    )


def compute_dtype(weights: str, mixed: str) -> str:
    """The dtype the forward runs in: bf16 under bf16 mixed precision or with bfloat16 weights, else fp32
    (float16 weights train from fp32 masters in fp32 and are saved as float16; fp16 compute is
    train.mixed_precision: fp16)."""
    return (
        "bfloat16"
        if mixed == "bf16" or weights == "bfloat16"
        else "float16"
        if mixed == "fp16"
        else "float32"
    )
