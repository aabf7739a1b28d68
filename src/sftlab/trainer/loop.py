"""The recipe: one run, from config to saved model, one optimizer step at a time.

A run is three records (`Recipe`), each owned by one module: what it fixed before training
(`Resolved`, trainer/resolved.py: frozen), what it trains with (`Components`, trainer/components.py),
and where it is (`Progress`, trainer/checkpoint.py: the counters its checkpoints record).

`Recipe.setup` builds them, each part after what it needs:
  start_run (trainer/start.py: model settings, mixed precision, Accelerate and its engine, the output
  directory, the resume point) -> the data (`load_data`: trainer/data.py prepare_run_data, the main
  process first; bad rows fail before any weights load) -> the checkpoint's processes, engine and data
  checked (trainer/resume.py) -> build_components (trainer/setup.py: the model, the objective's loss
  function, the stream, the optimizer and schedule, compilation, the engine's wrapping, the callbacks).
`Recipe.train` then resumes or starts (trainer/resume.py), opens the run log (trainer/outputs.py), runs
`fit` and finishes (the model saved: trainer/outputs.py; with train.push_to_hub the upload,
trainer/hub.py, once the other processes have left). From the run log on, SIGINT/SIGTERM mean: finish
the step, checkpoint, stop (trainer/control.py), and a callback returning True means the same
(trainer/callbacks.py).

One optimizer step (`Recipe.optimizer_step`): `next_micro_batches` takes this rank's share of the
stream's next micro-batches (`MicroBatchStream` picks example indices, the data's collate --
`pad_collate` or `packed_collate` -- builds tensors) -> `step_normaliser`: the objective's normaliser
over the WHOLE step (all micro-batches, all ranks; supervised fine-tuning: the target tokens) ->
`train_step`: each micro-batch's loss sum from the objective (trainer/objective.py -> model/loss.py:
the summed target-token NLL, by the target-only head) divided by it and back-propagated by the run's
`Engine` (trainer/distributed.py: whatever differs between DDP, FSDP2 and DeepSpeed ZeRO) -> gradients
clipped -> the optimizer and the LR schedule step. Then `log_step` (evaluation when due, the history,
metrics.jsonl), the checkpoint when due (`Recipe.checkpoint`) and the callbacks' `on_step_end`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as ProgressBar,
)

from sftlab.config.schema import CheckpointConfig, SFTConfig
from sftlab.data.packing import pack_examples, packed_collate
from sftlab.data.types import IGNORE_INDEX
from sftlab.trainer import allocator, best, compiling, distributed, hub, sequence_parallel, testing
from sftlab.trainer.callbacks import CallbackList
from sftlab.trainer.checkpoint import Progress, TrainerState, latest_checkpoint, save_checkpoint
from sftlab.trainer.components import Components
from sftlab.trainer.control import Interrupted, StopRequest
from sftlab.trainer.data import RunData, prepare_run_data
from sftlab.trainer.evaluate import eval_predictions, metrics_of, sample_replies, target_loss
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.master_weights import master_weight_optimizer
from sftlab.trainer.objective import Objective, SFTObjective
from sftlab.trainer.outputs import (
    finish,
    finished_result,
    hf_model_writer,
    load_match_eval,
    match_json,
    open_run_log,
    run_match_eval,
    save_model,
)
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.resume import (
    check_resume_state,
    data_fingerprint,
    planned_fingerprint,
    restore_checkpoint,
    trainable_only_checkpoints,
)
from sftlab.trainer.run import TrainResult
from sftlab.trainer.rundir import RunError
from sftlab.trainer.setup import build_components
from sftlab.trainer.start import start_run
from sftlab.trainer.throughput import FlopCounter

__all__ = [
    "Interrupted",
    "Recipe",
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
    """The recipe: set up (start -> data -> components), then train (resume or start -> log -> fit -> finish).

    `resume_command`: the command line that resumes this run, printed when a signal stops it (the CLI
    passes its own argv + train.resume=auto). `inputs`: what the Python API passes (sftlab/api.py)."""
    recipe = Recipe.setup(cfg, console or Console(soft_wrap=True), resume_command, inputs)
    if recipe is None:  # train.resume=auto on a finished run: nothing to train
        return finished_result(Path(cfg.train.output_dir))
    return recipe.train()


@dataclass
class Recipe:
    """One run: three records, each owned by one module."""

    resolved: Resolved  # fixed before training: config, output dir, resume point, world, decisions (frozen)
    parts: Components  # what trains: engine, model, optimizer, scheduler, stream, objective, data, callbacks
    progress: Progress  # where the run is: step, consumed micro-batches, logged steps (as checkpointed)

    @classmethod
    def setup(
        cls,
        cfg: SFTConfig,
        console: Console,
        resume_command: str | None = None,
        inputs: RunInputs | None = None,
    ) -> Recipe | None:
        """The run's records, each part after what it needs; None when train.resume=auto finds the run
        already finished."""
        # 1. model settings, mixed precision, Accelerate and its engine, the output directory, the resume
        #    point, the seed: nothing is read before the output directory is claimed (trainer/start.py)
        started = start_run(cfg, console, resume_command, inputs)
        if started is None:
            return None
        resolved, engine = started
        # 2. the data, before any weights load: bad rows and settings fail fast (trainer/data.py)
        data, match_examples = load_data(resolved, engine.accelerator, console)
        best.check_metric(resolved.cfg.train, data)
        fingerprint = planned_fingerprint(resolved.cfg, resolved.resume_from is not None, data.units)
        if resolved.world_size > 1:  # every rank trains on the same units, or the run stops here
            agreed = {"data fingerprint": fingerprint or data_fingerprint(data.units)}
            try:
                distributed.check_ranks_agree(engine.accelerator, agreed)
            except distributed.RankMismatch as e:
                raise RunError(str(e)) from None
        resolved = dataclasses.replace(resolved, data_fingerprint=fingerprint)
        check_resume_state(resolved)  # the checkpoint's processes, engine and data, before any weights load
        # 3. the model and what trains it, each built by its own module (trainer/setup.py)
        parts, resolved = build_components(resolved, engine, console, data, match_examples)
        return cls(resolved, parts, Progress())

    def train(self) -> TrainResult:
        """Resume or start -> log -> fit -> finish; the result (`stopped` set when a callback stopped it)."""
        r, p = self.resolved, self.parts
        self.resume_or_start()
        # from here on, SIGINT/SIGTERM = finish the step, checkpoint, stop
        with StopRequest(announce=r.main) as stop:
            p.metrics = open_run_log(r, p, self.progress.logged_steps)
            if r.cfg.train.eval_on_start and self.progress.step == 0 and len(p.data.eval):
                self.log_step({"step": 0, "epoch": 0.0}, evaluate=True)
            self.fit(stop)
        allocator.release_free_memory()  # the steps' freed pages, before saving allocates more
        if p.result.stopped is None:
            best.restore_best(r, p)
            finish(r, p)
        elif r.main:
            p.callbacks.call("on_train_end", p.result)
        push = r.main and p.result.stopped is None and r.cfg.train.push_to_hub
        p.engine.leave_together()
        if push:  # after the other ranks have left: an upload of any length never holds them in a collective
            hub.push_after_training(r.cfg.train, r.output_dir, p.result, p.console)
        return p.result

    def resume_or_start(self) -> None:
        """The checkpoint's state when resuming; else the match evaluation before training, when set."""
        r, p = self.resolved, self.parts
        if r.resume_from is not None:
            self.progress = restore_checkpoint(r, p)
        elif r.cfg.match_eval is not None and p.engine.sharded:
            if r.main:  # generation on one rank would need the other ranks' shards
                p.console.print(
                    "[yellow]match_eval[/yellow]: not run before training under a sharded engine "
                    "(FSDP/DeepSpeed); it runs on the saved model after training"
                )
        elif r.cfg.match_eval is not None and r.main:
            p.result.match_before = run_match_eval(p.engine.unwrap(p.model), p, r.cfg.match_eval, "before")

    # --- the optimizer steps -------------------------------------------------------------------

    def fit(self, stop: StopRequest) -> None:
        """Optimizer steps from the resume point to the end; on SIGINT/SIGTERM or a callback's request:
        checkpoint, then stop."""
        r, p, total = self.resolved, self.parts, self.resolved.total_steps
        batches_iter = iter(p.stream)
        with progress_bar(p.console, r.main) as bar:
            task = bar.add_task("training", total=total, completed=self.progress.step)
            for step in range(self.progress.step + 1, total + 1):
                epoch_before = p.stream.epoch
                p.callbacks.step = step
                record = self.optimizer_step(step, batches_iter)
                self.progress.step = step
                self.log_step(record, evaluate=self.eval_due(step, p.stream.epoch > epoch_before))
                bar.advance(task)
                due = checkpoint_due(r.cfg.checkpoint, step, p.stream.epoch > epoch_before, stop)
                path = self.checkpoint() if due or best.due(r.cfg.train, record, total) else None
                asked, save_asked = callbacks_ask_stop(p.callbacks, record, r.world_size)
                if (asked or save_asked or stop.signum is not None) and path is None:  # a signal in them too
                    path = self.checkpoint()
                if stop.signum is not None:
                    raise self.interrupted(stop.signum, step, path)
                if asked:
                    p.result.stopped = p.callbacks.stop_reason or f"a callback on another rank at step {step}"
                    if r.main:
                        p.console.print(
                            f"[bold yellow]stopped[/bold yellow] by {p.result.stopped}; saved {path}; "
                            f"resume with: {r.resume_command}",
                            highlight=False,
                        )
                    return

    def optimizer_step(self, step: int, batches_iter) -> dict[str, Any]:
        """One optimizer step with its NaN policy; returns the step's record."""
        r, p = self.resolved, self.parts
        t0 = time.perf_counter()
        position = p.stream.state()
        n_micro = min(r.grad_accum_steps, p.stream.left_in_epoch)  # a step never spans two epochs
        batches, sizes = next_micro_batches(
            p.data, p.objective, batches_iter, n_micro, p.accelerator, rows=r.micro_batch_size or 0
        )
        self.progress.consumed_micro_batches += n_micro
        normaliser = step_normaliser(p.objective, batches, p.accelerator)
        loss_sum = train_step(p.model, p.objective, p.engine, batches, normaliser) if normaliser else 0.0
        lr = p.scheduler.get_last_lr()[0]
        # nothing back-propagated (no targets anywhere): no clipping, no update
        grad_norm = self.gradient_norm(math.isfinite(loss_sum)) if normaliser else 0.0
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if not finite and r.cfg.train.on_nan == "stop":
            raise non_finite(r.output_dir, step, position, len(batches), math.isfinite(loss_sum))
        if normaliser and finite:
            p.engine.optimizer_step(p.optimizer)
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        losses = p.objective.record(loss_sum, normaliser)
        if isinstance(p.objective, SFTObjective) and "target_tokens" not in losses:  # another normalisation
            losses["target_tokens"] = int(p.accelerator.reduce(torch.tensor(sizes["targets"]), "sum"))
        targets = losses.get("target_tokens", normaliser)
        record = {
            "step": step,
            "epoch": round(p.stream.epoch_progress, 4),
            "loss": losses.pop("loss"),
            "lr": lr,
            "grad_norm": grad_norm,
            **throughput(p.flops, sizes, targets, elapsed, r.world_size, r.peak_flops),
            **losses,
            "step_time_s": round(elapsed, 4),
        }
        if not finite:
            record["skipped"] = "non-finite loss or gradient"
        return record

    def gradient_norm(self, loss_finite: bool) -> float:
        """The gradient norm before clipping: clipped here, or (DeepSpeed) clipped and stepped inside the
        engine once the loss is known finite."""
        r, p = self.resolved, self.parts
        max_norm = r.cfg.optim.max_grad_norm

        def clip() -> float:
            return clip_gradients(p.model, p.optimizer, p.accelerator, max_norm, r.mixed_precision)

        return p.engine.step_gradients(p.model, loss_finite, clip)

    # --- the step record, checkpoints ------------------------------------------------------------

    def eval_due(self, step: int, epoch_ended: bool) -> bool:
        """Validation after this step: every eval_every steps (or at each epoch's end), and at the last."""
        every = self.resolved.cfg.train.eval_every
        due = epoch_ended if every == "epoch" else bool(every) and step % every == 0
        return due or step == self.resolved.total_steps

    def log_step(self, record: dict[str, Any], evaluate: bool = False) -> None:
        """Validation when `evaluate` (and eval data exist), samples when due, then the record is kept in the
        history and, when due (the first step, every log_every, the last, an evaluation), written to
        metrics.jsonl, the console and the callbacks' on_log. Step 0 (train.eval_on_start) has no loss."""
        r, p = self.resolved, self.parts
        train, step, last = r.cfg.train, record["step"], record["step"] == r.total_steps
        if evaluate and len(p.data.eval):
            with compiling.eager():  # other shapes than training's: a compiled block runs its eager code
                metrics = run_evaluation(p.model, p.data, evaluation_objective(p.objective), p.engine, r.cfg)
                if r.inputs.compute_metrics is not None:
                    metrics.update(custom_metrics(p.model, p.data, p.engine, r.cfg, r.inputs))
            record.update(metrics)
            p.result.eval_loss = metrics.get("eval_loss")
            p.result.eval_losses = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            p.callbacks.call("on_evaluate", {"step": step, **metrics})
        every = train.sample_every
        if (every == "eval" and "eval_loss" in record) or (
            isinstance(every, int) and step and step % every == 0
        ):
            record["samples"] = self.samples()
        p.result.history.append(record)
        p.result.final_loss = record.get("loss", p.result.final_loss)
        first = step == r.start_step + 1
        if step % train.log_every == 0 or first or last or "eval_loss" in record or "skipped" in record:
            self.progress.logged_steps.append(step)
            p.metrics.write(record)
            p.metrics.show(record, r.total_steps)
            p.callbacks.call("on_log", record)

    def samples(self) -> list[dict[str, str]]:
        """Replies to the first eval prompts (train.sample_every), generated on the main process (every rank
        waits: the model is one it can run alone, else none under a sharded engine)."""
        r, p = self.resolved, self.parts
        train, samples = r.cfg.train, []
        if p.engine.sharded:
            return [
                {"note": "no samples under a sharded engine (FSDP/DeepSpeed): generate from the saved model"}
            ]
        if r.main and len(p.data.eval):
            with p.accelerator.autocast(), compiling.eager():
                samples = sample_replies(
                    p.engine.unwrap(p.model),
                    p.data.eval,
                    p.data.tokenizer,
                    train.sample_prompts,
                    train.sample_max_new_tokens,
                )
            for s in samples:
                p.console.print(f"  sample: {s['prompt'][-60:]!r} -> {s['reply'][:80]!r}", highlight=False)
        p.accelerator.wait_for_everyone()
        return samples

    def checkpoint(self) -> Path:
        """A checkpoint of this step: weights, optimizer, scheduler, RNG and the `TrainerState`; `on_save`."""
        r, p, step = self.resolved, self.parts, self.progress.step
        state = TrainerState(
            step=step,
            consumed_micro_batches=self.progress.consumed_micro_batches,
            data=p.stream.state(),
            num_processes=r.world_size,
            engine=r.engine,
            data_fingerprint=r.data_fingerprint or data_fingerprint(p.data.units),
            metrics=p.result.history,
            logged_steps=self.progress.logged_steps,
            config=r.cfg.model_dump(mode="json"),
            match_before=match_json(p.result.match_before),
            compiled=r.compiled,
        )
        path = save_checkpoint(
            p.accelerator,
            r.output_dir,
            step,
            state.to_json(),
            p.scheduler,
            r.cfg.checkpoint.keep_last,
            trainable_only=trainable_only_checkpoints(p.engine, r.cfg),
            extra=hf_model_writer(r.cfg, p) if r.cfg.checkpoint.save_hf_model else None,
            protect=best.protected(r.cfg.train, p.result.history),
        )
        if r.main:
            p.console.print(f"[dim]checkpoint {path}[/dim]")
        p.callbacks.call("on_save", path)
        return path

    def interrupted(self, signum: int, step: int, path: Path) -> Interrupted:
        """The error a signal ends the run with (after its checkpoint); the report says how it ended."""
        r, p, name = self.resolved, self.parts, signal.Signals(signum).name
        if r.main:
            for cb in p.callbacks.callbacks:
                if hasattr(cb, "interrupted"):  # the report says how the run ended
                    cb.interrupted(f"interrupted by {name} after step {step} of {r.total_steps}")
        return Interrupted(
            f"{name}: stopped after step {step}/{r.total_steps} and saved {path}; "
            f"resume with: {r.resume_command}",
            128 + signum,
        )


