"""transformers `TrainerCallback`s (what a TRL script passes as `callbacks=`) as sftlab callbacks.

`TrainerCallbackAdapter` calls the callback's hooks as transformers does, `hook(args, state, control,
**kwargs)`, on sftlab's callback seams (trainer/callbacks.py):

    sftlab hook                 TrainerCallback hooks called
    on_train_begin(info)        on_init_end, on_train_begin     (state.max_steps set)
    on_evaluate(metrics)        on_evaluate(metrics=...)
    on_log(record)              on_log(logs=...)                (appended to state.log_history first)
    on_save(checkpoint_dir)     on_save
    on_step_end(record)         on_step_end
    on_train_end(result)        on_train_end

`state` is a transformers `TrainerState` (global_step, epoch, max_steps, log_history, ...), `control` a
`TrainerControl`: `control.should_training_stop` stops the run after this step (with a checkpoint,
resumable), `control.should_save` saves a checkpoint at the end of this step; `should_log` and
`should_evaluate` are not read (sftlab logs every train.log_every steps and evaluates every
train.eval_every). `args` is the `args=` object of the call, else a namespace of the transformers names
of the run's settings. The other hooks (on_step_begin, on_substep_end, on_epoch_begin/end, on_optimizer_step,
on_predict, ...) are not called: a callback that overrides one is named in a note. kwargs hold the logs
or metrics only (no model, optimizer or dataloaders).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sftlab.config.schema import SFTConfig
from sftlab.trainer.callbacks import HOOKS

CALLED = ("on_init_end", "on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")
NOT_CALLED = (
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_prediction_step",
    "on_predict",
    "on_push_begin",
)


def _base(cls: type) -> type | None:
    return next((c for c in cls.__mro__ if c.__name__ == "TrainerCallback"), None)


def is_trainer_callback(cb: Any) -> bool:
    """A transformers TrainerCallback (instance or class): TrainerCallback among its bases, or hooks taking
    (args, state, control)."""
    cls = cb if isinstance(cb, type) else type(cb)
    if _base(cls) is not None:
        return True
    import inspect

    for hook in HOOKS:
        fn = getattr(cls, hook, None)
        if callable(fn):
            try:
                params = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if params[1:4] == ["args", "state", "control"]:
                return True
    return False


def run_args(cfg: SFTConfig) -> SimpleNamespace:
    """The transformers names of a run's settings, for callbacks that read `args`."""
    return SimpleNamespace(
        output_dir=cfg.train.output_dir,
        learning_rate=cfg.optim.lr,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        max_steps=cfg.train.max_steps or -1,
        num_train_epochs=cfg.train.num_epochs,
        logging_steps=cfg.train.log_every,
        eval_steps=cfg.train.eval_every if isinstance(cfg.train.eval_every, int) else None,
        save_steps=cfg.checkpoint.every_steps,
        seed=cfg.train.seed,
        report_to=list(cfg.train.report_to),
    )


def adapt_callbacks(callbacks: Any, args: Any) -> tuple[list[Any], list[str]]:
    """(the callbacks, TrainerCallbacks wrapped; notes naming hooks sftlab does not call). A TrainerCallback
    class is instantiated, as transformers does."""
    out, notes = [], []
    for cb in list(callbacks or ()):
        if not is_trainer_callback(cb):
            out.append(cb)
            continue
        cb = cb() if isinstance(cb, type) else cb
        base = _base(type(cb))
        unused = [
            h
            for h in NOT_CALLED
            if callable(getattr(type(cb), h, None))
            and (base is None or getattr(type(cb), h) is not getattr(base, h, None))
        ]
        if unused:
            notes.append(
                f"callbacks: {type(cb).__name__}.{', '.join(unused)} not called by sftlab "
                f"(it calls {', '.join(CALLED)})"
            )
        out.append(TrainerCallbackAdapter(cb, args))
    return out, notes


class TrainerCallbackAdapter:
    """One TrainerCallback on sftlab's seams, with its own TrainerState and TrainerControl."""

    def __init__(self, callback: Any, args: Any):
        from transformers import TrainerControl, TrainerState

        self.callback, self.args = callback, args
        self.name = type(callback).__name__
        self.state, self.control = TrainerState(), TrainerControl()

    def _call(self, hook: str, **kwargs: Any) -> None:
        fn = getattr(self.callback, hook, None)
        if callable(fn):
            out = fn(self.args, self.state, self.control, **kwargs)
            if out is not None and hasattr(out, "should_training_stop"):
                self.control = out  # transformers keeps a returned control

    def _at(self, record: dict[str, Any]) -> None:
        """A new step: global_step and epoch; the per-step requests cleared, as transformers does."""
        step = record.get("step")
        if isinstance(step, int) and step != self.state.global_step:
            self.state.global_step = step
            self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        if "epoch" in record:
            self.state.epoch = record["epoch"]

    def _save(self) -> str | None:
        if self.control.should_save:
            self.control.should_save = False
            return "save"
        return None

    def on_train_begin(self, info: dict[str, Any]) -> str | None:
        state = self.state
        state.max_steps = info.get("total_steps", 0)
        state.train_batch_size = info.get("micro_batch_size")
        for name in ("logging_steps", "eval_steps", "save_steps", "num_train_epochs"):
            value = getattr(self.args, name, None)
            if isinstance(value, (int, float)) and value > 0:
                setattr(state, name, value)
        self._call("on_init_end")
        self._call("on_train_begin")
        return self._save()

    def on_evaluate(self, metrics: dict[str, Any]) -> str | None:
        self._at(metrics)
        self._call("on_evaluate", metrics=dict(metrics))
        return self._save()

    def on_log(self, record: dict[str, Any]) -> str | None:
        self._at(record)
        logs = dict(record)
        if "lr" in logs:
            logs.setdefault("learning_rate", logs["lr"])
        self.state.log_history.append(logs)
        self._call("on_log", logs=logs)
        return self._save()

    def on_save(self, checkpoint_dir: Any) -> None:
        self._call("on_save")
        self.control.should_save = False  # this step is saved

    def on_step_end(self, record: dict[str, Any]) -> bool | str | None:
        self._at(record)
        self._call("on_step_end")
        return True if self.control.should_training_stop else self._save()

    def on_train_end(self, result: Any) -> None:
        self._call("on_train_end")
