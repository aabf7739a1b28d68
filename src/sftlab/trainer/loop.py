"""The training loop: from config to saved model, one optimizer step at a time.

`run_training` is the recipe, a table of contents of its phases:
  setup_run -> setup_data -> check_resume_state -> setup_model_and_optimizer (trainer/setup.py)
  -> resume_or_start (trainer/resume.py) -> open_run_log -> fit -> finish (trainer/outputs.py)
  -> with train.push_to_hub the upload (trainer/hub.py), once the other processes have left.
From open_run_log on, SIGINT/SIGTERM mean: finish the step, checkpoint, stop (trainer/control.py),
and a callback returning True means the same (trainer/callbacks.py).
`fit` runs the optimizer steps; each is `optimizer_step` (micro-batches, forward/backward, clipping,
NaN policy, the optimizer and the LR schedule) then `add_eval_and_log`, the checkpoint when due
(`save_run_checkpoint`), and the callbacks' `on_step_end`.

Follow one optimizer step: `MicroBatchStream` picks example indices -> `pad_collate` (or
`packed_collate`) builds tensors -> `model_forward` (model/loss.py) hands the model every batch key
but the labels -> the objective (trainer/objective.py; supervised fine-tuning: the summed target-token
NLL, by the target-only head) gives the micro-batch's loss SUM -> the sum is divided by the
objective's normaliser over the WHOLE optimizer step (all micro-batches, all ranks: the target
tokens) and back-propagated (`train_step`) -> gradients are clipped -> the optimizer and the LR
schedule step. Over several processes the engine `accelerate launch` chose (DDP, FSDP2, DeepSpeed
ZeRO) wraps the model; the loop asks the run's `Engine` (trainer/distributed.py) whatever differs between them.
"""

from __future__ import annotations

import functools
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sftlab.config.schema import SFTConfig
from sftlab.data.packing import pack_examples, packed_collate
from sftlab.trainer import best, distributed, hub
from sftlab.trainer.checkpoint import TrainerState, latest_checkpoint, save_checkpoint
from sftlab.trainer.control import Interrupted, StopRequest
from sftlab.trainer.evaluate import target_loss
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.master_weights import master_weight_optimizer
from sftlab.trainer.objective import Objective, SFTObjective
from sftlab.trainer.outputs import (
    finish,
    finished_result,
    hf_model_writer,
    match_json,
    open_run_log,
    run_match_eval,
    save_model,
)
from sftlab.trainer.resume import (
    check_resume_state,
    data_fingerprint,
    restore_checkpoint,
    trainable_only_checkpoints,
)
from sftlab.trainer.run import Run, TrainResult
from sftlab.trainer.rundir import RunError
from sftlab.trainer.setup import setup_data, setup_model_and_optimizer, setup_run

__all__ = [
    "Interrupted",
    "RunError",
    "TrainResult",
    "evaluate_loss",
    "run_training",
    "save_model",
    "train_step",
]


def run_training(
    cfg: SFTConfig,
    console: Console | None = None,
    resume_command: str | None = None,
    inputs: RunInputs | None = None,
) -> TrainResult:
    """The recipe: set up -> data -> model and optimizer -> resume or start -> log -> fit -> finish.

    `resume_command`: the command line that resumes this run, printed when a signal stops it (the CLI
    passes its own argv + train.resume=auto). `inputs`: what the Python API passes (sftlab/api.py)."""
    run = setup_run(cfg, console or Console(soft_wrap=True), resume_command, inputs)
    if run is None:  # train.resume=auto on a finished run: nothing to train
        return finished_result(run_dir(cfg))
    setup_data(run)
    best.check_metric(run)
    check_resume_state(run)  # processes, engine and data of a checkpoint: before any weights load
    setup_model_and_optimizer(run)
    resume_or_start(run)
    with StopRequest(
        announce=run.main
    ) as run.stop:  # from here: SIGINT/SIGTERM = finish the step, checkpoint, stop
        open_run_log(run)
        fit(run)
    if run.result.stopped is None:
        best.restore_best(run)
        finish(run)
    elif run.main:
        run.callbacks.call("on_train_end", run.result)
    push = run.main and run.result.stopped is None and run.cfg.train.push_to_hub
    run.engine.leave_together()
    if push:  # after the other ranks have left: an upload of any length never holds them in a collective
        hub.push_after_training(run)
    return run.result


def run_dir(cfg: SFTConfig) -> Path:
    return Path(cfg.train.output_dir)


