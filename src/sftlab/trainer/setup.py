"""Setting a run up, phase by phase: the run and its output directory, the data, the model and optimizer.

`setup_run` builds Accelerate (with the mixed precision resolved for the device), claims
`train.output_dir` (`claim_output_dir`: a non-empty one is refused unless resuming or overwriting;
train.resume=auto on a finished run stops there) and finds the resume point. `setup_data` prepares
the data (trainer/data.py) on the main process first, the other ranks then reading its caches.
`setup_model_and_optimizer` rebuilds the model (trainer/run_model.py), puts it on the device, picks
the loss head, plans the micro-batches and builds the optimizer (fp32 masters), the LR schedule and
the engine's wrapping.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from rich.console import Console

from sftlab.compat import accelerate as accelerate_compat
from sftlab.config.schema import SFTConfig
from sftlab.data.collate import MicroBatchStream
from sftlab.data.locate import check_local_paths
from sftlab.model import adapters, attention
from sftlab.model.generate import load_match_examples
from sftlab.model.kernels import KernelError, apply_liger
from sftlab.model.loading import DTYPES, resolve_model_path, stored_dtype
from sftlab.model.loss import TargetLossHead, full_nll
from sftlab.trainer import compiling, distributed, hub, rundir, tracking
from sftlab.trainer.callbacks import CallbackList, ReportCallback, TrackerCallback
from sftlab.trainer.checkpoint import read_state
from sftlab.trainer.data import prepare_run_data
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.master_weights import seed_master_weights
from sftlab.trainer.objective import LossFn, SFTObjective
from sftlab.trainer.optim import build_optimizer, build_scheduler
from sftlab.trainer.precision import bf16_weight_form, resolve_mixed_precision
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.resume import check_resume_compatible, data_fingerprint, find_resume_checkpoint
from sftlab.trainer.run import Run, TrainResult
from sftlab.trainer.run_model import build_run_model
from sftlab.trainer.rundir import RunError
from sftlab.trainer.testing import env_callbacks
from sftlab.trainer.throughput import FlopCounter, measure_peak_flops


def run_device_type() -> str:
    """The device Accelerate will pick (asked before it is built: mixed precision is fixed then)."""
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


# --- the run, its output directory and its resume point ---------------------------------------


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
        console.print(
            f"[bold green]complete[/bold green]: {out} holds {rundir.describe_finished(out)}; nothing to "
            "resume (to train it again: train.overwrite=true without train.resume)",
            highlight=False,
        )
        return "complete"
    resuming = train.resume is not None and (kind != "foreign" or find_resume_checkpoint(cfg) is not None)
    if kind != "empty" and not resuming:
        if not train.overwrite:
            raise RunError(rundir.refusal(out, kind))
        if kind == "foreign":
            console.print(
                f"[yellow]output_dir[/yellow] {out} is not empty: writing into it (train.overwrite)",
                highlight=False,
            )
        else:
            removed = rundir.clear_run(out)
            console.print(
                f"[yellow]overwriting[/yellow] the previous run in {out} (train.overwrite): removed "
                f"{', '.join(removed) or 'nothing'}",
                highlight=False,
            )
    rundir.check_writable(out)
    rundir.unmark(out)  # a resumed run is finished again only when it writes the marker
    return "start"


def print_precision(
    cfg: SFTConfig, console: Console, engine: distributed.Engine, mixed: str, why: str
) -> None:
    quantized = cfg.peft is not None and cfg.peft.quantize is not None
    form, form_why = bf16_weight_form(mixed, cfg.model.dtype, cfg.optim.name, quantized)
    compute = {
        "matmul": "bf16 autocast, matmul weights as bf16 copies of fp32 masters",
        "all": "bf16 weights (copies of fp32 masters), no autocast",
    }.get(form)
    if compute is None:
        compute = {
            "bf16": "bf16 autocast"
            + (" on a quantized base" if quantized else f" on fp32 weights ({form_why})"),
            "fp16": "fp16 autocast with loss scaling",
        }.get(mixed, compute_dtype(cfg.model.dtype, mixed))
    masters = "; fp32 master weights in the optimizer" if form != "none" else ""
    engine_casts = engine.precision(mixed)  # an engine that casts the weights itself (they stay fp32)
    if engine_casts is not None:
        compute, masters = engine_casts
    console.print(
        f"[bold]precision[/bold]: {compute} ({why}){masters}; saved as {cfg.model.dtype}", highlight=False
    )


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


def check_before_start(cfg: SFTConfig) -> None:
    """What fails fast, before anything is touched: trackers, local data paths, Hub access for push_to_hub."""
    try:
        tracking.check_trackers(cfg.train.report_to)
    except tracking.TrackerError as e:
        raise RunError(str(e)) from None
    check_local_paths(cfg.data.train + cfg.data.eval)  # a mistyped data path fails before anything is touched
    if cfg.train.push_to_hub:  # no token or no Hub: one error now, not after training
        hub.check_access(cfg.train.hub_model_id)


def setup_run(
    cfg: SFTConfig, console: Console, resume_command: str | None = None, inputs: RunInputs | None = None
) -> Run | None:
    """Accelerate, mixed precision, the output directory and the resume point; None when
    train.resume=auto finds the run already finished."""
    inputs = inputs or RunInputs()
    cfg, model_path = with_resolved_dtype(with_continued_adapter(cfg, inputs), inputs, console)
    mixed, why = run_precision(cfg)
    # Accelerate keeps one process-wide state: a later run in the same process (tests, notebooks) may
    # choose another mixed precision, so it starts from a clean one (the process group is kept).
    accelerate_compat.reset_state(reset_partial_state=False)
    out, trackers = Path(cfg.train.output_dir), cfg.train.report_to
    check_before_start(cfg)
    # the processes and their engine (nothing is written yet): the output_dir verdict is shared over them
    accelerator = distributed.build_accelerator(
        mixed,
        cpu=run_device_type() == "cpu",
        log_with=trackers or None,
        project_dir=str(out / "tensorboard") if "tensorboard" in trackers else None,
    )
    engine = distributed.Engine.of(accelerator)
    try:
        engine.check_run_settings(cfg)
    except distributed.EngineError as e:
        raise RunError(str(e)) from None
    if claim_output_dir(cfg, console, accelerator) == "complete":
        return None
    tracking.prepare_offline(trackers, out)
    if accelerator.is_main_process:
        print_precision(cfg, console, engine, mixed, why)
    resume_from = find_resume_checkpoint(cfg)
    resume_state = read_state(resume_from) if resume_from is not None else None
    if resume_state is not None:
        check_resume_compatible(resume_state.config, cfg, resume_from)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return Run(
        cfg,
        console,
        accelerator,
        out,
        resume_from,
        TrainResult(output_dir=out, steps=0, final_loss=None),
        inputs=inputs,
        objective=inputs.objective or SFTObjective(),
        callbacks=run_callbacks(cfg, inputs, accelerator, out),
        model_path=model_path,
        resume_state=resume_state,
        engine=engine,
        resolved=Resolved(mixed, why, engine.name, accelerator.num_processes),
        resume_command=resume_command or f"sftlab train <config> train.resume=auto train.output_dir={out}",
    )


def with_continued_adapter(cfg: SFTConfig, inputs: RunInputs) -> SFTConfig:
    """A run that continues an adapter (a PeftModel object, or model.name_or_path an adapter directory)
    records that adapter's settings as its peft section when none is configured."""
    peft = adapters.continued_settings(cfg.model, cfg.peft, inputs.model)
    return cfg if peft is cfg.peft else cfg.model_copy(update={"peft": peft})


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


