"""Checkpoints: atomic save, rotation, discovery of the latest complete one, and exact restore (or of the
weights alone: `load_weights`).

Layout under `output_dir/checkpoints/`:

    step-00000012/            one complete checkpoint
        model.safetensors     (Accelerate's save_state: model weights as safetensors -- with adapters
                               only the trainable ones --,
        optimizer.bin          optimizer state loaded back with torch.load(weights_only=True))
        trainer_state.json    step, data position, counters, metrics so far, resolved config
        scheduler.json        LR-scheduler state (plain JSON, no pickle)
        rng-{rank}.json, rng_torch-{rank}.safetensors   python/numpy/torch(/cuda) RNG states, one pair
                              per process, written by that process (ranks' states differ: dropout draws
                              per token of differently padded batches); restored on that same rank.
                              Checkpoints from before per-rank files hold rank 0's pair only, as
                              rng.json, rng_torch.safetensors
        COMPLETE              written last, inside the temporary directory
    latest                    name of the newest complete checkpoint (atomically replaced)

Under FSDP the model and optimizer are torch distributed checkpoint shards, one file per rank
(`pytorch_model_fsdp_0/`, `optimizer_0/`); under DeepSpeed its ZeRO files (`pytorch_model/`); every
rank writes its own part into the same temporary directory (a filesystem all ranks see), and with
adapters the shards hold the whole model (`trainable_only` applies to unsharded engines).

A checkpoint is written into `.tmp-step-N` (every rank writes its files, then all wait for each
other before the main process adds COMPLETE), every file fsync'ed, then renamed into place; only
then is `latest` replaced. A process killed at any moment leaves the previous complete
checkpoint usable: incomplete `.tmp-*` directories are ignored and removed on the next save.
Nothing is ever unpickled without `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file

from sftlab.compat import accelerate as accelerate_compat
from sftlab.errors import SftlabError
from sftlab.trainer import testing
from sftlab.trainer.master_weights import MASTER_KEY, master_weight_optimizer

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


class CheckpointError(SftlabError, RuntimeError):
    """A checkpoint cannot be written or restored; the message says which and why."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------- RNG states


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py = random.getstate()
    npy = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def save_rank_rng(ckpt: Path, rank: int) -> None:
    """Every process writes its own RNG states into the (temporary) checkpoint directory."""
    meta, tensors = capture_rng()
    (ckpt / f"rng-{rank}.json").write_text(json.dumps(meta))
    save_file(tensors, str(ckpt / f"rng_torch-{rank}.safetensors"))


def load_rank_rng(ckpt: Path, rank: int) -> None:
    """Restore this rank's own RNG states. A checkpoint from before per-rank files holds rank 0's states
    only: rank 0 takes them; another rank keeps its own, which Accelerate's load_state has just restored
    from its `random_states_{rank}.pkl` (rank 0's would give it another rank's dropout masks)."""
    meta, tensors = ckpt / f"rng-{rank}.json", ckpt / f"rng_torch-{rank}.safetensors"
    if not meta.is_file():
        if rank != 0:
            return
        meta, tensors = ckpt / "rng.json", ckpt / "rng_torch.safetensors"
    restore_rng(json.loads(meta.read_text()), load_file(str(tensors)))


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------- save


def _keep_trainable(models, weights, output_dir) -> None:
    """Accelerate save hook: keep only the trainable tensors of each model's state dict (adapters)."""
    for model, state_dict in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state_dict if k not in trainable]:
            del state_dict[key]


def _check_trainable_file(accelerator, ckpt: Path) -> None:
    """Before a non-strict load of a trainable-only checkpoint: it must hold exactly the trainable tensors."""
    from safetensors import safe_open

    for i, model in enumerate(accelerate_compat.prepared_models(accelerator)):
        path = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        with safe_open(str(path), "pt") as f:
            saved = set(f.keys())
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if saved != trainable:
            raise CheckpointError(
                f"{path} does not hold this run's trainable parameters ({len(saved)} saved, "
                f"{len(trainable)} trainable, {len(saved ^ trainable)} differ)"
            )