# --- the data phase ----------------------------------------------------------------------------


def load_data(resolved: Resolved, accelerator: Accelerator, console: Console) -> tuple[RunData, list]:
    """Tokenizer, template, datasets, packing (trainer/data.py) and the match evaluation's examples. Each
    node's first process converts and caches first; the node's other ranks wait for it outside any
    collective (trainer/distributed.py: `first_on_each_node`), so a first preparation longer than
    train.dist_timeout never aborts the run; then they read its caches."""
    cfg = resolved.cfg

    def prepare() -> tuple[RunData, list]:
        data = prepare_run_data(cfg, console if resolved.main else None, resolved.inputs, resolved.model_path)
        return data, load_match_eval(cfg, data)

    return distributed.first_on_each_node(accelerator, prepare)


# --- one optimizer step ------------------------------------------------------------------------


def next_micro_batches(
    data: RunData, objective: Objective, batches_iter, n_micro: int, accelerator: Accelerator, rows: int = 0
) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
    """This rank's share of the stream's next `n_micro` micro-batches, on the device, and what they hold:
    input tokens, padded positions, and the sum of squared document lengths (for attention FLOPs). Under
    sequence parallelism the share is its data-parallel rank's, and this rank keeps its shard of it
    (trainer/sequence_parallel.py; `rows`: micro_batch_size, what a shard is padded to), its sizes 1/N."""
    rank, world = sequence_parallel.data_position(accelerator)
    batches, sizes = [], {"tokens": 0, "padded": 0, "sum_sq_docs": 0, "targets": 0}
    drawn = [next(batches_iter) for _ in range(n_micro)]  # the step's units over all processes
    testing.record_step_units(drawn, accelerator.is_main_process)
    for step_batch in drawn:
        idx = step_batch[rank::world]
        if idx:
            units = [data.units[i] for i in idx]
            batch = data.collate(units)
            sizes["tokens"] += sum(len(u.input_ids) for u in units)
            sizes["padded"] += batch["input_ids"].numel()
            sizes["targets"] += (
                int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0
            )
            sizes["sum_sq_docs"] += sum(
                n * n for u in units for n in getattr(u, "doc_lengths", [len(u.input_ids)])
            )
        else:  # a short last batch left this rank nothing: run one unit that contributes nothing, so DDP stays in step
            batch = objective.filler(data.collate([data.units[0]]))
        batch = sequence_parallel.shard(batch, accelerator, rows)
        batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
    if (n := sequence_parallel.size(accelerator)) > 1:
        sizes = {k: v // n for k, v in sizes.items()}
    return batches, sizes


def step_normaliser(
    objective: Objective, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator
) -> int:
    """The objective's normaliser of the whole optimizer step: over its micro-batches and all ranks (SFT:
    the step's target tokens)."""
    local = sum(objective.normaliser(b) for b in batches)
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))