def resume_or_start(run: Run) -> None:
    cfg = run.cfg
    if run.resume_from is not None:
        restore_checkpoint(run)
    elif cfg.match_eval is not None and run.engine.sharded:
        if run.main:  # generation on one rank would need the other ranks' shards
            run.console.print(
                "[yellow]match_eval[/yellow]: not run before training under a sharded engine "
                "(FSDP/DeepSpeed); it runs on the saved model after training"
            )
    elif cfg.match_eval is not None and run.main:
        run.result.match_before = run_match_eval(run.engine.unwrap(run.model), run, "before")


# --- the optimizer steps -----------------------------------------------------------------------


def fit(run: Run) -> None:
    """Optimizer steps from the resume point to the end; on SIGINT/SIGTERM or a callback's request:
    checkpoint, then stop."""
    batches_iter = iter(run.stream)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=run.console,
        disable=not run.main or not run.console.is_terminal,
    )
    stop = run.stop
    with progress:
        task = progress.add_task("training", total=run.resolved.total_steps, completed=run.start_step)
        for step in range(run.start_step + 1, run.resolved.total_steps + 1):
            epoch_before = run.stream.epoch
            run.callbacks.step = step
            record = optimizer_step(run, step, batches_iter)
            run.step_times.append(record["step_time_s"])
            add_eval_and_log(run, record)
            progress.advance(task)
            due = checkpoint_due(run, step, epoch_before, stop) or best.due(run, record)
            path = save_run_checkpoint(run, step) if due else None
            asked, save_asked = callbacks_ask_stop(run, record)
            if (
                asked or save_asked or stop.signum is not None
            ) and path is None:  # a signal during the callbacks too
                path = save_run_checkpoint(run, step)
            if stop.signum is not None:
                raise interrupted(run, step, path)
            if asked:
                run.result.stopped = run.callbacks.stop_reason or f"a callback on another rank at step {step}"
                if run.main:
                    run.console.print(
                        f"[bold yellow]stopped[/bold yellow] by {run.result.stopped}; saved {path}; "
                        f"resume with: {run.resume_command}",
                        highlight=False,
                    )
                return


def callbacks_ask_stop(run: Run, record: dict[str, Any]) -> tuple[bool, bool]:
    """on_step_end on this rank's callbacks: (stop, save) -- whether a hook asked to stop, and whether one of
    this step asked for a checkpoint ("save"); the main process's answers hold for every rank."""
    asked = run.callbacks.call("on_step_end", record)
    save = run.callbacks.take_save_request()
    if run.world > 1:
        asked, save = broadcast_object_list([asked, save])
    return bool(asked), bool(save)


def interrupted(run: Run, step: int, path) -> Interrupted:
    name = signal.Signals(run.stop.signum).name
    if run.main:
        for cb in run.callbacks.callbacks:
            if hasattr(cb, "interrupted"):  # the report says how the run ended
                cb.interrupted(f"interrupted by {name} after step {step} of {run.resolved.total_steps}")
    return Interrupted(
        f"{name}: stopped after step {step}/{run.resolved.total_steps} and saved {path}; "
        f"resume with: {run.resume_command}",
        128 + run.stop.signum,
    )


def next_micro_batches(run: Run, batches_iter) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
    """This rank's micro-batches of one optimizer step, on the device, and what they hold: input
    tokens, padded positions, and the sum of squared document lengths (for attention FLOPs)."""
    data, world, rank = run.data, run.world, run.accelerator.process_index
    n_micro = min(run.cfg.train.grad_accum_steps, run.resolved.total_micro - run.consumed)
    batches, sizes = [], {"tokens": 0, "padded": 0, "sum_sq_docs": 0}
    for _ in range(n_micro):
        idx = next(batches_iter)[rank::world]
        if idx:
            units = [data.units[i] for i in idx]
            batch = data.collate(units)
            sizes["tokens"] += sum(len(u.input_ids) for u in units)
            sizes["padded"] += batch["input_ids"].numel()
            sizes["sum_sq_docs"] += sum(
                n * n for u in units for n in getattr(u, "doc_lengths", [len(u.input_ids)])
            )
        else:  # a short last batch left this rank nothing: run one unit that contributes nothing, so DDP stays in step
            batch = run.objective.filler(data.collate([data.units[0]]))
        batches.append({k: v.to(run.accelerator.device) for k, v in batch.items()})
    run.consumed += n_micro
    return batches, sizes