class _NoTiedWeightNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in str(record.msg)  # accelerate prefixes "[RANK k] "


@contextmanager
def _quiet_tied_weights():
    """Accelerate notes "Removed shared tensor {'lm_head.weight'} while saving" for tied embeddings (they
    are stored once in safetensors). A checkpoint is only ever loaded back into the live model, where the
    tie holds, so the note is noise on every checkpoint: it is filtered while sftlab saves one."""
    logger, quiet = logging.getLogger("accelerate.utils.other"), _NoTiedWeightNote()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    scheduler,
    keep_last: int | None,
    trainable_only: bool = False,
    extra: Any = None,
    protect: str | None = None,
) -> Path:
    """Write a complete checkpoint for `step` atomically, then rotate. Returns its directory.

    `trainable_only` (adapters): the model file holds only the trainable parameters; the frozen base
    is reloaded from the model itself on resume. `extra(dir)`: writes more files into the checkpoint
    on the main process before it is marked complete (checkpoint.save_hf_model's hf/ directory).
    `protect`: a checkpoint name rotation keeps beside the newest (train.load_best_model_at_end's best)."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    main = accelerator.is_main_process
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        _save_rank_state(accelerator, tmp, trainable_only)
        accelerator.wait_for_everyone()  # every rank's files are in tmp before it is completed and renamed
        if main:
            testing.pause_in_save(step)
            if extra is not None:
                extra(tmp)
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=_jsonable))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            (tmp / COMPLETE).write_text(f"step {step}\n")
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a resumed crash): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _atomic_write_text(root / LATEST, final.name + "\n")
            rotate(root, keep_last, protect)
        accelerator.wait_for_everyone()
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"saving the checkpoint of step {step} failed: {e.strerror or e} ({e.filename or root}); "
            + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
        ) from e
    return final


def _save_rank_state(accelerator, tmp: Path, trainable_only: bool) -> None:
    """Every rank's part of a checkpoint: Accelerate's state (model in safetensors, optimizer, RNG; only
    the trainable tensors with `trainable_only`) and this rank's own RNG."""
    hook = accelerator.register_save_state_pre_hook(_keep_trainable) if trainable_only else None
    try:
        with _quiet_tied_weights():
            accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        if hook is not None:
            hook.remove()
    save_rank_rng(tmp, accelerator.process_index)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return None  # callables (LambdaLR's lr_lambdas) are rebuilt from the config, not stored


def rotate(root: Path, keep_last: int | None, protect: str | None = None) -> None:
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last is None:
        return
    complete = [p for p in complete_checkpoints(root) if p.name != protect]
    for old in complete[:-keep_last] if len(complete) > keep_last else []:
        shutil.rmtree(old, ignore_errors=True)


def delete_checkpoints(output_dir: Path) -> int:
    """Remove the checkpoints directory of a finished run (checkpoint.delete_at_end); how many there were."""
    root = checkpoint_root(output_dir)
    count = len(complete_checkpoints(root))
    shutil.rmtree(root, ignore_errors=True)
    return count


# ---------------------------------------------------------------------------- find / load


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step-*")
        if p.is_dir() and (p / COMPLETE).is_file() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / COMPLETE).is_file():
            return cand
    complete = complete_checkpoints(root)  # pointer missing or stale: fall back to a scan
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> TrainerState:
    try:
        raw = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable: {e}") from None
    return TrainerState.from_json(raw, ckpt)