def train_step(
    model,
    objective: Objective,
    engine: distributed.Engine,
    batches: list[dict[str, torch.Tensor]],
    normaliser: int,
) -> float:
    """Forward/backward over the micro-batches of one optimizer step; returns the loss sum over all ranks.

    The loss each micro-batch back-propagates is its loss sum (the objective's: trainer/objective.py) /
    the step's global `normaliser` (`step_normaliser`, not 0), times the world size because every engine
    (DDP, FSDP, DeepSpeed ZeRO) averages gradients over ranks: the step's gradient is then exactly the
    gradient of (sum of all the step's losses) / (its whole normaliser). Under sequence parallelism the
    engine divides by the data-parallel world instead (`sequence_parallel.gradient_world`).
    """
    accelerator = engine.accelerator
    scale = sequence_parallel.gradient_world(accelerator) / normaliser
    step_sum = torch.zeros((), dtype=torch.float64)
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with engine.accumulating(model, sync):
            with accelerator.autocast():  # the loss head runs outside the model's forward: as in evaluation
                loss_sum = objective.loss_sum(model, batch)
            engine.backward(model, loss_sum * scale, boundary=sync)
        step_sum += loss_sum.detach().double().cpu()
    return float(accelerator.reduce(step_sum.to(accelerator.device), "sum"))


