"""The training loop: one file, top to bottom, from config to saved model.

`run_training` is the recipe, a table of contents of its phases:
  setup_run -> setup_data (train/data.py) -> setup_model_and_optimizer -> resume_or_start
  -> open_run_log -> fit -> finish (from open_run_log on, SIGINT/SIGTERM mean: finish the step, checkpoint, stop).
`setup_run` first claims the output directory (`claim_output_dir`, train/rundir.py): a non-empty one is
refused unless resuming or overwriting, and train.resume=auto on a finished run stops there (nothing to do);
`finish` writes the FINISHED marker last.
`fit` runs the optimizer steps; each is `optimizer_step` (micro-batches, forward/backward, clipping,
NaN policy, AdamW and the LR schedule) then `add_eval_and_log` and, when `checkpoint_due`,
`save_run_checkpoint`.

Follow one optimizer step: `MicroBatchStream` picks example indices -> `pad_collate` (or
`packed_collate`) builds tensors -> the model returns logits -> `summed_nll` (model/loss.py) sums
the token losses -> the sum is divided by the number of target tokens of the WHOLE optimizer step
(all micro-batches, all ranks) and back-propagated (`train_step`) -> gradients are clipped ->
AdamW and the LR schedule step. Over several processes the engine `accelerate launch` chose (DDP,
FSDP2, DeepSpeed ZeRO) wraps the model; what the loop must know of it is in train/distributed.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.integrations.neftune import activate_neftune

from sftlab.config import SFTConfig, dump_config
from sftlab.data.collate import MicroBatchStream
from sftlab.data.locate import check_local_paths
from sftlab.data.types import IGNORE_INDEX, TokenizedExample
from sftlab.model import adapters
from sftlab.model.generate import MatchResult, exact_match, load_match_examples
from sftlab.model.kernels import KernelError, apply_liger
from sftlab.model.loading import DTYPES, load_model
from sftlab.model.loss import TargetLossHead, count_targets, full_nll
from sftlab.model.vocab import resize_for_new_tokens
from sftlab.train import distributed, rundir, tracking
from sftlab.train.checkpoint import (
    COMPLETE,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from sftlab.train.data import RunData, data_report_json, prepare_run_data
from sftlab.train.evaluate import load_model_dir, target_loss
from sftlab.train.metrics import MetricsLog, read_metrics
from sftlab.train.optim import build_optimizer, build_scheduler
from sftlab.train.precision import (
    load_master_weights,
    master_weight_optimizer,
    resolve_mixed_precision,
    seed_master_weights,
    use_bf16_weights,
)
from sftlab.train.report import DATA_REPORT, PLOT, write_report
from sftlab.train.rundir import RunError
from sftlab.train.throughput import FlopCounter, measure_peak_flops

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]  # (model, micro-batch) -> summed NLL


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None = None
    match_before: MatchResult | None = None
    match_after: MatchResult | None = None
    history: list[dict] = field(default_factory=list)
    completed_before: bool = False  # train.resume=auto found the run finished: nothing was trained


def finished_result(out: Path) -> TrainResult:
    """What the finished run in `out` reports (its FINISHED marker and metrics.jsonl)."""
    info = rundir.read_finished(out) or {}
    history = read_metrics(out / "metrics.jsonl")
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    return TrainResult(output_dir=out, steps=info.get("steps", len(history)), final_loss=info.get("final_loss"),
                       eval_loss=evals[-1] if evals else None, history=history, completed_before=True)


def plan_micro_batches(cfg: SFTConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of the run: max_steps wins over num_epochs."""
    accum = cfg.train.grad_accum_steps
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, cfg.train.max_steps * accum
    micro = math.ceil(cfg.train.num_epochs * batches_per_epoch)
    return math.ceil(micro / accum), micro