def with_resolved_dtype(cfg: SFTConfig, inputs: RunInputs, console: Console) -> tuple[SFTConfig, str | None]:
    """`model.dtype: auto` becomes the dtype the weights were saved in (a given model object's own); with
    the base model's path when that needed resolving (the data phase reuses it), else None."""
    if cfg.model.dtype != "auto":
        return cfg, None
    path = None
    if inputs.model is not None:
        found = str(next(inputs.model.parameters()).dtype).removeprefix("torch.")
        dtype = found if found in DTYPES else "float32"
    else:
        base = adapters.base_of(cfg.model)
        path = resolve_model_path(base)
        dtype = stored_dtype(base, path)
    console.print(
        f"[bold]model.dtype[/bold]: auto -> {dtype} (the dtype the weights were saved in)", highlight=False
    )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})}), path


def run_callbacks(cfg: SFTConfig, inputs: RunInputs, accelerator: Accelerator, out: Path) -> CallbackList:
    """The user's callbacks, then the trackers and the report (main process only), then test hooks
    (every rank; trainer/testing.py)."""
    own = [
        *inputs.callbacks,
        TrackerCallback(accelerator, cfg.train.report_to, out.name or "sftlab", cfg.model_dump(mode="json")),
        ReportCallback(out),
    ]
    return CallbackList((own if accelerator.is_main_process else []) + env_callbacks())