def train_step(
    model,
    batches: list[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    objective: Objective | Any = None,
    engine: distributed.Engine | None = None,
) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one optimizer step.

    `objective` (trainer/objective.py; default: SFT with full logits; a bare loss function
    `(model, batch) -> summed NLL`, e.g. a `TargetLossHead`, is SFT with that function) gives each
    micro-batch's loss sum and normaliser. Returns (loss sum over all ranks, global normaliser).
    The loss each micro-batch back-propagates is its sum / the global normaliser, times the world size
    because every engine (DDP, FSDP, DeepSpeed ZeRO) averages gradients over ranks: the step's
    gradient is then exactly the gradient of (sum of all the step's losses) / (its whole normaliser).
    `engine`: the run's (default: `Engine.of(accelerator)`).
    """
    objective = objective if hasattr(objective, "loss_sum") else SFTObjective(objective)
    local = sum(objective.normaliser(b) for b in batches)
    global_norm = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    if global_norm == 0:
        return 0.0, 0
    scale = accelerator.num_processes / global_norm
    step_sum = torch.zeros((), dtype=torch.float64)
    engine = engine or distributed.Engine.of(accelerator)
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with engine.accumulating(model, sync):
            loss_sum = objective.loss_sum(model, batch)
            engine.backward(model, loss_sum * scale, boundary=sync)
        step_sum += loss_sum.detach().double().cpu()
    total = float(accelerator.reduce(step_sum.to(accelerator.device), "sum"))
    return total, global_norm


def optimizer_step(run: Run, step: int, batches_iter) -> dict[str, Any]:
    """One optimizer step with its NaN policy; returns the step's record."""
    t0 = time.perf_counter()
    position = run.stream.state()
    batches, sizes = next_micro_batches(run, batches_iter)
    loss_sum, norm = train_step(run.model, batches, run.accelerator, run.objective, run.engine)
    lr = run.scheduler.get_last_lr()[0]
    grad_norm = 0.0  # nothing was back-propagated: no clipping, no update
    if (
        norm
    ):  # clipped here, or (DeepSpeed) clipped and stepped inside the engine once the loss is known finite
        grad_norm = run.engine.step_gradients(run.model, math.isfinite(loss_sum), lambda: clip_gradients(run))
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if not finite and run.cfg.train.on_nan == "stop":
        raise non_finite(run, step, position, len(batches), math.isfinite(loss_sum))
    if norm and finite:
        run.engine.optimizer_step(run.optimizer)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    losses = run.objective.record(loss_sum, norm)
    record = {
        "step": step,
        "epoch": round(run.stream.epoch_progress, 4),
        "loss": losses.pop("loss"),
        "lr": lr,
        "grad_norm": grad_norm,
        **throughput(run, sizes, norm, elapsed),
        **losses,
        "step_time_s": round(elapsed, 4),
    }
    if not finite:
        record["skipped"] = "non-finite loss or gradient"
    return record


def non_finite(run: Run, step: int, position: dict[str, int], n_batches: int, loss_finite: bool) -> RunError:
    last = latest_checkpoint(run.out)
    return RunError(
        f"non-finite {'gradient norm' if loss_finite else 'loss'} at step {step} "
        f"(epoch {position['epoch']}, micro-batches {position['index']}..{position['index'] + n_batches - 1} "
        f"of that epoch's order, seed {position['seed']}); stopped without updating the weights. "
        + (f"Last good checkpoint: {last}" if last else "No checkpoint was saved yet")
        + " (train.on_nan=skip_step skips such steps)"
    )


def clip_gradients(run: Run) -> float:
    """Clip to optim.max_grad_norm (None: only measure); returns the total norm before clipping.
    With fp32 master weights the norm is taken (and clipped) on the fp32 master gradients."""
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm is not None else float("inf")
    master = master_weight_optimizer(run.optimizer)
    if master is not None and run.resolved.mixed_precision != "fp16":
        return float(master.clip_grad_norm_(max_norm))
    return float(run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm))


def throughput(run: Run, sizes: dict[str, int], targets: int, elapsed: float) -> dict[str, float]:
    """tokens/s (input tokens, padding excluded), target tokens/s, padding share and MFU, all ranks."""
    tokens, padded = sizes["tokens"] * run.world, sizes["padded"] * run.world
    flops = run.flops.step_flops(sizes["tokens"], sizes["sum_sq_docs"]) * run.world
    return {
        "tokens_per_s": tokens / elapsed,
        "target_tokens_per_s": targets / elapsed,
        "padding": round(1 - tokens / padded, 4) if padded else 0.0,
        # 4 significant digits, not 4 decimals: a small model on a fast-bf16 peak is below 5e-5, not 0
        "mfu": float(f"{flops / elapsed / (run.resolved.peak_flops * run.world):.4g}"),
    }


# --- evaluation, the step record, checkpoints ----------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model,
    examples,
    batch_size: int,
    pad_id: int,
    accelerator: Accelerator,
    objective: Objective | None = None,
    prefix: str = "eval_",
    collate: Any = None,
    max_batches: int | None = None,
    engine: distributed.Engine | None = None,
) -> dict[str, float]:
    """The objective's eval record over `examples` (padded micro-batches, shared over ranks):
    {"eval_loss": mean NLL over their target tokens} for SFT. `engine`: the run's (default: `Engine.of`)."""
    objective = objective or SFTObjective()
    engine = engine or distributed.Engine.of(accelerator)
    lockstep = engine.lockstep_forwards  # collective forwards: the same batch count on every rank
    if (
        not lockstep
    ):  # plain forward: ranks may run different numbers of batches; eager (trainer/compiling.py)
        model = engine.bare_model(model)  # DDP(compiled) too: the compiled module is inside DDP
    with accelerator.autocast():  # the module unwrapped from torch.compile lost Accelerate's autocast forward
        total, norm = target_loss(
            model,
            examples,
            pad_id,
            batch_size,
            objective,
            accelerator.device,
            accelerator.process_index,
            accelerator.num_processes,
            lockstep=lockstep,
            collate=collate,
            max_batches=max_batches,
        )
    totals = accelerator.reduce(
        torch.tensor([total, float(norm)], dtype=torch.float64, device=accelerator.device), "sum"
    )
    return objective.record(totals[0].item(), int(totals[1].item()), prefix)