@torch.no_grad()
def evaluate_loss(model, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                  accelerator: Accelerator, loss_fn: LossFn | None = None) -> float:
    """Mean NLL over the target tokens of `examples` (padded micro-batches, shared over ranks)."""
    lockstep = distributed.sharded(accelerator)  # sharded forwards are collective: same batch count on every rank
    if not lockstep:
        model = accelerator.unwrap_model(model)  # plain forward: ranks may run different numbers of batches
    nll, count = target_loss(model, examples, pad_id, batch_size, loss_fn or full_nll, accelerator.device,
                             accelerator.process_index, accelerator.num_processes, lockstep=lockstep)
    totals = accelerator.reduce(torch.tensor([nll, float(count)], device=accelerator.device), "sum")
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def train_step(model, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator,
               loss_fn: LossFn | None = None) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one optimizer step.

    `loss_fn(model, batch)` gives a micro-batch's summed NLL: `full_nll` (the model's logits) by
    default, or the run's `TargetLossHead` (the same sum without logits for non-target positions).

    Returns (summed NLL over all ranks, global target tokens).
    The loss each micro-batch back-propagates is its NLL sum / global target count, times the
    world size because every engine (DDP, FSDP, DeepSpeed ZeRO) averages gradients over ranks: the
    step's gradient is then exactly the gradient of (sum of all token NLLs of the step) / (all
    target tokens of the step).
    """
    local_targets = sum(count_targets(b["labels"]) for b in batches)
    global_targets = int(accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum"))
    if global_targets == 0:
        return 0.0, 0
    scale = accelerator.num_processes / global_targets
    loss_fn = loss_fn or full_nll
    step_nll = torch.zeros((), dtype=torch.float64)
    deepspeed = distributed.engine_of(accelerator) == distributed.DEEPSPEED
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with contextlib.nullcontext() if sync or deepspeed else accelerator.no_sync(model):
            nll = loss_fn(model, batch)
            distributed.backward(accelerator, model, nll * scale, boundary=sync)
        step_nll += nll.detach().double().cpu()
    total_nll = float(accelerator.reduce(step_nll.to(accelerator.device), "sum"))
    return total_nll, global_targets


class StopRequest:
    """SIGINT/SIGTERM: finish the current optimizer step, checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def data_fingerprint(examples) -> str:
    """Identifies the training units exactly: from their index arrays and the token arrays' checksums
    when they have a `fingerprint()` (memory-mapped data), else by hashing every token."""
    if hasattr(examples, "fingerprint"):
        return examples.fingerprint()
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


# Config keys that may change between a checkpoint and its resumption; everything else must match.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.resume", "train.output_dir", "train.overwrite",
                    "checkpoint.",
                    "match_eval", "data.num_proc", "data.cache", "data.cache_dir", "data.on_bad_record",
                    "data.max_bad_fraction", "train.on_nan", "peft.merge_on_save")


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def check_resume_compatible(saved: dict, cfg: SFTConfig, ckpt: Path) -> None:
    """`saved`: the config tree of a checkpoint (or of a finished run's config.yaml)."""
    old, new = dict(_flatten(saved)), dict(_flatten(cfg.model_dump(mode="json")))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUME_SAFE_KEYS))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise RunError(f"cannot resume from {ckpt}: the config changed in ways that break the run ({details}). "
                       "Only logging, evaluation and checkpoint settings may change; start a new output_dir instead.")


def find_resume_checkpoint(cfg: SFTConfig) -> Path | None:
    spec = cfg.train.resume
    if spec is None:
        return None
    if spec == "auto":
        return latest_checkpoint(Path(cfg.train.output_dir))
    path = Path(spec)
    if (path / COMPLETE).is_file():
        return path
    found = latest_checkpoint(path)  # an output_dir was given
    if found is None:
        raise RunError(f"train.resume: {spec} is not a complete checkpoint nor an output_dir holding one")
    return found


def check_disk_space(out: Path, model, cfg: SFTConfig) -> None:
    if cfg.checkpoint.every_steps is None and not cfg.checkpoint.every_epoch:
        return
    # weights + 2 fp32 Adam moments (+ an fp32 master copy of each bf16 weight)
    need = sum(p.numel() * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0)) for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        raise RunError(f"output_dir {out}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
                       f"{need / 2**20:.0f} MiB; free space or set checkpoint.every_steps/every_epoch off")


@dataclass
class Run:
    """What one run holds; each phase below fills in its part."""

    cfg: SFTConfig
    console: Console
    accelerator: Accelerator
    out: Path
    resume_from: Path | None
    result: TrainResult
    data: RunData | None = None
    match_examples: list = field(default_factory=list)
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    stream: MicroBatchStream | None = None
    total_steps: int = 0
    total_micro: int = 0
    start_step: int = 0
    consumed: int = 0  # micro-batches taken from the stream so far
    fingerprint: str | None = None
    logged_steps: list[int] = field(default_factory=list)  # steps written to metrics.jsonl
    metrics: MetricsLog | None = None
    stop: StopRequest | None = None
    mixed_precision: str = "no"  # what Accelerate runs: no | bf16 | fp16
    loss_fn: LossFn | None = None
    flops: FlopCounter | None = None
    peak_flops: float | None = None
    resume_command: str = ""  # printed when a signal stops the run

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def run_training(cfg: SFTConfig, console: Console | None = None, resume_command: str | None = None) -> TrainResult:
    """The recipe: set up -> data -> model and optimizer -> resume or start -> log -> fit -> finish.

    `resume_command`: the command line that resumes this run, printed when a signal stops it (the CLI
    passes its own argv + train.resume=auto)."""
    run = setup_run(cfg, console or Console(soft_wrap=True), resume_command)
    if run is None:  # train.resume=auto on a finished run: nothing to train
        return finished_result(Path(cfg.train.output_dir))
    setup_data(run)
    setup_model_and_optimizer(run)
    resume_or_start(run)
    with StopRequest() as run.stop:  # from the first output on: SIGINT/SIGTERM = finish the step, checkpoint, stop
        open_run_log(run)
        fit(run)
    finish(run)
    distributed.leave_together(run.accelerator)
    return run.result


