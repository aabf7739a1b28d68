"""train.load_best_model_at_end: which evaluated step was best, keeping its checkpoint, and bringing it back.

With the setting on, every evaluation before the last step also saves a checkpoint (`due`), rotation
never deletes the best one (`protected`), and when the run ends the best step's weights are restored
from its checkpoint (`restore_best`: the weights, and the fp32 master weights a bf16 run keeps; not the
optimizer moments, scheduler or RNG, which nothing reads after the last step) before the final model is
saved, so output_dir holds the best model, not the last. "Best" is the lowest `train.metric_for_best`
(eval_loss, or a named set's eval/<name>_loss) in the run's history; the history survives resume, so a
resumed run picks the same step.
"""

from __future__ import annotations

from typing import Any

from sftlab.config.schema import TrainConfig
from sftlab.trainer.checkpoint import checkpoint_root
from sftlab.trainer.components import Components
from sftlab.trainer.data import RunData
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.resume import trainable_only_checkpoints
from sftlab.trainer.rundir import RunError


def check_metric(train: TrainConfig, data: RunData) -> None:
    """Before training: the setting needs eval data, and the metric must be one the run will log."""
    if not train.load_best_model_at_end:
        return
    if not len(data.eval):
        raise RunError("train.load_best_model_at_end needs eval data (data.eval or data.eval_fraction)")
    known = ["eval_loss", *(f"eval/{name}_loss" for name in data.eval_sets)]
    if train.metric_for_best not in known:
        raise RunError(
            f"train.metric_for_best: {train.metric_for_best!r} is not logged by this run; "
            f"it logs {', '.join(known)}"
        )


def best_step(history: list[dict[str, Any]], metric: str) -> tuple[int, float] | None:
    """(step, value) of the lowest `metric` in the history (the earliest on ties), None before any eval."""
    scored = [(r[metric], r["step"]) for r in history if r.get(metric) is not None and r["step"] > 0]
    if not scored:
        return None
    value, step = min(scored)
    return step, value


def due(train: TrainConfig, record: dict[str, Any], total_steps: int) -> bool:
    """A checkpoint is due at every evaluation before the last step (the last step's model is saved anyway)."""
    return train.load_best_model_at_end and train.metric_for_best in record and record["step"] < total_steps


def protected(train: TrainConfig, history: list[dict[str, Any]]) -> str | None:
    """The checkpoint directory name rotation must keep: the best step's."""
    if not train.load_best_model_at_end:
        return None
    best = best_step(history, train.metric_for_best)
    return f"step-{best[0]:08d}" if best else None


def restore_best(resolved: Resolved, parts: Components) -> None:
    """At the end of a finished run: the best step's weights back in the model (from its checkpoint)."""
    train = resolved.cfg.train
    best = best_step(parts.result.history, train.metric_for_best) if train.load_best_model_at_end else None
    if best is None or best[0] == resolved.total_steps:
        return
    ckpt = checkpoint_root(resolved.output_dir) / f"step-{best[0]:08d}"
    # the weights (and fp32 masters): nothing after this step reads the optimizer, scheduler or RNG (sharded
    # engines' weights are engine shards: read as a resume does)
    trainable_only = trainable_only_checkpoints(parts.engine, resolved.cfg)
    parts.engine.load_weights(ckpt, parts.scheduler, parts.optimizer, trainable_only=trainable_only)
    parts.result.best_step = best[0]
    if resolved.main:
        parts.console.print(
            f"[bold]best model[/bold]: step {best[0]} ({train.metric_for_best} {best[1]:.4f}), restored "
            f"from {ckpt} (train.load_best_model_at_end)",
            highlight=False,
        )