def run_evaluation(run: Run) -> dict[str, float]:
    """Validation over all eval examples (`eval_loss`), and over each named eval set (`eval/<name>_loss`)."""
    data, cfg = run.data, run.cfg
    batch, cap = cfg.train.micro_batch_size, cfg.train.eval_max_batches
    collate, rows = getattr(data, "eval_collate", None), lambda examples: examples
    if (
        cfg.data.eval_packing and collate is None
    ):  # best-fit rows, never wrapped: a cut document would change its loss
        collate = functools.partial(packed_collate, pad_id=data.pad_id)
        rows = lambda examples: pack_examples(examples, "bfd", cfg.data.max_seq_length)  # noqa: E731
    metrics = evaluate_loss(
        run.model,
        rows(data.eval),
        batch,
        data.pad_id,
        run.accelerator,
        run.objective,
        collate=collate,
        max_batches=cap,
        engine=run.engine,
    )
    for name, examples in data.eval_sets.items():
        metrics.update(
            evaluate_loss(
                run.model,
                rows(examples),
                batch,
                data.pad_id,
                run.accelerator,
                run.objective,
                prefix=f"eval/{name}_",
                collate=collate,
                max_batches=cap,
                engine=run.engine,
            )
        )
    return metrics


def add_eval_and_log(run: Run, record: dict[str, Any]) -> None:
    """Validation when due (every eval_every steps, and at the last step), then the record is kept in the
    history and, when due, written to metrics.jsonl, the console and the callbacks' on_log."""
    cfg, step, last = run.cfg, record["step"], record["step"] == run.resolved.total_steps
    eval_due = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
    if len(run.data.eval) and (eval_due or last):
        metrics = run_evaluation(run)
        record.update(metrics)
        run.result.eval_loss = metrics.get("eval_loss")
        run.result.eval_losses = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        run.callbacks.call("on_evaluate", {"step": step, **metrics})
    run.result.history.append(record)
    run.result.final_loss = record["loss"]
    if step % cfg.train.log_every == 0 or last or "eval_loss" in record or "skipped" in record:
        run.logged_steps.append(step)
        run.metrics.write(record)
        run.metrics.show(record, run.resolved.total_steps)
        run.callbacks.call("on_log", record)


def checkpoint_due(run: Run, step: int, epoch_before: int, stop: StopRequest) -> bool:
    every = run.cfg.checkpoint.every_steps
    return (
        bool(every and step % every == 0)
        or (run.cfg.checkpoint.every_epoch and run.stream.epoch > epoch_before)
        or stop.signum is not None
    )


def save_run_checkpoint(run: Run, step: int):
    state = TrainerState(
        step=step,
        consumed_micro_batches=run.consumed,
        data=run.stream.state(),
        num_processes=run.world,
        engine=run.engine.name,
        data_fingerprint=run.fingerprint or _fingerprint(run),
        metrics=run.result.history,
        logged_steps=run.logged_steps,
        config=run.cfg.model_dump(mode="json"),
        match_before=match_json(run.result.match_before),
        compiled=run.resolved.compiled,
    )
    extra = hf_model_writer(run) if run.cfg.checkpoint.save_hf_model else None
    path = save_checkpoint(
        run.accelerator,
        run.out,
        step,
        state.to_json(),
        run.scheduler,
        run.cfg.checkpoint.keep_last,
        trainable_only=trainable_only_checkpoints(run),
        extra=extra,
        protect=best.protected(run),
    )
    if run.main:
        run.console.print(f"[dim]checkpoint {path}[/dim]")
    run.callbacks.call("on_save", path)
    return path


def _fingerprint(run: Run) -> str:
    run.fingerprint = data_fingerprint(run.data.units)
    return run.fingerprint