# --- data (fails fast on bad rows, before any weights are loaded) -----------------------------


def setup_data(run: Run) -> None:
    """Tokenizer, template, datasets, packing (trainer/data.py). The main process converts and caches
    first; the other ranks then read its caches."""
    cfg = run.cfg
    with run.accelerator.main_process_first():
        run.data = prepare_run_data(cfg, run.console if run.main else None, run.inputs, run.model_path)
        run.match_examples = match_examples(cfg, run.data)
    checkpointing = cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_epoch
    if checkpointing or run.resume_from is not None:  # else computed when a callback's stop first saves one
        run.fingerprint = data_fingerprint(run.data.units)


# --- model, optimizer, schedule ----------------------------------------------------------------


def check_disk_space(out: Path, model, cfg: SFTConfig) -> None:
    if cfg.checkpoint.every_steps is None and not cfg.checkpoint.every_epoch:
        return
    # weights + 2 fp32 Adam moments (+ an fp32 master copy of each bf16 weight)
    need = sum(
        p.numel() * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0)) for p in model.parameters()
    )
    free = shutil.disk_usage(out).free
    if free < need:
        raise RunError(
            f"output_dir {out}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
            f"{need / 2**20:.0f} MiB; free space or set checkpoint.every_steps/every_epoch off"
        )


def setup_model_and_optimizer(run: Run) -> None:
    """The model on its device, the loss head, the micro-batch plan, the optimizer (fp32 masters), the
    schedule, compilation and the engine's wrapping; `run.resolved` completed with what they decided."""
    cfg, mixed = run.cfg, run.resolved.mixed_precision
    with run.engine.unpartitioned_loading():  # sharded engines keep fp32 masters and cast themselves
        built = build_run_model(cfg, run.data, "train", run.inputs.model, mixed, run.engine.sharded)
    model = built.model
    if run.main:
        for line in built.lines:
            run.console.print(line, highlight=False)
    model.train()
    run.flops = FlopCounter(model)
    if not (
        cfg.peft is not None and cfg.peft.quantize is not None
    ):  # bitsandbytes places quantized weights itself
        model.to(run.accelerator.device)
    attach_loss_head(run, model)
    run.stream = build_stream(cfg, run.data.units, run.world)
    total_steps, total_micro = plan_micro_batches(cfg, run.stream.batches_per_epoch)
    run.result.steps = total_steps
    if run.main:
        check_disk_space(run.out, model, cfg)
    optimizer = build_optimizer(model, cfg.optim)  # fp32 master weights for any low-precision parameter
    seed_master_weights(optimizer, built.originals)
    decisions = model_decisions(built)
    del built
    run.scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    peak_flops = cfg.train.peak_flops or measure_peak_flops(
        run.accelerator.device,
        torch.bfloat16 if mixed == "bf16" else next(model.parameters()).dtype,
    )
    resolved = dataclasses.replace(
        run.resolved,
        **decisions,
        **batch_geometry(cfg, run.world),
        total_steps=total_steps,
        total_micro=total_micro,
        peak_flops=peak_flops,
    )
    model, run.resolved = compile_if_it_pays(run, model, resolved)
    run.model, run.optimizer = run.engine.prepare(model, optimizer, cfg)


def model_decisions(built) -> dict:
    """What building the model decided (trainer/run_model.py), each with its reason, for `Resolved`."""
    return {
        "recompute": built.recompute,
        "recompute_why": built.recompute_why,
        "weight_form": built.weight_form,
        "weight_form_why": built.weight_form_why,
        "packed_attention": built.packed_attention,
        "packed_attention_why": built.packed_attention_why,
    }


def batch_geometry(cfg: SFTConfig, world: int) -> dict:
    """One optimizer step's size for `Resolved`: per process, over all processes (rows, or tokens with a
    token budget), and its padded tokens with fixed-size rows."""
    train = cfg.train
    budget = train.micro_batch_tokens
    per_micro = budget if budget is not None else train.micro_batch_size
    return {
        "micro_batch_size": train.micro_batch_size,
        "micro_batch_tokens": budget,
        "grad_accum_steps": train.grad_accum_steps,
        "global_batch": per_micro * train.grad_accum_steps * world,
        "global_batch_unit": "tokens" if budget is not None else "rows",
        "tokens_per_step": train.grad_accum_steps * train.micro_batch_size * world * cfg.data.max_seq_length,
    }


