"""Mix sources by weight and hold out a validation split, deterministically under a seed.

Weights (per source, applied to its usable examples):

- None: the whole source, once;
- a float <= 1.0: that fraction of it, sampled without replacement (at least one example);
- an integer > 1 (or an integral float such as 3.0): exactly that many examples, the whole source
  repeated as often as it fits and the rest sampled without replacement.

A selection is a list of example indices per source (repeats allowed). Every source draws from its
own generator seeded by (seed, source position), so adding a source does not change the others.
"""

from __future__ import annotations

import random

from sftlab.data.types import DataError

Selection = list[list[int]]  # per source, indices of its examples (with repeats)


def check_weight(weight: float | int | None, name: str) -> None:
    """Reject weights that are neither a fraction <= 1.0 nor a whole count."""
    if weight is None:
        return
    if weight <= 0:
        raise DataError(f"data source {name}: weight must be > 0, got {weight}")
    if weight > 1 and float(weight) != int(weight):
        raise DataError(f"data source {name}: weight {weight} is neither a fraction <= 1.0 nor a whole "
                        "number of examples")


def select(n: int, weight: float | int | None, rng: random.Random) -> list[int]:
    """Indices of the examples a source contributes (see the module docstring for the rules)."""
    if weight is None or n == 0 or weight == 1:
        return list(range(n))
    if weight < 1:
        return sorted(rng.sample(range(n), max(1, round(n * weight))))
    count = int(weight)
    full, rest = divmod(count, n)
    return list(range(n)) * full + sorted(rng.sample(range(n), rest))


def mix(sizes: list[int], weights: list[float | int | None], seed: int) -> Selection:
    """Per-source selections for sources of `sizes` examples with `weights`."""
    return [select(n, w, random.Random(f"mix:{seed}:{i}")) for i, (n, w) in enumerate(zip(sizes, weights))]


def hold_out(selection: Selection, fraction: float, seed: int) -> tuple[Selection, Selection]:
    """Split a selection into (train, eval): `fraction` of its distinct examples go to eval.

    Held-out examples leave the training side with all their repeats, so the two never share an
    example. Eval takes each held-out example once; at least one when `fraction` > 0.
    """
    distinct = sorted({(s, i) for s, picks in enumerate(selection) for i in picks})
    if fraction <= 0 or not distinct:
        return selection, [[] for _ in selection]
    rng = random.Random(f"eval:{seed}")
    held = set(rng.sample(distinct, max(1, round(len(distinct) * fraction))))
    train = [[i for i in picks if (s, i) not in held] for s, picks in enumerate(selection)]
    evals = [sorted({i for i in picks if (s, i) in held}) for s, picks in enumerate(selection)]
    return train, evals