def clip_gradients(
    model, optimizer, accelerator: Accelerator, max_grad_norm: float | None, mixed_precision: str
) -> float:
    """Clip to optim.max_grad_norm (None: only measure); returns the total norm before clipping.
    With fp32 master weights the norm is taken (and clipped) on the fp32 master gradients."""
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    master = master_weight_optimizer(optimizer)
    if master is not None and mixed_precision != "fp16":
        return float(master.clip_grad_norm_(max_norm))
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def non_finite(out: Path, step: int, position: dict[str, int], n_batches: int, loss_finite: bool) -> RunError:
    last = latest_checkpoint(out)
    return RunError(
        f"non-finite {'gradient norm' if loss_finite else 'loss'} at step {step} "
        f"(epoch {position['epoch']}, micro-batches {position['index']}..{position['index'] + n_batches - 1} "
        f"of that epoch's order, seed {position['seed']}); stopped without updating the weights. "
        + (f"Last good checkpoint: {last}" if last else "No checkpoint was saved yet")
        + " (train.on_nan=skip_step skips such steps)"
    )


def throughput(
    flops: FlopCounter, sizes: dict[str, int], targets: int, elapsed: float, world: int, peak_flops: float
) -> dict[str, float]:
    """tokens/s (input tokens, padding excluded), target tokens/s, padding share and MFU, all ranks."""
    tokens, padded = sizes["tokens"] * world, sizes["padded"] * world
    step_flops = flops.step_flops(sizes["tokens"], sizes["sum_sq_docs"], sizes.get("targets")) * world
    return {
        "tokens_per_s": tokens / elapsed,
        "target_tokens_per_s": targets / elapsed,
        "padding": round(1 - tokens / padded, 4) if padded else 0.0,
        # 4 significant digits, not 4 decimals: a small model on a fast-bf16 peak is below 5e-5, not 0
        "mfu": float(f"{step_flops / elapsed / (peak_flops * world):.4g}"),
        "model_gflops_per_s": float(f"{step_flops / elapsed / 1e9:.4g}"),  # all processes
    }