def compile_if_it_pays(run: Run, model, resolved: Resolved) -> tuple[object, Resolved]:
    """`train.compile` resolved for this run (trainer/compiling.py), returned with `resolved` completed by
    it; a compiled packed run gets fixed shapes and the dense document mask (per-document attention cuts
    rows in Python, a recompile per layout)."""
    cfg, device = run.cfg, run.accelerator.device
    packed, fixed = cfg.data.packing != "none", cfg.train.micro_batch_tokens is None
    dtype = torch.bfloat16 if resolved.mixed_precision == "bf16" else next(model.parameters()).dtype
    key = compiling.machine_key(model, device, dtype, cfg.train.compile_backend, resolved.recompute)
    resumed = run.resume_state
    done = resumed.step if resumed is not None else 0
    shape = compiling.RunShape(
        cfg.train.compile,
        packed,
        cfg.train.packed_attention == "documents",
        fixed,
        getattr(run.data, "processor", None) is not None,
        run.engine.sharded,
        resumed.compiled if resumed is not None else None,
        (resolved.total_steps - done) * resolved.tokens_per_step,
        float(run.flops.dense),
        resolved.peak_flops,
        device.type,
    )
    compiled, why = compiling.decide(shape, compiling.read_records().get(key))
    if not (packed and fixed) or shape.vision or shape.sharded:
        key = ""  # auto never compiles such a run: its step times are not recorded
    resolved = dataclasses.replace(resolved, compiled=compiled, compile_why=why, compile_key=key)
    if run.main:
        run.console.print(f"[bold]compile[/bold]: {'on' if compiled else 'off'} ({why})", highlight=False)
    if not compiled:
        return model, resolved
    if packed and cfg.train.packed_attention == "documents":
        raise RunError(
            "train.compile needs train.packed_attention: mask or auto (per-document attention cuts "
            "rows in Python: one recompile per document layout)"
        )
    if packed and fixed:
        attention.use(model, "mask")
        if resolved.packed_attention != "mask":
            why = "the dense document mask: a compiled run keeps fixed shapes"
            resolved = dataclasses.replace(resolved, packed_attention="mask", packed_attention_why=why)
        run.data.collate = compiling.fixed_shape_collate(
            run.data.pad_id, cfg.data.max_seq_length, cfg.train.micro_batch_size
        )
    model = torch.compile(
        model, backend=cfg.train.compile_backend, dynamic=False if packed and fixed else None
    )
    return model, resolved


def attach_loss_head(run: Run, model) -> None:
    """The objective's per-batch NLL: the target-only head where it applies (Liger's fused CE on CUDA)."""
    with run.accelerator.autocast():  # the head checks itself on the device and in the precision it trains in
        loss_fn = build_loss_fn(
            run.cfg, model, run.console if run.main else None, run.engine.target_loss_head_supported()
        )
    if run.cfg.train.liger:
        try:
            fused = apply_liger(model, run.accelerator.device.type, getattr(loss_fn, "softcap", None))
        except KernelError as e:
            raise RunError(str(e)) from None
        if isinstance(loss_fn, TargetLossHead):
            loss_fn.fused_ce = fused
    run.objective.attach(loss_fn)


def plan_micro_batches(cfg: SFTConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of the run: max_steps wins over num_epochs."""
    accum = cfg.train.grad_accum_steps
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, cfg.train.max_steps * accum
    micro = math.ceil(cfg.train.num_epochs * batches_per_epoch)
    return math.ceil(micro / accum), micro


def build_stream(cfg: SFTConfig, units, world: int) -> MicroBatchStream:
    """Fixed-size micro-batches (micro_batch_size units per rank) or token budgets (micro_batch_tokens)."""
    if cfg.train.micro_batch_tokens is None:
        return MicroBatchStream(len(units), cfg.train.micro_batch_size * world, cfg.train.seed)
    lengths = units.lengths.tolist() if hasattr(units, "lengths") else [len(u.input_ids) for u in units]
    return MicroBatchStream(
        len(units), 0, cfg.train.seed, lengths=lengths, global_tokens=cfg.train.micro_batch_tokens * world
    )


def match_examples(cfg: SFTConfig, data: object) -> list:
    """The match evaluation's (prompt, reference) pairs, read with their images for a vision-language run."""
    if cfg.match_eval is None:
        return []
    if getattr(data, "processor", None) is not None:
        return load_match_examples(cfg.match_eval, images=True, vocab_size=len(data.tokenizer))
    return load_match_examples(cfg.match_eval)


def build_loss_fn(
    cfg: SFTConfig, model, console: Console | None, engine_allows: tuple[bool, str] = (True, "")
) -> LossFn:
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
