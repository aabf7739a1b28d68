"""Continuing a run: which checkpoint, whether it may be continued, and restoring its exact state.

`find_resume_checkpoint` reads train.resume (auto, a checkpoint, or an output_dir holding one).
Before any weights are loaded, `check_resume_compatible` compares the checkpoint's config with this
run's (only logging, evaluation and checkpoint settings may change) and `check_resume_state` its
trainer state (trainer/checkpoint.py `TrainerState`): the number of processes, the engine and the data
fingerprint (the exact training units). `restore_checkpoint` then loads weights, optimizer,
scheduler and this rank's RNG, and puts the micro-batch stream where the checkpoint left it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sftlab.config.schema import SFTConfig
from sftlab.trainer.checkpoint import COMPLETE, latest_checkpoint, load_checkpoint
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


def check_resume_compatible(saved: dict, cfg: SFTConfig, ckpt: Path) -> None:
    """`saved`: the config tree of a checkpoint (or of a finished run's config.yaml)."""
    old, new = flat_config(_with_defaults(saved)), flat_config(cfg.model_dump(mode="json"))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESUME_SAFE_KEYS)
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


def check_resume_state(run) -> None:
    """The checkpoint's processes, engine and training data must be this run's: checked before weights load."""
    if run.resume_from is None:
        return
    ckpt, saved = run.resume_from, run.resume_state  # read once by setup_run
    if saved.num_processes != run.world:
        raise RunError(
            f"cannot resume from {ckpt}: it was written by {saved.num_processes} "
            f"process(es), this run has {run.world}; the data order, the batch geometry (and the "
            f"shards of a sharded checkpoint) would change. Launch it with "
            f"{saved.num_processes} processes, or start a new output_dir"
        )
    if saved.engine != run.engine.name:
        raise RunError(
            f"cannot resume from {ckpt}: it was written under {saved.engine}, this run uses "
            f"{run.engine.name}; launch it with the same accelerate config"
        )
    if saved.data_fingerprint != run.fingerprint:
        raise RunError(
            f"cannot resume from {ckpt}: the training data changed since it was written "
            "(different tokenized examples); start a new output_dir instead"
        )


def trainable_only_checkpoints(run) -> bool:
    """Adapters keep only their trainable tensors in a checkpoint; sharded engines save whole shards."""
    return run.engine.trainable_only_checkpoints(run.cfg.peft is not None)


def restore_checkpoint(run) -> None:
    """Weights, optimizer, scheduler, this rank's RNG, the stream position and the history so far."""
    state = load_checkpoint(
        run.accelerator, run.resume_from, run.scheduler, trainable_only=trainable_only_checkpoints(run)
    )
    run.start_step, run.consumed = state.step, state.consumed_micro_batches
    run.stream.load_state(state.data)
    run.logged_steps = list(state.logged_steps)
    run.result.history = list(state.metrics)
    saved = state.match_before
    if saved is not None:
        from sftlab.model.generate import MatchResult

        run.result.match_before = MatchResult(saved["correct"], saved["total"], [])
    if run.main:
        run.console.print(f"[bold]resumed[/bold] from {run.resume_from} at step {run.start_step}")