# --- phase 1: the run, its output directory and its resume point ------------------------------

def run_device_type() -> str:
    """The device Accelerate will pick (asked before it is built: mixed precision is fixed then)."""
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def claim_output_dir(cfg: SFTConfig, console: Console, accelerator: Accelerator) -> str:
    """May this run write into train.output_dir? Decided on the main process before any data is read and
    shared with the other ranks: "start", "complete" (train.resume=auto on a finished run), or a RunError."""
    state = accelerator.state
    verdict: tuple[str, str] | None = None
    if state.is_main_process:
        try:
            verdict = ("ok", _claim_on_main(cfg, console))
        except RunError as e:
            verdict = ("error", str(e))
    if state.num_processes > 1:
        verdict = broadcast_object_list([verdict])[0]
    if verdict[0] == "error":
        raise RunError(verdict[1])
    return verdict[1]


def _claim_on_main(cfg: SFTConfig, console: Console) -> str:
    out, train = Path(cfg.train.output_dir), cfg.train
    kind = rundir.kind_of(out)
    if kind == "finished" and train.resume == "auto":
        saved = rundir.saved_config(out)
        if saved is not None:
            check_resume_compatible(saved, cfg, out)
        console.print(f"[bold green]complete[/bold green]: {out} holds {rundir.describe_finished(out)}; nothing to "
                      "resume (to train it again: train.overwrite=true without train.resume)", highlight=False)
        return "complete"
    resuming = train.resume is not None and (kind != "foreign" or find_resume_checkpoint(cfg) is not None)
    if kind != "empty" and not resuming:
        if not train.overwrite:
            raise RunError(rundir.refusal(out, kind))
        if kind == "foreign":
            console.print(f"[yellow]output_dir[/yellow] {out} is not empty: writing into it (train.overwrite)",
                          highlight=False)
        else:
            removed = rundir.clear_run(out)
            console.print(f"[yellow]overwriting[/yellow] the previous run in {out} (train.overwrite): removed "
                          f"{', '.join(removed) or 'nothing'}", highlight=False)
    rundir.check_writable(out)
    rundir.unmark(out)  # a resumed run is finished again only when it writes the marker
    return "start"


def setup_run(cfg: SFTConfig, console: Console, resume_command: str | None = None) -> Run | None:
    """Accelerate, mixed precision, the output directory and the resume point; None when
    train.resume=auto finds the run already finished."""
    try:
        mixed, why = resolve_mixed_precision(cfg.train.mixed_precision, run_device_type(), cfg.model.dtype)
    except ValueError as e:
        raise RunError(f"train.mixed_precision: {e}") from None
    # Accelerate keeps one process-wide state: a later run in the same process (tests, notebooks) may
    # choose another mixed precision, so it starts from a clean one (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    out = Path(cfg.train.output_dir)
    trackers = cfg.train.report_to
    try:
        tracking.check_trackers(trackers)
    except tracking.TrackerError as e:
        raise RunError(str(e)) from None
    check_local_paths(cfg.data.train + cfg.data.eval)  # a mistyped data path fails before anything is touched
    # the processes and their engine (nothing is written yet): the output_dir verdict is shared over them
    accelerator = distributed.build_accelerator(
        mixed, cpu=run_device_type() == "cpu", log_with=trackers or None,
        project_dir=str(out / "tensorboard") if "tensorboard" in trackers else None)
    try:
        distributed.check_run_settings(accelerator, cfg)
    except distributed.EngineError as e:
        raise RunError(str(e)) from None
    if claim_output_dir(cfg, console, accelerator) == "complete":
        return None
    tracking.prepare_offline(trackers, out)
    if accelerator.is_main_process:
        compute = {"bf16": "bf16 autocast, matmul weights as bf16 copies of fp32 masters",
                   "fp16": "fp16 autocast with loss scaling"}.get(mixed, cfg.model.dtype)
        masters = "; fp32 master weights in the optimizer" if mixed == "bf16" or cfg.model.dtype == "bfloat16" else ""
        if distributed.sharded(accelerator):  # the engine casts; the weights it shards stay fp32
            compute = f"{mixed} compute by {distributed.engine_of(accelerator)}'s mixed precision" \
                if mixed != "no" else "float32"
            masters = "; fp32 sharded master weights" if mixed != "no" else ""
        console.print(f"[bold]precision[/bold]: {compute} ({why}){masters}; saved as {cfg.model.dtype}",
                      highlight=False)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is not None:
        check_resume_compatible(read_state(resume_from)["config"], cfg, resume_from)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return Run(cfg, console, accelerator, out, resume_from, TrainResult(output_dir=out, steps=0, final_loss=None),
               mixed_precision=mixed, resume_command=resume_command
               or f"sftlab train <config> train.resume=auto train.output_dir={out}")