def load_checkpoint(accelerator, ckpt: Path, scheduler, trainable_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `ckpt`; return its trainer state."""
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    state = read_state(ckpt)
    if trainable_only:
        _check_trainable_file(accelerator, ckpt)
    try:
        # Accelerate loads the optimizer with torch.load(weights_only=True): a pickle payload is refused.
        accelerator.load_state(
            str(ckpt), load_kwargs={"weights_only": True}, **({"strict": False} if trainable_only else {})
        )
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {ckpt}: a file holds a pickle that is not plain tensors/containers "
            f"({str(e).splitlines()[0]})"
        ) from None
    sched = json.loads((ckpt / "scheduler.json").read_text())
    sched.pop("lr_lambdas", None)
    scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    load_rank_rng(ckpt, accelerator.process_index)
    return state


def load_weights(accelerator, ckpt: Path, optimizer, trainable_only: bool = False) -> None:
    """Restore only the model weights from `ckpt`, as `load_checkpoint` does, and the fp32 master weights where
    `optimizer` keeps them (from its file, memory-mapped: the moments are never read); the rest of the optimizer
    state, the scheduler and the RNG stay as they are. Unsharded engines (sharded ones: `load_checkpoint`; `Engine.load_weights` chooses)."""
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    if trainable_only:
        _check_trainable_file(accelerator, ckpt)
    for i, model in enumerate(
        accelerate_compat.prepared_models(accelerator)
    ):  # as Accelerate's load_state reads them
        load_model(
            model,
            str(ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")),
            strict=not trainable_only,
        )
    master = master_weight_optimizer(optimizer)
    if master is None:
        return
    try:
        saved = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {ckpt}: a file holds a pickle that is not plain tensors/containers "
            f"({str(e).splitlines()[0]})"
        ) from None
    master.load_masters(saved.get(MASTER_KEY))


# ---------------------------------------------------------------------------- the trainer state

STATE_VERSION = 2  # 1: before the version field (no logged_steps/engine in the oldest ones)


@dataclass
class Progress:
    """Where a run is: the counters its checkpoints record (`TrainerState`), and nothing else. The recipe
    (trainer/loop.py) advances them step by step; a resumed run starts from its checkpoint's."""

    step: int = 0  # optimizer steps done
    consumed_micro_batches: int = 0  # micro-batches taken from the stream so far
    logged_steps: list[int] = field(default_factory=list)  # the steps written to metrics.jsonl


@dataclass
class TrainerState:
    """Everything a checkpoint holds besides weights, optimizer, scheduler and RNG (trainer_state.json):
    where the run is (its `Progress`: step, consumed micro-batches, logged steps), what it was run on, and
    what it logged so far."""

    step: int
    consumed_micro_batches: int  # micro-batches taken from the stream so far
    data: dict[str, int]  # MicroBatchStream.state(): epoch, index (micro-batches taken in it), seed
    num_processes: int
    engine: str
    data_fingerprint: str
    metrics: list[dict[str, Any]]  # every step record so far
    logged_steps: list[int]  # the steps written to metrics.jsonl
    config: dict[str, Any]  # the resolved run config
    match_before: dict[str, Any] | None = None
    compiled: bool | None = None  # train.compile as resolved (None: written before it was recorded)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def progress(self) -> Progress:
        """The counters a run continues from."""
        return Progress(self.step, self.consumed_micro_batches, list(self.logged_steps))

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path | str = "") -> TrainerState:
        """Any version this code wrote, newer fields filled in for older checkpoints."""
        version = raw.get("version", 1)
        if version > STATE_VERSION:
            raise CheckpointError(
                f"{where}: trainer state version {version} was written by a newer sftlab "
                f"(this one reads up to {STATE_VERSION})"
            )
        metrics = raw.get("metrics", [])
        world = raw.get("num_processes", 1)
        try:
            return cls(
                step=raw["step"],
                consumed_micro_batches=raw["consumed_micro_batches"],
                data=raw["data"],
                num_processes=world,
                engine=raw.get("engine", "ddp" if world > 1 else "single"),
                data_fingerprint=raw["data_fingerprint"],
                metrics=[{k: v for k, v in r.items() if k != "logged"} for r in metrics],
                # version 1 checkpoints without `logged_steps` carried a per-record "logged" flag
                logged_steps=raw.get("logged_steps", [r["step"] for r in metrics if r.get("logged")]),
                config=raw.get("config", {}),
                match_before=raw.get("match_before"),
                compiled=raw.get("compiled"),
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: {STATE_FILE} lacks {e}") from None
