"""Continuing a run: whether it may write into its output directory, which checkpoint, whether it may be
continued, and restoring its exact state.

`claim_output_dir` decides, before any data is read, whether this run starts, resumes or finds its run
already complete in `train.output_dir` (a non-empty one is refused unless resuming or overwriting).
`resume_point` reads train.resume (auto, a checkpoint, or an output_dir holding one): the checkpoint
and its trainer state, whose config is compared with this run's first (`check_resume_compatible`: only
logging, evaluation and checkpoint settings may change), and keeps the checkpoint's global batch
(`keep_global_batch`): on another world size, or with another micro-batch size, the accumulation (or
the per-process token budget) adapts so that every optimizer step trains on the same examples as the
run that wrote the checkpoint. Before any weights are loaded, `check_resume_state` compares the rest of
the trainer state (trainer/checkpoint.py `TrainerState`) with the run: the engine (a change of world
size is allowed where the checkpoint can be read on it: unsharded weights, or FSDP's torch distributed
checkpoint, which reshards) and the data fingerprint (the exact training units). `restore_checkpoint`
then loads weights, optimizer, scheduler and this rank's RNG, puts the micro-batch stream where the
checkpoint left it (moved to this run's micro-batch size) and returns the run's `Progress`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console

from sftlab.config.schema import SFTConfig
from sftlab.trainer import distributed, rundir
from sftlab.trainer.checkpoint import (
    COMPLETE,
    Progress,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
)
from sftlab.trainer.components import Components
from sftlab.trainer.distributed import Engine
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.rundir import RunError
from sftlab.trainer.tracking import flat_config


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
RESUME_SAFE_KEYS = (
    "train.log_every",
    "train.eval_every",
    "train.resume",
    "train.output_dir",
    "train.overwrite",
    "checkpoint.",
    "match_eval",
    "data.num_proc",
    "data.cache",
    "data.cache_dir",
    "data.on_bad_record",
    "data.max_bad_fraction",
    "train.on_nan",
    "peft.merge_on_save",
)
# How a step is cut into micro-batches and processes: may change as long as the global batch stays
# (`keep_global_batch` checks it and adapts the accumulation).
GEOMETRY_KEYS = (
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.micro_batch_tokens",
    "train.global_batch_size",
)


def check_resume_compatible(saved: dict, cfg: SFTConfig, ckpt: Path) -> None:
    """`saved`: the config tree of a checkpoint (or of a finished run's config.yaml)."""
    old, new = flat_config(_with_defaults(saved)), flat_config(cfg.model_dump(mode="json"))
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and not k.startswith(RESUME_SAFE_KEYS) and k not in GEOMETRY_KEYS
    )
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise RunError(
            f"cannot resume from {ckpt}: the config changed in ways that break the run ({details}). "
            "Only logging, evaluation and checkpoint settings may change; start a new output_dir instead."
        )


def _with_defaults(saved: dict) -> dict:
    """A saved config tree with the keys later versions added filled in with their defaults (else as saved)."""
    try:
        return SFTConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


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


def resume_point(
    cfg: SFTConfig, world: int
) -> tuple[SFTConfig, Path | None, TrainerState | None, str | None]:
    """The checkpoint train.resume names and its trainer state, read once (None, None: a new run), and the
    config with the checkpoint's global batch kept on `world` processes (with the line that says how, when
    it changed); a config change that breaks the run fails here."""
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is None:
        return cfg, None, None, None
    state = read_state(resume_from)
    check_resume_compatible(state.config, cfg, resume_from)
    cfg, line = keep_global_batch(cfg, state, world, resume_from)
    return cfg, resume_from, state, line


def _saved_train(state: TrainerState) -> dict:
    return _with_defaults(state.config).get("train", {})


def _data_world(train: dict, processes: int) -> int:
    """The data-parallel processes of a run with this saved train section on `processes` processes (its
    processes / train.sequence_parallel)."""
    return processes // max(1, int(train.get("sequence_parallel") or 1))


def saved_stream_units(state: TrainerState) -> int | None:
    """The fixed micro-batch size (units over all processes) of the stream that wrote `state`; None with
    token budgets (their micro-batches are kept whole: `keep_global_batch`)."""
    train = _saved_train(state)
    if train.get("micro_batch_tokens") is not None or "micro_batch_size" not in train:
        return None
    return int(train["micro_batch_size"]) * _data_world(train, state.num_processes)


def keep_global_batch(
    cfg: SFTConfig, state: TrainerState, world: int, ckpt: Path
) -> tuple[SFTConfig, str | None]:
    """This run's micro-batch size and accumulation (or per-process token budget) such that each optimizer
    step trains on the checkpoint's steps' examples on `world` data-parallel processes (all of them, or
    their sequence-parallel groups); refused (before any weights load) when the global batch cannot be
    kept, saying which settings would keep it."""
    saved, train = _saved_train(state), cfg.train
    old_world = _data_world(saved, state.num_processes)
    geometry = (train.micro_batch_size, train.grad_accum_steps, train.micro_batch_tokens)
    if (saved.get("micro_batch_size"), saved.get("grad_accum_steps"), saved.get("micro_batch_tokens")) == (
        geometry
    ) and world == old_world:
        return cfg, None
    where = f"cannot resume from {ckpt} on {world} process(es)"
    if cfg.train.loss_normalization == "micro_batch_mean":
        raise RunError(
            f"{where}: train.loss_normalization micro_batch_mean averages each micro-batch's mean loss, so "
            f"another cut into micro-batches changes the loss; resume with {old_world} process(es), "
            f"micro_batch_size {saved.get('micro_batch_size')} and grad_accum_steps {saved.get('grad_accum_steps')}"
        )
    if saved.get("micro_batch_tokens") is not None:
        update = _token_budget_kept(cfg, saved, old_world, world, where)
    else:
        update = _rows_kept(cfg, saved, old_world, world, where)
    new = train.model_copy(update=update)
    line = (
        f"[bold]resume[/bold] on {world} process(es) (the checkpoint: {old_world}): the global batch "
        f"is kept: micro_batch_size {new.micro_batch_size} x grad_accum_steps {new.grad_accum_steps}"
        + (f", {new.micro_batch_tokens} tokens per micro-batch" if new.micro_batch_tokens else "")
        + f" x {world} process(es); each step trains on the same examples"
    )
    return cfg.model_copy(update={"train": new}), line