# --- phase 2: data (fails fast on bad rows, before any weights are loaded) ---------------------

def setup_data(run: Run) -> None:
    """Tokenizer, template, datasets, packing (train/data.py). The main process converts and caches
    first; the other ranks then read its caches."""
    cfg = run.cfg
    with run.accelerator.main_process_first():
        run.data = prepare_run_data(cfg, run.console if run.main else None)
        run.match_examples = load_match_examples(cfg.match_eval) if cfg.match_eval is not None else []
    checkpointing = cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_epoch
    if checkpointing or run.resume_from is not None:
        run.fingerprint = data_fingerprint(run.data.units)


# --- phase 3: model, optimizer, schedule -------------------------------------------------------

def load_run_model(run: Run):
    """The model as it trains: fp32 (or QLoRA-quantized) weights, resized for new tokens, with
    adapters (peft), activation checkpointing and NEFTune as configured."""
    cfg, data = run.cfg, run.data
    quantization = adapters.quantization_config(cfg.peft) if cfg.peft and cfg.peft.quantize else None
    # loaded in fp32 whatever model.dtype says: the fp32 master weights start from the stored values
    model = load_model(cfg.model.model_copy(update={"dtype": "float32"}), data.model_path, quantization)
    if cfg.data.add_chatml_tokens:  # new rows (if any) and the model's eos follow the tokenizer
        resize_for_new_tokens(model, data.tokenizer, data.vocab_before)
    if cfg.peft is not None:
        model, line = adapters.wrap(model, cfg.peft, vocab_grew=len(data.tokenizer) > data.vocab_before)
        if run.main:
            run.console.print(f"[bold]peft[/bold]: {line}", highlight=False)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.train.neftune_alpha is not None:  # transformers' hook: noise in training forwards only
        activate_neftune(model, cfg.train.neftune_alpha)
    return model