def progress_bar(console: Console, main: bool) -> ProgressBar:
    return ProgressBar(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not main or not console.is_terminal,
    )


# --- evaluation, the checkpoint and stop decisions ---------------------------------------------


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
    """The objective's eval record over `examples` (padded micro-batches of `batch_size` per rank, shared
    over ranks): {"eval_loss": mean NLL over their target tokens} for SFT. `engine`: the run's (default:
    `Engine.of`)."""
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


def evaluation_objective(objective: Objective) -> Objective:
    """What evaluation computes: the objective's own evaluation form where it has one (SFT: the token mean,
    whatever the training normalisation), else the objective itself."""
    evaluation = getattr(objective, "evaluation", None)
    return evaluation() if callable(evaluation) else objective


def run_evaluation(
    model, data: RunData, objective: Objective, engine: distributed.Engine, cfg: SFTConfig
) -> dict[str, float]:
    """Validation over all eval examples (`eval_loss`), and over each named eval set (`eval/<name>_loss`)."""
    micro_batch_size, cap = cfg.train.micro_batch_size, cfg.train.eval_max_batches
    collate, rows = data.eval_collate, lambda examples: examples
    if (
        cfg.data.eval_packing and collate is None
    ):  # best-fit rows, never wrapped: a cut document would change its loss
        collate = functools.partial(packed_collate, pad_id=data.pad_id)
        rows = lambda examples: pack_examples(examples, "bfd", cfg.data.max_seq_length)  # noqa: E731
    sets = {"eval_": data.eval, **{f"eval/{name}_": examples for name, examples in data.eval_sets.items()}}
    metrics: dict[str, float] = {}
    for prefix, examples in sets.items():
        metrics.update(
            evaluate_loss(
                model,
                rows(examples),
                micro_batch_size,
                data.pad_id,
                engine.accelerator,
                objective,
                prefix=prefix,
                collate=collate,
                max_batches=cap,
                engine=engine,
            )
        )
    return metrics


