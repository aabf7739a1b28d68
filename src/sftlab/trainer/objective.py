"""What a run computes from a batch: the objective seam between the data and the training loop.

An objective owns four things, and the loop (trainer/loop.py), evaluation (trainer/evaluate.py,
`sftlab eval`) and the step record ask it for them instead of knowing them:

- `loss_sum(model, batch)`: the batch's contribution to the step's loss, as a SUM (a tensor that
  back-propagates);
- `normaliser(batch)`: what that sum is divided by, summed over every micro-batch of the optimizer
  step and every rank before any division (so gradient accumulation and several processes give the
  gradient of one big batch);
- `filler(batch)`: a copy of a batch that contributes nothing (a rank left without data in a short
  last step still runs a forward/backward, so the engines stay in step);
- `record(loss_sum, normaliser, prefix)`: the keys a step record (or an eval result) carries.

`SFTObjective` is supervised fine-tuning: the summed next-token NLL of the target tokens (labels
!= -100) over their count. Its per-batch sum comes from the run's loss function (`attach`): the
target-only head (model/loss.py, `TargetLossHead`) or the full logits (`full_nll`).

A new objective is a class with these methods, handed to `sftlab.train(..., objective=...)`;
docs/architecture.md has a worked example (checked by tests/trainer/test_objective.py).

Examples of several sequences (data/store.py: a group, e.g. a chosen and a rejected answer) reach the
objective as one padded batch of their members plus the group layout (data/collate.py: `group_index`,
`group_member`, one `group_<name>` per side array). Those keys are not model inputs: an objective hands
the model `model_inputs(batch)`. SFT does, so over groups it trains on every member (a group of one is
an SFT example: its batch has no group keys). tests/trainer/test_pairwise_objective.py trains a
preference loss on pairs through this seam, the loop unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from sftlab.data.collate import model_inputs
from sftlab.data.types import IGNORE_INDEX
from sftlab.model.loss import count_targets, full_nll

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]  # (model, micro-batch) -> summed NLL


class Objective(Protocol):
    def attach(self, loss_fn: LossFn) -> None: ...
    def loss_sum(self, model, batch: Batch) -> torch.Tensor: ...
    def normaliser(self, batch: Batch) -> int: ...
    def filler(self, batch: Batch) -> Batch: ...
    def record(self, loss_sum: float, normaliser: int, prefix: str = "") -> dict[str, Any]: ...


class SFTObjective:
    """Mean next-token NLL over every target token of the optimizer step (all micro-batches, all ranks)."""

    name = "sft"

    def __init__(self, loss_fn: LossFn | None = None):
        self.loss_fn: LossFn = loss_fn or full_nll

    def attach(self, loss_fn: LossFn) -> None:
        """The run's summed-NLL function for a micro-batch (the target-only head or full logits)."""
        self.loss_fn = loss_fn

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        return self.loss_fn(model, model_inputs(batch))

    def normaliser(self, batch: Batch) -> int:
        return count_targets(batch["labels"])

    def filler(self, batch: Batch) -> Batch:
        labels = batch["labels"].clone().fill_(IGNORE_INDEX)
        return {**batch, "labels": labels}

    def record(self, loss_sum: float, normaliser: int, prefix: str = "") -> dict[str, Any]:
        """{"loss", "target_tokens"} for a training step; {"<prefix>loss"} for an evaluation."""
        loss = loss_sum / normaliser if normaliser else float("nan")
        if prefix:
            return {f"{prefix}loss": loss}
        return {"loss": loss, "target_tokens": normaliser}