def setup_model_and_optimizer(run: Run) -> None:
    cfg, data = run.cfg, run.data
    with distributed.unpartitioned_loading(run.accelerator):
        model = load_run_model(run)
    model.train()
    run.flops = FlopCounter(model)
    originals = []
    quantized = cfg.peft is not None and cfg.peft.quantize is not None
    sharded = distributed.sharded(run.accelerator)  # FSDP/DeepSpeed keep fp32 masters and cast themselves
    if (run.mixed_precision == "bf16" or cfg.model.dtype == "bfloat16") and not quantized and not sharded:
        # bf16 copies of the matmul weights (of every weight: pure bf16 without autocast) do the compute,
        # refreshed from the optimizer's fp32 master weights once per optimizer step (MasterWeightAdamW).
        originals = use_bf16_weights(model, matmul_only=run.mixed_precision == "bf16")
    if not quantized:  # bitsandbytes places quantized weights itself
        model.to(run.accelerator.device)
    with run.accelerator.autocast():  # the head checks itself on the device and in the precision it trains in
        run.loss_fn = build_loss_fn(cfg, model, run.console if run.main else None,
                                    distributed.target_loss_head_supported(run.accelerator))
    if cfg.train.liger:
        try:
            fused = apply_liger(model, run.accelerator.device.type, getattr(run.loss_fn, "softcap", None))
        except KernelError as e:
            raise RunError(str(e)) from None
        if isinstance(run.loss_fn, TargetLossHead):
            run.loss_fn.fused_ce = fused
    run.stream = build_stream(cfg, data.units, run.world)
    run.total_steps, run.total_micro = plan_micro_batches(cfg, run.stream.batches_per_epoch)
    run.result.steps = run.total_steps
    if run.main:
        check_disk_space(run.out, model, cfg)
    optimizer = build_optimizer(model, cfg.optim)  # fp32 master weights for any low-precision parameter
    seed_master_weights(optimizer, originals)
    del originals
    run.scheduler = build_scheduler(optimizer, cfg.optim, run.total_steps)
    if cfg.train.compile:
        model = torch.compile(model)
    distributed.configure_deepspeed(run.accelerator, cfg.train.micro_batch_size, cfg.optim.max_grad_norm)
    run.model, run.optimizer = run.accelerator.prepare(model, optimizer)
    run.peak_flops = cfg.train.peak_flops or measure_peak_flops(
        run.accelerator.device, torch.bfloat16 if run.mixed_precision == "bf16" else next(model.parameters()).dtype)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation recomputation per decoder layer (transformers' API; renamed in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_stream(cfg: SFTConfig, units, world: int) -> MicroBatchStream:
    """Fixed-size micro-batches (micro_batch_size units per rank) or token budgets (micro_batch_tokens)."""
    if cfg.train.micro_batch_tokens is None:
        return MicroBatchStream(len(units), cfg.train.micro_batch_size * world, cfg.train.seed)
    lengths = units.lengths.tolist() if hasattr(units, "lengths") else [len(u.input_ids) for u in units]
    return MicroBatchStream(len(units), 0, cfg.train.seed, lengths=lengths,
                            max_tokens=cfg.train.micro_batch_tokens * world)


def build_loss_fn(cfg: SFTConfig, model, console: Console | None,
                  engine_allows: tuple[bool, str] = (True, "")) -> LossFn:
    """The micro-batch loss: the target-only chunked head, or the model's full logits."""
    if cfg.train.loss_head == "full":
        return full_nll
    if not engine_allows[0]:
        if console is not None:
            console.print(f"[yellow]loss head[/yellow]: full logits ({engine_allows[1]})", highlight=False)
        return full_nll
    head = TargetLossHead.for_model(model, cfg.train.loss_chunk_tokens)
    if head.mode != "target" and console is not None:
        console.print(f"[yellow]loss head[/yellow]: full logits ({head.reason})", highlight=False)
    return head if head.mode == "target" else full_nll


# --- phase 4: continue from a checkpoint, or start (match evaluation before training) ----------

def resume_or_start(run: Run) -> None:
    cfg, main = run.cfg, run.main
    if run.resume_from is not None:
        restore_checkpoint(run)
    elif cfg.match_eval is not None and distributed.sharded(run.accelerator):
        if main:  # generation on one rank would need the other ranks' shards
            run.console.print("[yellow]match_eval[/yellow]: not run before training under a sharded engine "
                              "(FSDP/DeepSpeed); it runs on the saved model after training")
    elif cfg.match_eval is not None and main:
        run.result.match_before = run_match_eval(run.accelerator.unwrap_model(run.model), run, "before")


def open_run_log(run: Run) -> None:
    """metrics.jsonl (rewritten from the checkpoint's records when resuming), config.yaml, run.json."""
    cfg, main = run.cfg, run.main
    run.metrics = MetricsLog(run.out / "metrics.jsonl", run.console, enabled=main)
    if main:
        logged = set(run.logged_steps)
        run.metrics.rewrite([r for r in run.result.history if r["step"] in logged])
        (run.out / "config.yaml").write_text(dump_config(cfg))
        (run.out / "run.json").write_text(json.dumps(run_info(run), indent=1) + "\n")
        (run.out / DATA_REPORT).write_text(json.dumps(data_report_json(run.data), indent=1) + "\n")
        run.console.print(f"[bold]train[/bold]: {run.total_steps} optimizer steps x {cfg.train.grad_accum_steps} "
                          f"micro-batches of {cfg.train.micro_batch_size} (x{run.world} processes, "
                          f"{distributed.engine_of(run.accelerator)}); "
                          f"{run.stream.batches_per_epoch} micro-batches/epoch")
        if run.total_steps < 2:
            run.console.print(f"[bold yellow]warning[/bold yellow]: this run ends after {run.total_steps} optimizer "
                              "step: the saved model has taken a single update (set train.max_steps or "
                              "train.num_epochs for more)", highlight=False)
    tracking.start(run.accelerator, cfg.train.report_to, run.out.name or "sftlab", cfg.model_dump(mode="json"))


def run_info(run: Run) -> dict[str, Any]:
    """What `auto` settings resolved to on this machine (also printed at start)."""
    head = run.loss_fn
    return {"mixed_precision": run.mixed_precision, "weights_dtype": run.cfg.model.dtype,
            "compute_dtype": "bfloat16" if run.mixed_precision == "bf16" else run.cfg.model.dtype,
            "master_weights_fp32": master_weight_optimizer(run.optimizer) is not None,
            "loss_head": getattr(head, "mode", "full"), "loss_head_reason": getattr(head, "reason", ""),
            "device": str(run.accelerator.device), "num_processes": run.world,
            "engine": distributed.engine_of(run.accelerator), "peak_flops": run.peak_flops,
            "total_steps": run.total_steps}


def restore_checkpoint(run: Run) -> None:
    ckpt = run.resume_from
    saved = read_state(ckpt)
    if saved.get("num_processes", 1) != run.world:
        raise RunError(f"cannot resume from {ckpt}: it was written by {saved.get('num_processes', 1)} "
                       f"process(es), this run has {run.world}; the data order, the batch geometry (and the "
                       f"shards of a sharded checkpoint) would change. Launch it with "
                       f"{saved.get('num_processes', 1)} processes, or start a new output_dir")
    saved_engine = saved.get("engine", distributed.DDP if saved.get("num_processes", 1) > 1 else distributed.SINGLE)
    if saved_engine != distributed.engine_of(run.accelerator):
        raise RunError(f"cannot resume from {ckpt}: it was written under {saved_engine}, this run uses "
                       f"{distributed.engine_of(run.accelerator)}; launch it with the same accelerate config")
    state = load_checkpoint(run.accelerator, ckpt, run.scheduler, trainable_only=trainable_only_checkpoints(run))
    if state["data_fingerprint"] != run.fingerprint:
        raise RunError(f"cannot resume from {ckpt}: the training data changed since it was written "
                       "(different tokenized examples); start a new output_dir instead")
    run.start_step, run.consumed = state["step"], state["consumed_micro_batches"]
    run.stream.epoch, run.stream.index = state["data"]["epoch"], state["data"]["index"]
    history = state["metrics"]
    # checkpoints written before `logged_steps` existed carried a per-record "logged" flag
    run.logged_steps = state.get("logged_steps", [r["step"] for r in history if r.get("logged")])
    run.result.history = [{k: v for k, v in r.items() if k != "logged"} for r in history]
    run.result.match_before = _match_from_state(state.get("match_before"))
    if run.main:
        run.console.print(f"[bold]resumed[/bold] from {ckpt} at step {run.start_step}")


# --- phase 5: the optimizer steps --------------------------------------------------------------

def fit(run: Run) -> None:
    """Optimizer steps from the resume point to the end; on SIGINT/SIGTERM: checkpoint, then stop."""
    batches_iter = iter(run.stream)
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=run.console,
                        disable=not run.main or not run.console.is_terminal)
    stop = run.stop
    with progress:
        task = progress.add_task("training", total=run.total_steps, completed=run.start_step)
        for step in range(run.start_step + 1, run.total_steps + 1):
            epoch_before = run.stream.epoch
            record = optimizer_step(run, step, batches_iter)
            add_eval_and_log(run, record)
            progress.advance(task)
            path = None
            if checkpoint_due(run, step, epoch_before, stop):
                path = save_run_checkpoint(run, step)
            _test_hooks(step)
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                if run.main:
                    write_report(run.out, f"interrupted by {name} after step {step} of {run.total_steps}")
                raise Interrupted(f"{name}: stopped after step {step}/{run.total_steps} and saved {path}; "
                                  f"resume with: {run.resume_command}", 128 + stop.signum)


