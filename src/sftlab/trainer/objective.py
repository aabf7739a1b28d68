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
!= -100) over their count (`train.loss_normalization: tokens`). The seeds' other normalisations:
`micro_batch_mean` (each micro-batch's mean over its own targets, averaged over the step's micro-batches
on every rank: HALOs, TRL before 0.13, CS336's handout) and `sequence_mean` (each sequence's mean over its
own targets, averaged over the step's sequences; a packed row's documents are sequences of their own).
Evaluation always reports the token mean (`evaluation()`), whatever the training normalisation. Its per-batch sum comes from the run's loss function (`attach`): the
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
from sftlab.errors import SftlabError
from sftlab.model.loss import batch_targets, count_targets, full_nll

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]  # (model, micro-batch) -> summed NLL
NORMALISATIONS = ("tokens", "micro_batch_mean", "sequence_mean")
UNITS = {"tokens": "target_tokens", "micro_batch_mean": "micro_batches", "sequence_mean": "sequences"}


def sequence_ids(batch: Batch) -> torch.Tensor:
    """[B, T] ids of the sequence each position belongs to: one per row, or, in a packed row
    (`position_ids` restarting at 0), one per document."""
    labels = batch["labels"]
    rows = torch.arange(labels.size(0), device=labels.device)[:, None] * (labels.size(1) + 1)
    if "position_ids" not in batch:
        return rows.expand_as(labels)
    return rows + torch.cumsum(batch["position_ids"] == 0, dim=1)


def sequence_weights(batch: Batch) -> tuple[torch.Tensor, int]:
    """(weights aligned with the labels: 1 / the target count of the target's sequence, 0 elsewhere;
    the number of sequences with a target). The first position is never a target."""
    targets = batch["labels"] != IGNORE_INDEX
    targets[:, 0] = False
    ids = sequence_ids(batch)[targets]
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    weights = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    weights[targets] = 1.0 / counts[inverse].float()
    return weights, len(counts)


class Objective(Protocol):
    def attach(self, loss_fn: LossFn) -> None: ...
    def loss_sum(self, model, batch: Batch) -> torch.Tensor: ...
    def normaliser(self, batch: Batch) -> int: ...
    def filler(self, batch: Batch) -> Batch: ...
    def record(self, loss_sum: float, normaliser: int, prefix: str = "") -> dict[str, Any]: ...


class SFTObjective:
    """Mean next-token NLL over every target token of the optimizer step (all micro-batches, all ranks)."""

    name = "sft"

    def __init__(self, loss_fn: LossFn | None = None, normalization: str = "tokens"):
        if normalization not in NORMALISATIONS:
            raise SftlabError(
                f"train.loss_normalization: {normalization!r}; expected one of {NORMALISATIONS}"
            )
        self.loss_fn: LossFn = loss_fn or full_nll
        self.normalization = normalization

    def attach(self, loss_fn: LossFn) -> None:
        """The run's summed-NLL function for a micro-batch (the target-only head or full logits)."""
        self.loss_fn = loss_fn

    def evaluation(self) -> SFTObjective:
        """The same objective for evaluation: the token mean over the eval set, whatever the training
        normalisation (an eval loss compares across runs and batch sizes only that way)."""
        return self if self.normalization == "tokens" else SFTObjective(self.loss_fn)

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        """The micro-batch's summed NLL; `micro_batch_mean`: divided by its own target count;
        `sequence_mean`: each target weighted by 1 / its sequence's target count."""
        inputs = model_inputs(batch)
        if self.normalization == "sequence_mean":
            if not getattr(self.loss_fn, "weighs_targets", False):
                raise SftlabError(
                    "train.loss_normalization: sequence_mean needs a loss function that honours "
                    "batch['target_weights'] (sftlab's own; this run's is "
                    f"{getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)})"
                )
            inputs = {**inputs, "target_weights": sequence_weights(inputs)[0]}
        total = self.loss_fn(model, inputs)
        if self.normalization == "micro_batch_mean":
            n = count_targets(batch["labels"])
            total = total / n if n else total
        return total

    def normaliser(self, batch: Batch) -> int:
        """tokens: the target count; micro_batch_mean: 1 (0 without a target); sequence_mean: the
        number of sequences with a target."""
        n = batch_targets(batch)
        if self.normalization == "tokens" or not n:
            return n
        if self.normalization == "micro_batch_mean":
            return 1
        return sequence_weights(model_inputs(batch))[1]

    def filler(self, batch: Batch) -> Batch:
        labels = batch["labels"].clone().fill_(IGNORE_INDEX)
        return {**batch, "labels": labels}

    def record(self, loss_sum: float, normaliser: int, prefix: str = "") -> dict[str, Any]:
        """{"loss", "target_tokens"} for a training step (the unit of another normalisation instead:
        "micro_batches" or "sequences"); {"<prefix>loss"} for an evaluation."""
        loss = loss_sum / normaliser if normaliser else float("nan")
        if prefix:
            return {f"{prefix}loss": loss}
        return {"loss": loss, UNITS[self.normalization]: normaliser}
