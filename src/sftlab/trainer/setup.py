"""Building a run's components (trainer/components.py) once its data is prepared, each part by the module
that owns it and after what it needs:

  the model (trainer/run_model.py) -> its FLOP counter (trainer/throughput.py) -> the objective with its
  loss function (trainer/run_model.py) -> the micro-batch stream and the run's length (trainer/data.py,
  trainer/resolved.py) -> the optimizer with its fp32 masters and the LR schedule (trainer/optim.py) ->
  the compile decision (trainer/compiling.py) -> the engine's wrapping (trainer/distributed.py) -> the
  callbacks (trainer/callbacks.py).

`build_components` returns them with the run's `Resolved` completed by what building them decided.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from rich.console import Console

from sftlab.trainer import compiling, optim, run_model, sequence_parallel, throughput
from sftlab.trainer.callbacks import run_callbacks
from sftlab.trainer.components import Components
from sftlab.trainer.data import RunData, micro_batch_stream
from sftlab.trainer.distributed import Engine
from sftlab.trainer.objective import SFTObjective
from sftlab.trainer.resolved import Resolved, batch_geometry, plan_steps
from sftlab.trainer.run import TrainResult
from sftlab.trainer.rundir import check_disk_space


def build_components(
    resolved: Resolved, engine: Engine, console: Console, data: RunData, match_examples: list
) -> tuple[Components, Resolved]:
    """The run's components and its `Resolved` completed (once: `dataclasses.replace`, the record is frozen)."""
    cfg, accelerator, main = resolved.cfg, engine.accelerator, resolved.main
    shown = (
        console if main else None
    )  # what the main process prints    # 1. the model, built whole (sharded engines keep fp32 masters and cast themselves), then on its device
    built = build_model(resolved, engine, console, data)
    model = built.model
    if not (cfg.peft is not None and cfg.peft.quantize is not None):  # bitsandbytes places quantized weights
        model.to(accelerator.device)
    # 2. the objective and the loss function it computes with, checked on the device for this model
    objective = resolved.inputs.objective or SFTObjective(normalization=cfg.train.loss_normalization)
    allows = engine.target_loss_head_supported()
    objective.attach(run_model.loss_function(cfg, model, accelerator, shown, allows))
    # the model's own matmuls (before any wrapping); the head's only at targets with the target-only head
    target_head = getattr(getattr(objective, "loss_fn", None), "mode", None) == "target"
    flops = throughput.FlopCounter(model, target_head=target_head)
    # 3. the micro-batch stream over the data's units, and the run's length in steps
    data_world = sequence_parallel.data_position(accelerator)[1]  # a sequence's processes share its rows
    stream = micro_batch_stream(cfg, data.units, data_world)
    steps = plan_steps(cfg, stream.batches_per_epoch)
    checkpointing = cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_epoch
    if main:
        check_disk_space(resolved.output_dir, model, checkpointing)
    # 4. the optimizer (fp32 masters seeded from the weights the bf16 copies replaced), the LR schedule
    optimizer = optim.build_optimizer(model, cfg.optim, built.originals)
    decisions = built.decisions()
    del built  # the fp32 originals live on in the masters only
    scheduler = optim.build_scheduler(optimizer, cfg.optim, steps["total_steps"])
    # 5. what was decided, then compilation when it pays (it needs the run's length and peak FLOP/s)
    peak = peak_of(cfg, model, accelerator.device, resolved.mixed_precision, shown)
    resolved = dataclasses.replace(resolved, **decisions, **batch_geometry(cfg, data_world), **steps, **peak)
    model, resolved = compiling.compile_if_it_pays(
        model, resolved, data, accelerator.device, engine.sharded, flops.dense, shown
    )
    # 6. the engine's wrapping (DDP, FSDP2, DeepSpeed ZeRO), then the callbacks
    model, optimizer = engine.prepare(model, optimizer, cfg)
    callbacks = run_callbacks(cfg, resolved.inputs.callbacks, accelerator, resolved.output_dir)
    result = TrainResult(output_dir=resolved.output_dir, steps=resolved.total_steps, final_loss=None)
    parts = Components(
        engine=engine,
        console=console,
        data=data,
        match_examples=match_examples,
        objective=objective,
        callbacks=callbacks,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        flops=flops,
        result=result,
    )
    return parts, resolved


def build_model(resolved: Resolved, engine: Engine, console: Console, data: RunData) -> run_model.RunModel:
    """The model for training (trainer/run_model.py), in train mode, with what was done printed."""
    with engine.unpartitioned_loading():  # sharded engines keep fp32 masters and cast themselves
        built = run_model.build_run_model(
            resolved.cfg, data, "train", resolved.inputs.model, resolved.mixed_precision, engine.sharded
        )
    if resolved.main:
        for line in built.lines:
            console.print(line, highlight=False)
    built.model.train()
    return built


def peak_of(
    cfg, model, device: torch.device, mixed_precision: str, console: Console | None
) -> dict[str, Any]:
    """The peak FLOP/s MFU is measured against, and where it comes from (printed on `console`), as the
    `Resolved` fields `peak_flops` and `peak_flops_why`:
    `train.peak_flops`, else the run's compute dtype measured on the model's matmul shape
    (trainer/throughput.py: model_shape)."""
    if cfg.train.peak_flops:
        peak, why = cfg.train.peak_flops, "train.peak_flops"
    else:
        dtype = matmul_dtype(mixed_precision, model)
        budget = cfg.train.micro_batch_tokens or cfg.train.micro_batch_size * cfg.data.max_seq_length
        shape = throughput.model_shape(model, budget)
        peak = throughput.measure_peak_flops(device, dtype, shape=shape)
        name = str(dtype).removeprefix("torch.")
        why = f"measured: {name} matmuls {shape[0]}x{shape[1]}x{shape[2]}, forward and backward"
    if console is not None:
        console.print(
            f"[bold]MFU[/bold] against a peak of {peak / 1e9:,.0f} GFLOP/s ({why})", highlight=False
        )
    return {"peak_flops": peak, "peak_flops_why": why}


def matmul_dtype(mixed_precision: str, model) -> torch.dtype:
    """The dtype the matmuls run in (for the peak FLOP/s probe): bf16 under bf16 autocast, else the weights'."""
    return torch.bfloat16 if mixed_precision == "bf16" else next(model.parameters()).dtype
