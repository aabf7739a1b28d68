"""What a run returns: `TrainResult`, what `run_training` (trainer/loop.py) and `sftlab.train` give back.

The recipe keeps it among its components (trainer/components.py) while it trains: the history of step
records, the evaluations, the match results and how the run ended are written into it as they happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sftlab.model.generate import MatchResult


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
