"""Experiment trackers (`train.report_to`: tensorboard, wandb, trackio) through Accelerate's own trackers.

metrics.jsonl is always written (trainer/metrics.py); trackers are optional extras, checked before the
run starts (a missing package is a clear error naming the pip extra). Everything works offline:

- tensorboard: event files under `output_dir/tensorboard/<project>/`;
- wandb: offline mode unless an API key is configured (`WANDB_API_KEY`, or `WANDB_MODE` set by you);
  runs land in `output_dir/wandb/` (sync later with `wandb sync`);
- trackio: its local store, under `output_dir/trackio/` unless `TRACKIO_DIR` is set (trackio reads it once per
  process: a second run in the same Python process logs to the first run's store).

The resolved config is stored as the run's hyperparameters (flattened, non-scalars as strings). The project
is `train.project` (else `WANDB_PROJECT` for wandb, else the output directory's name), the run's name
`train.run_name` (else the directory's name), the wandb entity `train.entity` (else `WANDB_ENTITY`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class TrackerError(SftlabError, RuntimeError):
    """A configured tracker cannot be used; the message says what to install."""


def check_trackers(names: list[str]) -> None:
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TrackerError(
                f"train.report_to: {name} needs the {PACKAGES[name]} package: "
                f"pip install 'sftlab[{name}]' (or remove it from train.report_to)"
            )


def prepare_offline(names: list[str], out: Path) -> None:
    """Environment for offline tracking (only what the user has not set)."""
    if "wandb" in names:
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(out))
        (out / "wandb").mkdir(parents=True, exist_ok=True)
    if "trackio" in names:
        os.environ.setdefault("TRACKIO_DIR", str(out / "trackio"))


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 2e-5, "data.train": [...], ...}`: a config tree's leaves under their dotted keys, as they are
    (an empty section has none). The trackers' hyperparameters, and what resuming compares (trainer/resume.py)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def names_of(names: list[str], dir_name: str, train: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """(project, per-tracker init kwargs): `train.project` (else `WANDB_PROJECT` when wandb logs, else the
    output directory's name), `train.run_name` (else the directory's name), `train.entity` (else wandb's own:
    `WANDB_ENTITY` or the account's default)."""
    project = train.get("project") or ("wandb" in names and os.environ.get("WANDB_PROJECT")) or dir_name
    run_name = train.get("run_name") or dir_name
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, **({"entity": train["entity"]} if train.get("entity") else {})}
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_name}
    return project, kwargs


def start(accelerator, names: list[str], run_name: str, config: dict[str, Any]) -> None:
    """Start the trackers: `run_name` is the output directory's name, the default of project and run name."""
    if names:  # hyperparameters: scalars as they are, anything else as a string
        hyperparameters = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_config(config).items()
        }
        project, kwargs = names_of(names, run_name, config.get("train") or {})
        accelerator.init_trackers(project, config=hyperparameters, init_kwargs=kwargs)


def log(accelerator, names: list[str], record: dict[str, Any]) -> None:
    """The record's numbers to every tracker; its samples (train.sample_every) as text to those that show
    text (tensorboard, wandb)."""
    if names:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(values, step=record["step"])
        text = "\n\n".join(
            f"{s.get('prompt', '')!r} -> {s.get('reply', s.get('note', ''))!r}"
            for s in record.get("samples") or []
        )
        for name in ("tensorboard", "wandb"):
            if text and name in names:
                accelerator.get_tracker(name, unwrap=False).log({"samples": text}, step=record["step"])


def finish(accelerator, names: list[str]) -> None:
    if names:
        accelerator.end_training()
    if (
        "trackio" in names
    ):  # Accelerate finishes the run but leaves it current: trackio would finish it again at exit
        from trackio import context_vars

        context_vars.current_run.set(None)
