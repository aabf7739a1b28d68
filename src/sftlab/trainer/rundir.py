"""A run's output directory: what it holds, whether a new run may write there, and the FINISHED marker.

`kind_of(out)` tells what `train.output_dir` holds:

- `empty`: missing, empty, or only hidden files: any run may start;
- `finished`: a run ended there and wrote `FINISHED` last (JSON: steps, final loss, time);
- `unfinished`: a run's files (`config.yaml`, `metrics.jsonl`, `checkpoints/`, a tracker's directory)
  without the marker: interrupted, killed or failed;
- `foreign`: other files.

A new run into a non-empty directory is refused (`refusal` says why and how to proceed) unless it
resumes or `train.overwrite` is set; `clear_run` then removes what a previous run leaves that a new
one would not rewrite (checkpoints, weights, adapter files, the marker), never other files.
`check_writable` and `check_disk_space` fail a run before it writes or trains.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from sftlab.errors import SftlabError
from sftlab.trainer.checkpoint import latest_checkpoint

FINISHED = "FINISHED"
RUN_FILES = ("config.yaml", "metrics.jsonl", "run.json", "checkpoints", "tensorboard", "wandb", "trackio")
# a previous run's outputs that a new run does not necessarily rewrite (full vs LoRA, fewer steps, no merge)
STALE = (
    FINISHED,
    "checkpoints",
    "merged",
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "sftlab_base.json",
    "match_eval.json",
    "metrics.jsonl",
    "README.md",
)


class RunError(SftlabError, RuntimeError):
    """The run cannot start or continue; the message says why."""


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def kind_of(out: Path) -> str:
    """empty | finished | unfinished | foreign (module docstring)."""
    names = _entries(out)
    if not names:
        return "empty"
    if FINISHED in names:
        return "finished"
    return "unfinished" if any(n in names for n in RUN_FILES) else "foreign"


def read_finished(out: Path) -> dict[str, Any] | None:
    """The marker's contents ({} when unreadable), or None when the run did not finish."""
    path = Path(out) / FINISHED
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def mark_finished(out: Path, info: dict[str, Any]) -> None:
    """Written last by a run that completed: `resume=auto` then has nothing to do, a new run is refused."""
    info = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(out) / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, Path(out) / FINISHED)


def unmark(out: Path) -> None:
    """A run that trains again in `out` (a resume) is not finished until it writes the marker again."""
    (Path(out) / FINISHED).unlink(missing_ok=True)


def saved_config(out: Path) -> dict[str, Any] | None:
    """The resolved config a run wrote to `out/config.yaml`, as a tree."""
    try:
        tree = yaml.safe_load((Path(out) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def describe_finished(out: Path) -> str:
    info = read_finished(out) or {}
    parts = [
        f"{info['steps']} optimizer steps" if "steps" in info else "",
        f"finished {info['finished_at']}" if "finished_at" in info else "",
    ]
    return f"a finished run ({', '.join(p for p in parts if p)})" if any(parts) else "a finished run"


def refusal(out: Path, kind: str) -> str:
    """Why a new run may not start in `out`, and the ways forward."""
    other = "or choose another train.output_dir"
    if kind == "finished":
        return (
            f"train.output_dir {out} holds {describe_finished(out)}; not overwriting it. Set train.overwrite=true "
            f"to replace it (its model, checkpoints and marker are removed first), {other}"
        )
    if kind == "unfinished":
        ckpt = latest_checkpoint(out)
        return (
            f"train.output_dir {out} holds an unfinished run ("
            + (f"latest checkpoint {ckpt.name}" if ckpt else "no checkpoint")
            + "). "
            + ("Continue it with train.resume=auto, replace" if ckpt else "Replace")
            + f" it with train.overwrite=true, {other}"
        )
    names = _entries(out)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (
        f"train.output_dir {out} is not empty ({len(names)} entries: {shown}) and holds no sftlab run. Set "
        f"train.overwrite=true to write into it anyway (nothing there is deleted), {other}"
    )


def clear_run(out: Path) -> list[str]:
    """Remove a previous run's outputs that a new run would not rewrite; returns their names."""
    removed = []
    for name in STALE + tuple(p.name for p in Path(out).glob("model-*.safetensors")):
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output_dir {path} is not writable: {e.strerror or e}") from None


def check_disk_space(out: Path, model, checkpointing: bool) -> None:
    """With checkpoints planned: the free space in `out` must hold one (the weights, 2 fp32 Adam moments and
    an fp32 master copy of each bf16 weight)."""
    if not checkpointing:
        return
    need = sum(
        p.numel() * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0)) for p in model.parameters()
    )
    free = shutil.disk_usage(out).free
    if free < need:
        raise RunError(
            f"output_dir {out}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
            f"{need / 2**20:.0f} MiB; free space or set checkpoint.every_steps/every_epoch off"
        )