def next_micro_batches(run: Run, batches_iter) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
    """This rank's micro-batches of one optimizer step, on the device, and what they hold: input
    tokens, padded positions, and the sum of squared document lengths (for attention FLOPs)."""
    data, world, rank = run.data, run.world, run.accelerator.process_index
    n_micro = min(run.cfg.train.grad_accum_steps, run.total_micro - run.consumed)
    batches, sizes = [], {"tokens": 0, "padded": 0, "sum_sq_docs": 0}
    for _ in range(n_micro):
        idx = next(batches_iter)[rank::world]
        if idx:
            units = [data.units[i] for i in idx]
            batch = data.collate(units)
            sizes["tokens"] += sum(len(u.input_ids) for u in units)
            sizes["padded"] += batch["input_ids"].numel()
            sizes["sum_sq_docs"] += sum(n * n for u in units for n in getattr(u, "doc_lengths", [len(u.input_ids)]))
        else:  # a short last batch left this rank nothing: run one unit with no targets, so DDP stays in step
            batch = data.collate([data.units[0]])
            batch["labels"].fill_(IGNORE_INDEX)
        batches.append({k: v.to(run.accelerator.device) for k, v in batch.items()})
    run.consumed += n_micro
    return batches, sizes


def optimizer_step(run: Run, step: int, batches_iter) -> dict[str, Any]:
    """One optimizer step with its NaN policy; returns the step's record."""
    cfg = run.cfg
    t0 = time.perf_counter()
    position = run.stream.state()
    batches, sizes = next_micro_batches(run, batches_iter)
    nll, targets = train_step(run.model, batches, run.accelerator, run.loss_fn)
    lr = run.scheduler.get_last_lr()[0]
    deepspeed = distributed.engine_of(run.accelerator) == distributed.DEEPSPEED
    if not targets:  # nothing was back-propagated: no clipping, no update
        grad_norm = 0.0
    elif deepspeed:  # DeepSpeed clips and steps inside its engine (once the loss is known finite), then gives the norm
        grad_norm = distributed.deepspeed_step(run.model) if math.isfinite(nll) else 0.0
    else:
        grad_norm = clip_gradients(run)
    finite = math.isfinite(nll) and math.isfinite(grad_norm)
    if not finite and cfg.train.on_nan == "stop":
        last = latest_checkpoint(run.out)
        raise RunError(f"non-finite {'loss' if not math.isfinite(nll) else 'gradient norm'} at step {step} "
                       f"(epoch {position['epoch']}, micro-batches {position['index']}..{position['index'] + len(batches) - 1} "
                       f"of that epoch's order, seed {position['seed']}); stopped without updating the weights. "
                       + (f"Last good checkpoint: {last}" if last else "No checkpoint was saved yet")
                       + " (train.on_nan=skip_step skips such steps)")
    if targets and finite and not deepspeed:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    record = {"step": step, "epoch": round(run.stream.epoch_progress, 4),
              "loss": nll / targets if targets else float("nan"), "lr": lr, "grad_norm": grad_norm,
              **throughput(run, sizes, targets, elapsed), "target_tokens": targets,
              "step_time_s": round(elapsed, 4)}
    if not finite:
        record["skipped"] = "non-finite loss or gradient"
    return record


