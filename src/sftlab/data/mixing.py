"""Mix sources by weight and hold out a validation split, deterministically under a seed.

Weights (per source, applied to its usable examples):

- None: the whole source, once;
- a float <= 1.0: that fraction of it, sampled without replacement (at least one example);
- an integer > 1 (or an integral float such as 3.0): exactly that many examples, the whole source
  repeated as often as it fits and the rest sampled without replacement.

A selection is an int64 array of example indices per source (repeats allowed). Every source draws
from its own generator seeded by (seed, source position), so adding a source does not change the
others. Everything works on index arrays: a million examples cost a few megabytes here.
"""

from __future__ import annotations

import random

import numpy as np

from sftlab.data.types import DataError

Selection = list[np.ndarray]  # per source, indices of its examples (with repeats)


def check_weight(weight: float | int | None, name: str) -> None:
    """Reject weights that are neither a fraction <= 1.0 nor a whole count."""
    if weight is None:
        return
    if weight <= 0:
        raise DataError(f"data source {name}: weight must be > 0, got {weight}")
    if weight > 1 and float(weight) != int(weight):
        raise DataError(
            f"data source {name}: weight {weight} is neither a fraction <= 1.0 nor a whole number of examples"
        )


def select(n: int, weight: float | int | None, rng: random.Random) -> np.ndarray:
    """Indices of the examples a source contributes (see the module docstring for the rules)."""
    if weight is None or n == 0 or weight == 1:
        return np.arange(n, dtype=np.int64)
    if weight < 1:
        return np.sort(np.asarray(rng.sample(range(n), max(1, round(n * weight))), dtype=np.int64))
    count = int(weight)
    full, rest = divmod(count, n)
    return np.concatenate(
        [
            np.tile(np.arange(n, dtype=np.int64), full),
            np.sort(np.asarray(rng.sample(range(n), rest), dtype=np.int64)),
        ]
    )


def mix(sizes: list[int], weights: list[float | int | None], seed: int) -> Selection:
    """Per-source selections for sources of `sizes` examples with `weights`."""
    return [select(n, w, random.Random(f"mix:{seed}:{i}")) for i, (n, w) in enumerate(zip(sizes, weights))]


def hold_out(selection: Selection, fraction: float, seed: int) -> tuple[Selection, Selection]:
    """Split a selection into (train, eval): `fraction` of its distinct examples go to eval.

    Held-out examples leave the training side with all their repeats, so the two never share an
    example. Eval takes each held-out example once, in index order; at least one when `fraction` > 0.
    The distinct examples are ordered by (source, index) and sampled by position.
    """
    distinct = [np.unique(picks) for picks in selection]
    total = sum(len(d) for d in distinct)
    if fraction <= 0 or not total:
        return selection, [np.zeros(0, dtype=np.int64) for _ in selection]
    rng = random.Random(f"eval:{seed}")
    held_pos = np.zeros(total, dtype=bool)
    held_pos[rng.sample(range(total), max(1, round(total * fraction)))] = True
    train, evals, base = [], [], 0
    for picks, d in zip(selection, distinct):
        is_held = np.zeros(int(d[-1]) + 1 if len(d) else 0, dtype=bool)
        is_held[d] = held_pos[base : base + len(d)]
        base += len(d)
        train.append(picks[~is_held[picks]] if len(picks) else picks)
        evals.append(d[is_held[d]] if len(d) else d)
    return train, evals
