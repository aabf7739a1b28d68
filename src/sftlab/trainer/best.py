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

from sftlab.trainer.checkpoint import checkpoint_root
from sftlab.trainer.resume import trainable_only_checkpoints
from sftlab.trainer.rundir import RunError


def check_metric(run: Any) -> None:
    """Before training: the setting needs eval data, and the metric must be one the run will log."""
    cfg = run.cfg.train
    if not cfg.load_best_model_at_end:
        return
    if not len(run.data.eval):
        raise RunError("train.load_best_model_at_end needs eval data (data.eval or data.eval_fraction)")
    known = ["eval_loss", *(f"eval/{name}_loss" for name in run.data.eval_sets)]
    if cfg.metric_for_best not in known:
        raise RunError(
            f"train.metric_for_best: {cfg.metric_for_best!r} is not logged by this run; "
            f"it logs {', '.join(known)}"
        )


def best_step(history: list[dict[str, Any]], metric: str) -> tuple[int, float] | None:
    """(step, value) of the lowest `metric` in the history (the earliest on ties), None before any eval."""
    scored = [(r[metric], r["step"]) for r in history if r.get(metric) is not None]
    if not scored:
        return None
    value, step = min(scored)
    return step, value


def due(run: Any, record: dict[str, Any]) -> bool:
    """A checkpoint is due at every evaluation before the last step (the last step's model is saved anyway)."""
    cfg = run.cfg.train
    return (
        cfg.load_best_model_at_end
        and cfg.metric_for_best in record
        and record["step"] < run.resolved.total_steps
    )


def protected(run: Any) -> str | None:
    """The checkpoint directory name rotation must keep: the best step's."""
    if not run.cfg.train.load_best_model_at_end:
        return None
    best = best_step(run.result.history, run.cfg.train.metric_for_best)
    return f"step-{best[0]:08d}" if best else None


def restore_best(run: Any) -> None:
    """At the end of a finished run: the best step's weights back in the model (from its checkpoint)."""
    cfg = run.cfg.train
    best = best_step(run.result.history, cfg.metric_for_best) if cfg.load_best_model_at_end else None
    if best is None or best[0] == run.resolved.total_steps:
        return
    ckpt = checkpoint_root(run.out) / f"step-{best[0]:08d}"
    # the weights (and fp32 masters): nothing after this step reads the optimizer, scheduler or RNG (sharded
    # engines' weights are engine shards: read as a resume does)
    run.engine.load_weights(
        ckpt, run.scheduler, run.optimizer, trainable_only=trainable_only_checkpoints(run)
    )
    run.result.best_step = best[0]
    if run.main:
        run.console.print(
            f"[bold]best model[/bold]: step {best[0]} ({cfg.metric_for_best} {best[1]:.4f}), restored "
            f"from {ckpt} (train.load_best_model_at_end)",
            highlight=False,
        )