def clip_gradients(run: Run) -> float:
    """Clip to optim.max_grad_norm (None: only measure); returns the total norm before clipping.
    With fp32 master weights the norm is taken (and clipped) on the fp32 master gradients."""
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm is not None else float("inf")
    master = master_weight_optimizer(run.optimizer)
    if master is not None and run.mixed_precision != "fp16":
        return float(master.clip_grad_norm_(max_norm))
    return float(run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm))


def throughput(run: Run, sizes: dict[str, int], targets: int, elapsed: float) -> dict[str, float]:
    """tokens/s (input tokens, padding excluded), target tokens/s, padding share and MFU, all ranks."""
    tokens, padded = sizes["tokens"] * run.world, sizes["padded"] * run.world
    flops = run.flops.step_flops(sizes["tokens"], sizes["sum_sq_docs"]) * run.world
    return {"tokens_per_s": tokens / elapsed, "target_tokens_per_s": targets / elapsed,
            "padding": round(1 - tokens / padded, 4) if padded else 0.0,
            "mfu": round(flops / elapsed / (run.peak_flops * run.world), 4)}


# --- phase 5b: evaluation, the step record, checkpoints ----------------------------------------

def add_eval_and_log(run: Run, record: dict[str, Any]) -> None:
    """Validation loss when due (every eval_every steps, and at the last step), then the record is
    kept in the history and, when due, written to metrics.jsonl and the console."""
    cfg, step, last = run.cfg, record["step"], record["step"] == run.total_steps
    eval_due = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
    if run.data.eval and (eval_due or last):
        record["eval_loss"] = evaluate_loss(run.model, run.data.eval, cfg.train.micro_batch_size, run.data.pad_id,
                                            run.accelerator, run.loss_fn)
        if last:
            run.result.eval_loss = record["eval_loss"]
    run.result.history.append(record)
    run.result.final_loss = record["loss"]
    if step % cfg.train.log_every == 0 or last or "eval_loss" in record or "skipped" in record:
        run.logged_steps.append(step)
        run.metrics.write(record)
        run.metrics.show(record, run.total_steps)
        tracking.log(run.accelerator, cfg.train.report_to, record)


def checkpoint_due(run: Run, step: int, epoch_before: int, stop: "StopRequest") -> bool:
    every = run.cfg.checkpoint.every_steps
    return bool(every and step % every == 0) or (run.cfg.checkpoint.every_epoch and run.stream.epoch > epoch_before) \
        or stop.signum is not None


def trainable_only_checkpoints(run: Run) -> bool:
    """Adapters keep only their trainable tensors in a checkpoint; sharded engines save whole shards."""
    return run.cfg.peft is not None and not distributed.sharded(run.accelerator)


def save_run_checkpoint(run: Run, step: int) -> Path:
    state = {"step": step, "consumed_micro_batches": run.consumed, "data": run.stream.state(),
             "num_processes": run.world, "engine": distributed.engine_of(run.accelerator),
             "data_fingerprint": run.fingerprint or data_fingerprint(run.data.units),
             "metrics": run.result.history, "logged_steps": run.logged_steps,
             "match_before": _acc(run.result.match_before), "config": run.cfg.model_dump(mode="json")}
    path = save_checkpoint(run.accelerator, run.out, step, state, run.scheduler, run.cfg.checkpoint.keep_last,
                           trainable_only=trainable_only_checkpoints(run))
    if run.main:
        run.console.print(f"[dim]checkpoint {path}[/dim]")
    return path


# --- phase 6: save the model, match evaluation after training ----------------------------------