def custom_metrics(
    model, data: RunData, engine: distributed.Engine, cfg: SFTConfig, inputs: RunInputs
) -> dict:
    """The Python API's `compute_metrics` over all eval examples (`eval_<name>`) and each named eval set
    (`eval/<set>_<name>`), on the main process; the other ranks take part in the forwards."""
    sets = {"eval_": data.eval, **{f"eval/{name}_": examples for name, examples in data.eval_sets.items()}}
    metrics: dict[str, float] = {}
    for prefix, examples in sets.items():
        found = eval_predictions(
            model,
            examples,
            data.pad_id,
            cfg.train.micro_batch_size,
            engine.accelerator,
            inputs.preprocess_logits,
            data.eval_collate,
        )
        if found is not None:
            metrics.update(metrics_of(inputs.compute_metrics, *found, prefix))
    return metrics


def checkpoint_due(checkpoint: CheckpointConfig, step: int, epoch_ended: bool, stop: StopRequest) -> bool:
    every = checkpoint.every_steps
    return (
        bool(every and step % every == 0)
        or (checkpoint.every_epoch and epoch_ended)
        or stop.signum is not None
    )


def callbacks_ask_stop(callbacks: CallbackList, record: dict[str, Any], world: int) -> tuple[bool, bool]:
    """on_step_end on this rank's callbacks: (stop, save) -- whether a hook asked to stop, and whether one of
    this step asked for a checkpoint ("save"); the main process's answers hold for every rank."""
    asked = callbacks.call("on_step_end", record)
    save = callbacks.take_save_request()
    if world > 1:
        asked, save = broadcast_object_list([asked, save])
    return bool(asked), bool(save)