def _rows_kept(cfg: SFTConfig, saved: dict, old_world: int, world: int, where: str) -> dict:
    """Fixed-size micro-batches: this run's micro_batch_size (or the largest smaller one) and the
    accumulation that make the checkpoint's global batch on `world` processes."""
    glob = int(saved["micro_batch_size"]) * int(saved["grad_accum_steps"]) * old_world
    wanted = cfg.train.global_batch_size
    if wanted is not None and wanted != glob:
        raise RunError(
            f"{where}: its global batch is {glob} rows per step, train.global_batch_size {wanted} would change "
            f"the run; leave it out or set it to {glob}"
        )
    for micro in range(cfg.train.micro_batch_size, 0, -1):
        if glob % (micro * world) == 0:
            return {"micro_batch_size": micro, "grad_accum_steps": glob // (micro * world)}
    fits = [w for w in range(1, glob + 1) if glob % w == 0]
    raise RunError(
        f"{where}: its global batch of {glob} rows per step cannot be split evenly over {world} processes; "
        f"world sizes that keep it: {', '.join(map(str, fits[:12]))}"
    )


def _token_budget_kept(cfg: SFTConfig, saved: dict, old_world: int, world: int, where: str) -> dict:
    """Token budgets: the micro-batches (cut from the global budget) stay as they were; each process's
    budget is the global one over `world`, the accumulation the checkpoint's."""
    total = int(saved["micro_batch_tokens"]) * old_world
    per_process, seq = total // world, cfg.data.max_seq_length or 0
    if total % world or per_process < seq:
        raise RunError(
            f"{where}: its micro-batches hold {total} tokens over all processes (micro_batch_tokens "
            f"{saved['micro_batch_tokens']} x {old_world}), which {world} processes cannot split evenly into "
            f"budgets of at least data.max_seq_length ({seq}); resume with {old_world} process(es)"
        )
    return {"micro_batch_tokens": per_process, "grad_accum_steps": int(saved["grad_accum_steps"])}


def planned_fingerprint(cfg: SFTConfig, resuming: bool, units) -> str | None:
    """The training units' fingerprint when a checkpoint is planned or read; else None (a callback's stop
    or a signal computes it when it saves one)."""
    best = cfg.train.load_best_model_at_end  # every evaluation saves a checkpoint
    checkpointing = cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_epoch or best
    return data_fingerprint(units) if checkpointing or resuming else None


def check_resume_state(resolved: Resolved) -> None:
    """The checkpoint's engine and training data must be ones this run can continue: checked before weights
    load. Another world size is fine where the engine reads the checkpoint on it (`keep_global_batch` has
    kept the steps' examples): trainer/distributed.py `resume_refusal`."""
    if resolved.resume_from is None:
        return
    ckpt, saved = resolved.resume_from, resolved.resume_state
    why = distributed.resume_refusal(saved.engine, saved.num_processes, resolved.engine, resolved.world_size)
    if why is not None:
        raise RunError(f"cannot resume from {ckpt}: {why}")
    if saved.data_fingerprint != resolved.data_fingerprint:
        raise RunError(
            f"cannot resume from {ckpt}: the training data changed since it was written "
            "(different tokenized examples); start a new output_dir instead"
        )


def trainable_only_checkpoints(engine: Engine, cfg: SFTConfig) -> bool:
    """Adapters keep only their trainable tensors in a checkpoint; sharded engines save whole shards."""
    return engine.trainable_only_checkpoints(cfg.peft is not None)


def restore_checkpoint(resolved: Resolved, parts: Components) -> Progress:
    """Weights, optimizer, scheduler, this rank's RNG, the stream position and the history so far (into
    `parts`); returns the run's progress at the checkpoint."""
    ckpt = resolved.resume_from
    trainable_only = trainable_only_checkpoints(parts.engine, resolved.cfg)
    state = load_checkpoint(parts.accelerator, ckpt, parts.scheduler, trainable_only=trainable_only)
    progress = state.progress()
    units = saved_stream_units(state)
    parts.stream.load_state(state.data, units)
    if units is not None and units != parts.stream.global_units:  # another micro-batch size: count in it
        progress.consumed_micro_batches = (
            parts.stream.epoch * parts.stream.batches_per_epoch + parts.stream.index
        )
    parts.result.history = list(state.metrics)
    saved = state.match_before
    if saved is not None:
        from sftlab.model.generate import MatchResult

        parts.result.match_before = MatchResult(saved["correct"], saved["total"], [])
    if resolved.main:
        parts.console.print(f"[bold]resumed[/bold] from {ckpt} at step {progress.step}")
    return progress


# --- whether this run may write into its output directory --------------------------------------


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
