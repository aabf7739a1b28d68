"""What a run trains with (`Components`): the engine, the model, its optimizer and schedule, the data and
its micro-batch stream, the objective, the callbacks, and the run's log and result.

Each part is built by the module that owns it; `build_components` (trainer/setup.py) calls them in the
order each needs the one before. The recipe (trainer/loop.py) hands each phase the parts it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from sftlab.data.collate import MicroBatchStream
from sftlab.trainer.callbacks import CallbackList
from sftlab.trainer.data import RunData
from sftlab.trainer.distributed import Engine
from sftlab.trainer.metrics import MetricsLog
from sftlab.trainer.objective import Objective
from sftlab.trainer.run import TrainResult
from sftlab.trainer.throughput import FlopCounter


@dataclass
class Components:
    """The parts of one run; the model and optimizer as the engine prepared them."""

    engine: Engine  # the engine the run is spread over, with its Accelerator (trainer/distributed.py)
    console: Console
    data: RunData  # tokenizer, template, train/eval sets, the units and their collate (trainer/data.py)
    match_examples: list  # match_eval's (prompt, reference) pairs ([] without match_eval)
    objective: Objective  # with the run's loss function attached (trainer/objective.py, trainer/run_model.py)
    callbacks: CallbackList  # the user's, the trackers and the report (trainer/callbacks.py)
    model: Any  # prepared by the engine (wrapped; compiled when train.compile decided so)
    optimizer: Any  # fp32 masters for low-precision weights (trainer/optim.py)
    scheduler: Any  # the LR schedule (trainer/optim.py)
    stream: MicroBatchStream  # the micro-batches' indices, epoch after epoch (trainer/data.py)
    flops: FlopCounter  # model FLOPs of a step (trainer/throughput.py)
    result: TrainResult  # what the run returns, filled in as it trains: history, evaluations, how it ended
    metrics: MetricsLog | None = None  # metrics.jsonl, opened with the run log (trainer/outputs.py)

    @property
    def accelerator(self) -> Accelerator:
        return self.engine.accelerator
