"""What one run holds while it trains (`Run`), and what it returns (`TrainResult`).

Each phase of the recipe (trainer/loop.py) fills in its part of `Run`: setup (trainer/setup.py) the
accelerator, data, model, optimizer and stream, and what it resolved (`Run.resolved`, a frozen
trainer/resolved.py: Resolved); resume (trainer/resume.py) the position; the loop the history. `TrainResult` is what `run_training` and `sftlab.train` return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from sftlab.config.schema import SFTConfig
from sftlab.data.collate import MicroBatchStream
from sftlab.model.generate import MatchResult
from sftlab.trainer.callbacks import CallbackList
from sftlab.trainer.control import StopRequest
from sftlab.trainer.data import RunData
from sftlab.trainer.distributed import Engine
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.metrics import MetricsLog
from sftlab.trainer.objective import Objective, SFTObjective
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.throughput import FlopCounter


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None = None
    match_before: MatchResult | None = None
    match_after: MatchResult | None = None
    history: list[dict] = field(default_factory=list)
    completed_before: bool = False  # train.resume=auto found the run finished: nothing was trained
    eval_losses: dict[str, float] = field(
        default_factory=dict
    )  # the last eval/<name>_loss of each named eval set
    stopped: str | None = (
        None  # a callback asked the run to stop (which one, at which step): resume=auto continues
    )
    best_step: int | None = None  # train.load_best_model_at_end restored this step's weights before saving
    hub_url: str | None = None  # train.push_to_hub: the commit the run was uploaded in
    push_error: str | None = None  # train.push_to_hub failed after training (the local run is complete)


@dataclass
class Run:
    """What one run holds; each phase fills in its part."""

    cfg: SFTConfig
    console: Console
    accelerator: Accelerator
    out: Path
    resume_from: Path | None
    result: TrainResult
    inputs: RunInputs = field(default_factory=RunInputs)
    objective: Objective = field(default_factory=SFTObjective)
    callbacks: CallbackList = field(default_factory=CallbackList)
    data: RunData | None = None
    match_examples: list = field(default_factory=list)
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    stream: MicroBatchStream | None = None
    start_step: int = 0
    consumed: int = 0  # micro-batches taken from the stream so far
    fingerprint: str | None = None
    logged_steps: list[int] = field(default_factory=list)  # steps written to metrics.jsonl
    metrics: MetricsLog | None = None
    stop: StopRequest | None = None
    model_path: str | None = None  # the base model's path when setup resolved it (model.dtype: auto)
    resume_state: Any = None  # the TrainerState of resume_from, read once at setup
    flops: FlopCounter | None = None
    step_times: list[float] = field(default_factory=list)  # seconds of each step this process ran
    resume_command: str = ""  # printed when a signal stops the run
    engine: Engine | None = None  # the engine the run is spread over: Engine.of(accelerator) unless given
    resolved: Resolved | None = None  # every decision made before training (trainer/resolved.py)

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = Engine.of(self.accelerator)
        if self.resolved is None:
            mixed = str(self.accelerator.mixed_precision)
            self.resolved = Resolved(mixed, "as Accelerate runs", self.engine.name, self.world)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes
