"""What a run takes besides its config: objects only the Python API can pass (sftlab/api.py).

`RunInputs` carries a model object and tokenizer, in-memory datasets (train; eval, optionally
named), a formatting function, callbacks and an objective into `run_training` and
`prepare_run_data`. The CLI passes none of them (an empty `RunInputs`), so a YAML run and a script
go through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sftlab.compat import datasets as datasets_compat


@dataclass
class RunInputs:
    model: Any = None  # a PreTrainedModel (the base) or a PeftModel (its adapter continues)
    tokenizer: Any = None  # default: the model's own (model.name_or_path)
    train_sources: list[Any] = field(
        default_factory=list
    )  # Dataset / DatasetSource / SourceConfig, after data.train
    eval_sources: list[Any] = field(default_factory=list)  # after data.eval; named ones get eval/<name>_loss
    formatting_func: Callable[[dict], Any] | None = None  # row -> messages | {prompt, completion} | text
    callbacks: list[Any] = field(default_factory=list)  # trainer/callbacks.py
    objective: Any = None  # trainer/objective.py; None: SFTObjective
    compute_metrics: Callable[[Any], dict] | None = None  # transformers' compute_metrics(EvalPrediction)
    preprocess_logits: Callable[[Any, Any], Any] | None = (
        None  # preprocess_logits_for_metrics(logits, labels)
    )

    def describe(self) -> dict[str, Any]:
        """What the run records of these (run.json): names and sizes, never the objects."""
        return {
            "model_object": type(self.model).__name__ if self.model is not None else None,
            "train_datasets": [_describe(s) for s in self.train_sources],
            "eval_datasets": [_describe(s) for s in self.eval_sources],
            "formatting_func": getattr(self.formatting_func, "__qualname__", None)
            if self.formatting_func
            else None,
            "callbacks": [getattr(c, "name", None) or type(c).__name__ for c in self.callbacks],
            "objective": type(self.objective).__name__ if self.objective is not None else "SFTObjective",
            "compute_metrics": getattr(self.compute_metrics, "__qualname__", None)
            if self.compute_metrics
            else None,
        }


def _describe(spec: Any) -> dict[str, Any]:
    ds = getattr(spec, "dataset", spec)
    return {
        "name": getattr(spec, "name", None),
        "type": type(ds).__name__,
        "rows": len(ds) if hasattr(ds, "__len__") else None,
        "fingerprint": datasets_compat.fingerprint(ds),
    }
