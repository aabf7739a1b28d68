"""`train.compile`: whether a run compiles its model, decided before the first step; fixed shapes when it does.

`torch.compile` pays a compile cost once (seconds to minutes on a CPU) for a faster step after
it; it pays back only when the run is long enough. `decide` settles `auto` per run:

- only packed runs with fixed-size micro-batches (`data.packing`, `train.micro_batch_size`), where every
  micro-batch can be given one shape (`fixed_shape_collate`: each row padded to the packing length, the
  micro-batch to `micro_batch_size` rows, the padding a separate document with no targets, so the loss
  and the gradients are exactly those of the unpadded batch), so the model compiles once; never for a
  vision-language model (image shapes vary), a sharded engine (FSDP/DeepSpeed) or a run that resumes
  from a checkpoint written without compiling (the resumed run must compute what the first one did);
- on when saved >= 1.5 x cost, where saved = tokens still to train (padded) x eager seconds per token x
  (1 - 1/gain), and cost = the compile seconds. The three inputs are measured on this machine where a
  previous run left them (`record`: steady eager and compiled seconds per token, and the compile time =
  first compiled step - a steady one, per device, torch version, backend, dtype, model shape and packed
  attention, in `$SFTLAB_CACHE/compile_times.json`); else the eager time is the model FLOPs over the run's
  matmul probe (an optimistic step time, so it errs towards not compiling), the cost 30 s on a CPU, 60 s
  on a GPU, and the gain 1.2 on a GPU but none on a CPU: on a 2-core AVX2 EPYC the compiled step (dense
  mask) ran 1.11x the eager dense-mask step but 0.92x the eager per-document step it replaced
  (benchmarks/bench_compile.py), so a CPU compiles under `auto` only once a run with `compile: true`
  has measured a gain there.

Every packed attention compiles (model/attention.py: per-document attention is one opaque operator while
compiling, FlexAttention and the dense mask are traced), so with `train.packed_attention: auto` too the
decision is one of the whole step: `whole_step` takes the fastest of the (attention, eager | compiled)
options this machine has measured for the model, each compiled one charged its compile time 1.5-fold,
once at least two are measured; before that the attention probe picks the attention and `decide` the rest.

`compile_if_it_pays` applies the decision to a run's model when it is set up (trainer/setup.py):
`compile_model` compiles its repeated blocks (the decoder layers) in place, one graph for all of them. A packed
run with fixed-size micro-batches (not a vision-language or sharded one) gets the fixed shapes on a CPU even
when it stays eager: oneDNN builds and keeps kernels per product shape, and packed rows of a new length each
step meant new shapes every step (12 bf16 products of SmolLM2's shapes: 76-88 ms at a new row count against
42-45 ms again, +7.6 MiB kept per row count; LoRA 1x1024 eager, 8 steps: peak RSS 1935-1942 -> 1798-1802 MB,
no longer growing with the step count).

Evaluation forwards, samples and the match evaluation run the blocks' eager code (`eager()`, around them in
trainer/loop.py and outputs.py): they are few, without gradients, and of other shapes (generation with a KV
cache), each of which would be another compile.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from sftlab.compat import torch as torch_compat
from sftlab.compat import transformers as transformers_compat
from sftlab.data.packing import packed_collate
from sftlab.model import attention
from sftlab.paths import cache_root
from sftlab.trainer.data import RunData
from sftlab.trainer.precision import cpuinfo_field
from sftlab.trainer.resolved import Resolved

DEFAULT_GAIN = {"cpu": 1.0, "cuda": 1.2}
DEFAULT_COMPILE_S = {"cpu": 30.0, "cuda": 60.0}  # CPU: 16-22 s measured for SmolLM2's blocks, cold cache
MARGIN = 1.5  # the saving must exceed the cost by half again: the defaults are estimates
MIN_STEPS_TO_RECORD = 4  # steady step times need a few steps after the first


@dataclass(frozen=True)
class RunShape:
    """What the decision needs to know about the planned run."""

    setting: bool | str  # train.compile: True, False or "auto"
    packed: bool
    fixed_batches: bool  # micro_batch_size, not micro_batch_tokens
    vision: bool
    sharded: bool
    resumed_compiled: (
        bool | None
    )  # what the checkpoint this run resumes from did (None: not resuming / unknown)
    remaining_tokens: int  # padded tokens of the steps still to run, all ranks
    flops_per_token: float
    peak_flops: float | None
    device_type: str


def records_path() -> Path:
    return Path(os.environ.get("SFTLAB_COMPILE_TIMES", cache_root() / "compile_times.json"))


def read_records() -> dict[str, dict[str, float]]:
    try:
        return json.loads(records_path().read_text())
    except (OSError, ValueError):
        return {}


def machine_key(
    model: Any,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
    recompute: bool,
    attention_mode: str | None,
) -> str:
    """Device (CPU model / GPU name), torch version, backend, dtype, the model's shape and trainable share, the
    packed attention (documents | flex | mask)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    shape = {
        k: config.get(k)
        for k in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    text = json.dumps(
        [
            name,
            torch.__version__,
            backend,
            str(dtype),
            shape,
            round(trainable / max(total, 1), 3),
            recompute,
            attention_mode,
            "regional",  # what compile_model compiles (records of whole-model compiles do not apply)
        ],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decide(shape: RunShape, record: dict[str, float] | None = None) -> tuple[bool, str]:
    """(compile?, why) for this run (module docstring)."""
    if shape.setting is True or shape.setting is False:
        if shape.setting and shape.resumed_compiled is False:
            return (
                True,
                "as configured (the checkpoint was written without compiling: losses may differ in the last bits)",
            )
        return bool(shape.setting), "as configured"
    if shape.resumed_compiled is not None:
        return shape.resumed_compiled, "auto: as the run this one resumes did"
    for cond, why in (
        (not shape.packed, "rows are not packed, so micro-batch shapes vary"),
        (not shape.fixed_batches, "train.micro_batch_tokens gives micro-batches of varying rows"),
        (shape.vision, "image inputs vary in shape"),
        (shape.sharded, "FSDP/DeepSpeed runs are not compiled in sftlab"),
    ):
        if cond:
            return False, f"auto: {why}"
    record = record or {}
    if "eager_s_per_token" in record:
        eager, eager_src = record["eager_s_per_token"], "measured"
    elif shape.peak_flops:
        eager, eager_src = shape.flops_per_token / shape.peak_flops, "model FLOPs / matmul probe"
    else:
        return False, "auto: no step-time estimate"
    if "compiled_s_per_token" in record and "eager_s_per_token" in record:
        gain, gain_src = record["eager_s_per_token"] / record["compiled_s_per_token"], "measured"
    else:
        gain, gain_src = DEFAULT_GAIN.get(shape.device_type, 1.0), "assumed"
    if "compile_s" in record:
        cost, cost_src = record["compile_s"], "measured"
    else:
        cost, cost_src = DEFAULT_COMPILE_S.get(shape.device_type, DEFAULT_COMPILE_S["cpu"]), "assumed"
    if gain <= 1:
        return False, (
            f"auto: no gain {'measured' if gain_src == 'measured' else 'known'} for this device "
            f"({gain:.2f}x{'' if gain_src == 'measured' else '; run once with train.compile: true to measure it'})"
        )
    saved = shape.remaining_tokens * eager * (1 - 1 / gain)
    on = saved >= MARGIN * cost
    return on, (
        f"auto: would save ~{saved:.0f} s ({shape.remaining_tokens} tokens x "
        f"{eager * 1e3:.3f} ms/token eager ({eager_src}) x (1 - 1/{gain:.2f} gain, {gain_src})), "
        f"compiling costs ~{cost:.0f} s ({cost_src}); on when the saving is >= {MARGIN}x the cost"
    )


def whole_step(shape: RunShape, records: dict[str, dict[str, float]]) -> tuple[str, bool, str] | None:
    """(packed attention, compile?, why) from the measured whole-step times of each (attention, compiled)
    option `records` (attention mode -> its compile-time record) holds, counting each compiled option's
    compile time MARGIN-fold over the run's remaining tokens; None where fewer than two options are measured
    (the attention probe and `decide` settle it then). `train.compile: true` weighs only compiled options."""
    options = {}
    for mode, record in records.items():
        if "eager_s_per_token" in record and shape.setting is not True:
            options[(mode, False)] = record["eager_s_per_token"] * shape.remaining_tokens
        if "compiled_s_per_token" in record and "compile_s" in record:
            options[(mode, True)] = (
                record["compiled_s_per_token"] * shape.remaining_tokens + MARGIN * record["compile_s"]
            )
    if len(options) < 2:
        return None
    mode, compiled = min(options, key=options.get)

    def told(option: tuple[str, bool]) -> str:
        record = records[option[0]]
        if option[1]:
            return (
                f"compiled {option[0]} {record['compiled_s_per_token'] * 1e3:.3f} ms/token "
                f"+ {record['compile_s']:.0f} s compiling"
            )
        return f"eager {option[0]} {record['eager_s_per_token'] * 1e3:.3f} ms/token"

    shown = ", ".join(told(o) for o in sorted(options, key=options.get))
    return (
        mode,
        compiled,
        (
            f"auto: the fastest measured whole step for the {shape.remaining_tokens} tokens left: {shown} "
            f"(compile time counted {MARGIN}x)"
        ),
    )


def fixed_shape_collate(pad_id: int, max_seq_length: int, micro_batch_size: int):
    """Packed micro-batches of one shape: (micro_batch_size, max_seq_length); rows past the data are all
    padding, no targets."""
    return functools.partial(
        packed_collate, pad_id=pad_id, max_seq_length=max_seq_length, min_rows=micro_batch_size
    )


def update_record(
    key: str, compiled: bool, step_times: list[float], tokens_per_step: int
) -> dict[str, float] | None:
    """Fold a finished run's steady step time (median of its steps after the first two) and, compiled, its
    compile time (first step - steady) into the record of `key`; returns the record (None: too few steps)."""
    if len(step_times) < MIN_STEPS_TO_RECORD or tokens_per_step <= 0:
        return None
    steady = statistics.median(step_times[2:])
    records = read_records()
    record = records.get(key, {})
    if compiled:
        record["compiled_s_per_token"] = steady / tokens_per_step
        record["compile_s"] = max(0.0, step_times[0] - steady)
    else:
        record["eager_s_per_token"] = steady / tokens_per_step
    records[key] = record
    path = records_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        return None  # a read-only cache only loses the measurement
    return record


def _free_modes(resolved: Resolved, device: torch.device) -> list[str]:
    """The packed attentions `auto` may still pick between for the whole step: those the attention probe
    chose among (model/attention.choose), FlexAttention too on CUDA; only the chosen one otherwise."""
    if resolved.cfg.train.packed_attention != "auto" or not (resolved.packed_attention_why or "").startswith(
        "auto:"
    ):
        return [resolved.packed_attention] if resolved.packed_attention else []
    return ["documents", "mask", "flex"] if device.type == "cuda" else ["documents", "mask"]


def compile_if_it_pays(
    model,
    resolved: Resolved,
    data: RunData,
    device: torch.device,
    sharded: bool,
    dense_flops: float,
    console: Console | None,
) -> tuple[object, Resolved]:
    """`train.compile` resolved for this run, returned with `resolved` completed by it: with `auto` for both
    it and `train.packed_attention`, the fastest measured whole step (`whole_step`) where two options were
    measured here, else `decide` with the probe's attention; a compiled packed run, and an eager one on a CPU,
    gets fixed shapes (`data.collate` replaced). `console`: the main process's (None elsewhere)."""
    cfg = resolved.cfg
    packed, fixed = cfg.data.packing != "none", cfg.train.micro_batch_tokens is None
    dtype = torch.bfloat16 if resolved.mixed_precision == "bf16" else next(model.parameters()).dtype

    def key_of(mode: str | None) -> str:
        return machine_key(model, device, dtype, cfg.train.compile_backend, resolved.recompute, mode)

    resumed = resolved.resume_state
    shape = RunShape(
        cfg.train.compile,
        packed,
        fixed,
        data.processor is not None,
        sharded,
        resumed.compiled if resumed is not None else None,
        (resolved.total_steps - resolved.start_step) * resolved.tokens_per_step,
        float(dense_flops),
        resolved.peak_flops,
        device.type,
    )
    records, choice = read_records(), None
    recordable = packed and fixed and not shape.vision and not shape.sharded
    if recordable and shape.setting is not False and resumed is None:
        measured = {m: records[key_of(m)] for m in _free_modes(resolved, device) if key_of(m) in records}
        choice = whole_step(shape, measured)
    if choice is not None:
        mode, compiled, why = choice
        attention.use(model, mode)
        resolved = dataclasses.replace(resolved, packed_attention=mode, packed_attention_why=why)
    else:
        compiled, why = decide(shape, records.get(key_of(resolved.packed_attention)))
    key = key_of(resolved.packed_attention) if recordable else ""  # else auto never compiles: not recorded
    resolved = dataclasses.replace(resolved, compiled=compiled, compile_why=why, compile_key=key)
    if console is not None:
        console.print(f"[bold]compile[/bold]: {'on' if compiled else 'off'} ({why})", highlight=False)
    if packed and fixed and (compiled or (recordable and device.type == "cpu")):
        data.collate = fixed_shape_collate(data.pad_id, cfg.data.max_seq_length, cfg.train.micro_batch_size)
    if not compiled:
        return model, resolved
    model, what = compile_model(model, cfg.train.compile_backend, dynamic=False if packed and fixed else None)
    if console is not None:
        console.print(f"  compiled: {what}", highlight=False)
    return model, resolved


def compile_model(model, backend: str, dynamic: bool | None) -> tuple[object, str]:
    """(the model compiled, what was compiled). Regional compilation: each repeated block (the classes
    transformers keeps whole, `_no_split_modules`: the decoder layers) compiled in place, one graph for all
    of them (the blocks share their code; the weights are the graph's inputs), the embedding and the loss head
    left eager. Against compiling the whole model (its one graph traces every layer): on SmolLM2-135M, LoRA
    1x1024 on a 2-core CPU, a tenth of the compile time (~10 s against 44 s; 7 s against 186 s with
    recompute), faster steps (868 against 829 tokens/s) and less memory (1819 against 2173 MB). The state
    dict keeps its keys (no wrapper). A model without such blocks is compiled whole."""
    units = set(transformers_compat.no_split_modules(model))
    blocks = [m for m in model.modules() if type(m).__name__ in units]
    blocks = [b for b in blocks if not any(o is not b and _holds(o, b) for o in blocks)]  # outermost only
    if not blocks:
        return torch.compile(model, backend=backend, dynamic=dynamic), "the whole model (no repeated blocks)"
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
    model.register_load_state_dict_pre_hook(_whole_model_keys)
    return model, f"{len(blocks)} x {type(blocks[0]).__name__} (regional: one graph for the blocks)"


def _whole_model_keys(module, state_dict, prefix, *args) -> None:
    """A checkpoint of a run that compiled the whole model (sftlab before regional compilation) holds the
    keys of torch.compile's wrapper (`_orig_mod.` after the prefix): read as the model's own."""
    wrapped = prefix + torch_compat.COMPILED_PREFIX
    for key in [k for k in state_dict if k.startswith(wrapped)]:
        state_dict[prefix + key[len(wrapped) :]] = state_dict.pop(key)


def _holds(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def eager():
    """A context in which compiled modules run their eager code (evaluation and generation: other shapes, a
    KV cache; each would be another compile)."""
    return torch.compiler.set_stance("force_eager")