def finish(run: Run) -> None:
    run.accelerator.wait_for_everyone()
    # sharded engines: every rank takes part in gathering the whole model; the main process saves it
    gathered = distributed.full_state_dict(run.accelerator, run.model) if distributed.sharded(run.accelerator) else None
    if not run.main:
        return
    unwrapped = run.accelerator.unwrap_model(run.model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile'd
    if run.cfg.peft is not None:
        # the adapter; the model users get is the fp32 base with it merged (loaded back from the saved files)
        unwrapped = save_adapter_run(run, unwrapped, gathered)
    elif gathered is not None:
        dtype = DTYPES[run.cfg.model.dtype]
        save_model(unwrapped, run.data.tokenizer, run.out, run.data.template,
                   state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in gathered.items()})
        run.console.print(f"[bold green]saved[/bold green] model (gathered from the shards) + tokenizer to {run.out}")
        unwrapped = load_model_dir(run.out)[0] if run.cfg.match_eval is not None else None
    else:
        load_master_weights(unwrapped, run.optimizer)  # bf16 compute copies -> fp32 weights, the exact masters
        unwrapped.to(DTYPES[run.cfg.model.dtype])  # saved in the dtype asked for (model.dtype)
        save_model(unwrapped, run.data.tokenizer, run.out, run.data.template)
        run.console.print(f"[bold green]saved[/bold green] model + tokenizer to {run.out}")
    if run.cfg.match_eval is not None:
        run.result.match_after = run_match_eval(unwrapped, run, "after")
        summary = {"before": _acc(run.result.match_before), "after": _acc(run.result.match_after),
                   "samples_after": [list(s) for s in run.result.match_after.samples[:5]]}
        (run.out / "match_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracking.finish(run.accelerator, run.cfg.train.report_to)
    run.console.print(f"[bold]report[/bold]: {write_report(run.out, 'finished')} (+ {PLOT})")
    rundir.mark_finished(run.out, {"steps": run.total_steps, "final_loss": run.result.final_loss,
                                   "eval_loss": run.result.eval_loss})


def save_adapter_run(run: Run, model, gathered: dict | None = None):
    """Save the adapter (fp32 masters of the trainable weights, or their tensors `gathered` from a
    sharded engine) and the tokenizer; with peft.merge_on_save also the merged plain model under
    output_dir/merged (a fresh fp32 base and the saved adapter). Returns that merged model when the
    match evaluation needs it, else None."""
    if gathered is None:
        load_master_weights(model, run.optimizer)  # the adapter is saved from its exact fp32 masters
    if run.data.template is not None:
        run.data.tokenizer.chat_template = run.data.template
    adapters.save_adapter(model, run.out, run.cfg.model, state_dict=gathered)
    run.data.tokenizer.save_pretrained(run.out)
    run.console.print(f"[bold green]saved[/bold green] adapter + tokenizer to {run.out}")
    if not (run.cfg.peft.merge_on_save or run.cfg.match_eval is not None):
        return None
    merged, tokenizer = adapters.load_for_inference(run.out)
    if run.cfg.peft.merge_on_save:
        save_model(merged.to(DTYPES[run.cfg.model.dtype]), tokenizer, run.out / "merged", run.data.template)
        run.console.print(f"[bold green]saved[/bold green] merged model to {run.out / 'merged'}")
    return merged.float()


def _test_hooks(step: int) -> None:
    """SFTLAB_TEST_KILL_AFTER_STEP=k: SIGKILL this process after step k (resume tests kill a real run)."""
    kill_at = os.environ.get("SFTLAB_TEST_KILL_AFTER_STEP")
    if kill_at and int(kill_at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _acc(r: MatchResult | None) -> dict | None:
    return None if r is None else {"correct": r.correct, "total": r.total, "accuracy": r.accuracy}


def _match_from_state(saved: dict | None) -> MatchResult | None:
    return None if saved is None else MatchResult(saved["correct"], saved["total"], [])


def run_match_eval(model, run: Run, when: str) -> MatchResult:
    t0 = time.perf_counter()
    with run.accelerator.autocast():  # in the precision the run trains in (bf16 weights need it)
        res = exact_match(model, run.data.tokenizer, run.match_examples, run.cfg.match_eval, run.data.template)
    run.console.print(f"[bold]exact match {when} training[/bold]: {res.correct}/{res.total} = {res.accuracy:.1%} "
                      f"({time.perf_counter() - t0:.0f}s)")
    for prompt, ref, pred in res.samples[:3]:
        run.console.print(f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False)
    return res


def save_model(model, tokenizer, out: Path, template: str | None, state_dict: dict | None = None) -> None:
    """Save weights (safetensors), config, tokenizer and chat template for plain transformers.
    `state_dict`: the tensors to write instead of the model's own (gathered from a sharded engine)."""
    model.config.use_cache = True  # inference default for whoever loads it
    if template is not None:
        tokenizer.chat_template = template
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)  # None: the model's own
    tokenizer.save_pretrained(out)
    model.config.use_cache = False
