"""Callbacks: user code at the run's seams, and the run's own trackers and report made the same way.

A callback is any object with some of these methods (all optional, no base class needed):

    on_train_begin(info)        info: a dict of what the run resolved (steps, precision, engine, ...)
    on_step_end(record)         record: the step's metrics (trainer/loop.py), eval keys included when due
    on_log(record)              the records also written to metrics.jsonl (every train.log_every steps,
                                evaluations, the last step)
    on_evaluate(metrics)        metrics: {"step", "eval_loss", "eval/<name>_loss", ...}
    on_save(checkpoint_dir)     after a checkpoint is complete (renamed into place, `latest` updated)
    on_train_end(result)        the TrainResult, after the model is saved

A hook that returns True asks the run to stop: the step ends, a checkpoint is saved, and the run
returns a result with `stopped` set (no FINISHED marker: `train.resume=auto` continues it exactly).
A hook that returns "save" asks for a checkpoint at the end of this step; the run goes on.
A hook that raises ends the run with a `CallbackError` naming the callback and the hook; since
`on_save` runs only after a checkpoint is complete and no hook runs while one is written, the last
complete checkpoint is never half-written by a callback.

Hooks run on the main process only (like the metrics log), except `on_save`, which every rank
sees after the save (the main process's return value decides for all).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sftlab.config.schema import SFTConfig
from sftlab.errors import SftlabError
from sftlab.trainer import tracking
from sftlab.trainer.report import write_report
from sftlab.trainer.testing import env_callbacks

HOOKS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class CallbackError(SftlabError, RuntimeError):
    """A callback raised: the message names it, the hook and the step; the cause is chained."""


def callback_name(cb: Any) -> str:
    return getattr(cb, "name", None) or type(cb).__name__


def check_callbacks(callbacks: Iterable[Any]) -> list[Any]:
    """The callbacks as a list; each must have at least one hook (a typo'd method name is caught here)."""
    out = list(callbacks or ())
    for cb in out:
        if isinstance(cb, type):
            raise TypeError(f"callbacks: {cb.__name__} is a class; pass an instance ({cb.__name__}())")
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise TypeError(f"callbacks: {callback_name(cb)} has none of the hooks {', '.join(HOOKS)}")
    return out


class CallbackList:
    """Calls a hook on every callback in order; remembers which callback asked the run to stop."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        self.stop_reason: str | None = None
        self.step: int | None = None
        self.save_asked = False  # a hook returned "save" since the last take_save_request

    def take_save_request(self) -> bool:
        """Whether a hook asked for a checkpoint (returned "save") since the last call."""
        asked, self.save_asked = self.save_asked, False
        return asked

    def call(self, hook: str, arg: Any) -> bool:
        """Run `hook(arg)` on each callback; True when any asked to stop."""
        asked = False
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if not callable(fn):
                continue
            try:
                wants_stop = fn(arg)
            except Exception as e:
                at = f" at step {self.step}" if self.step is not None else ""
                raise CallbackError(
                    f"callback {callback_name(cb)}.{hook} raised{at}: {type(e).__name__}: {e}"
                ) from e
            if wants_stop is True and self.stop_reason is None:
                self.stop_reason = f"{callback_name(cb)}.{hook}" + (
                    f" at step {self.step}" if self.step else ""
                )
            asked = asked or wants_stop is True
            self.save_asked = self.save_asked or (isinstance(wants_stop, str) and wants_stop == "save")
        return asked


class TrackerCallback:
    """The experiment trackers of `train.report_to` (tensorboard, wandb, trackio) as a callback."""

    name = "trackers"

    def __init__(self, accelerator, names: list[str], run_name: str, config: dict[str, Any]):
        self.accelerator, self.names, self.run_name, self.config = accelerator, names, run_name, config

    def on_train_begin(self, info: dict[str, Any]) -> None:
        tracking.start(self.accelerator, self.names, self.run_name, self.config)

    def on_log(self, record: dict[str, Any]) -> None:
        tracking.log(self.accelerator, self.names, record)

    def on_train_end(self, result: Any) -> None:
        tracking.finish(self.accelerator, self.names)


class ReportCallback:
    """report.md + loss.png (trainer/report.py), written when the run ends, is stopped or interrupted."""

    name = "report"

    def __init__(self, out: Path):
        self.out = out
        self.path: Path | None = None

    def on_train_end(self, result: Any) -> None:
        self.path = write_report(
            self.out, "finished" if not getattr(result, "stopped", None) else f"stopped: {result.stopped}"
        )

    def interrupted(self, status: str) -> None:
        self.path = write_report(self.out, status)


def run_callbacks(cfg: SFTConfig, user: Iterable[Any], accelerator, out: Path) -> CallbackList:
    """A run's callbacks: the user's, then the trackers and the report (main process only), then test
    hooks (every rank; trainer/testing.py)."""
    own = [
        *user,
        TrackerCallback(accelerator, cfg.train.report_to, out.name or "sftlab", cfg.model_dump(mode="json")),
        ReportCallback(out),
    ]
    return CallbackList((own if accelerator.is_main_process else []) + env_callbacks())
