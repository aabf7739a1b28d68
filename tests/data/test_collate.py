"""Micro-batch order: fixed sizes or token budgets, seeded per epoch, resumable from a position; the
padded layout of examples and of groups of sequences."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from sftlab.data.collate import MicroBatchStream, model_inputs, pad_collate, token_budget_batches
from sftlab.data.types import IGNORE_INDEX, TokenGroup, TokenizedExample


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 200) for _ in range(n)]


@pytest.mark.parametrize("budget", [200, 512, 1024])
def test_token_budget_batches_cover_every_unit_within_budget(budget):
    lengths = lengths_of(300)
    order = list(range(300))
    random.Random(1).shuffle(order)
    batches = token_budget_batches(order, lengths, budget, window=64)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= budget
    # length grouping keeps padding low: far below what random grouping of the same sizes gives
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths) / padded > 0.8


def test_a_unit_over_budget_gets_its_own_batch():
    batches = token_budget_batches([0, 1, 2], [50, 500, 40], 100)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_token_budget_stream_is_seeded_and_resumable():
    lengths = lengths_of(120)
    a = MicroBatchStream(120, 0, seed=3, lengths=lengths, global_tokens=600)
    first = list(itertools.islice(iter(a), 2 * a.batches_per_epoch + 5))
    assert (
        first[: a.batches_per_epoch] != first[a.batches_per_epoch : 2 * a.batches_per_epoch]
    )  # new order per epoch
    assert sorted(i for b in first[: a.batches_per_epoch] for i in b) == list(range(120))
    b = MicroBatchStream(120, 0, seed=3, lengths=lengths, global_tokens=600)
    head = list(itertools.islice(iter(b), 7))
    resumed = MicroBatchStream(
        120, 0, seed=3, lengths=lengths, global_tokens=600, epoch=b.epoch, index=b.index
    )
    assert head + list(itertools.islice(iter(resumed), len(first) - 7)) == first
    other = MicroBatchStream(120, 0, seed=4, lengths=lengths, global_tokens=600)
    assert list(itertools.islice(iter(other), 5)) != first[:5]


def test_token_budget_needs_lengths():
    with pytest.raises(ValueError, match="length of every unit"):
        MicroBatchStream(10, 0, seed=0, global_tokens=100)


def test_groups_are_laid_out_as_their_members_rows_with_the_group_layout():
    a, b, c = (
        TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]),
        TokenizedExample([5, 8], [IGNORE_INDEX, 8]),
        TokenizedExample([9], [9]),
    )
    groups = [
        TokenGroup((a, b), {"weight": np.float32(0.5)}),
        TokenGroup((c, a, b), {"weight": np.float32(2)}),
    ]
    batch = pad_collate(groups, pad_id=0)
    rows = pad_collate([a, b, c, a, b], pad_id=0)  # the members, group after group, padded as examples are
    assert all(torch.equal(batch[k], rows[k]) for k in rows)
    assert batch["group_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["group_member"].tolist() == [0, 1, 0, 1, 2]
    assert batch["group_weight"].dtype == torch.float32 and batch["group_weight"].tolist() == [0.5, 2.0]
    assert list(model_inputs(batch)) == ["input_ids", "attention_mask", "labels"]
    # examples of one sequence: today's batch, no group key
    assert list(pad_collate([a, b], pad_id=0)) == ["input_ids", "attention_mask", "labels"]
    with pytest.raises(ValueError, match="same side arrays"):
        pad_collate([groups[0], TokenGroup((a,))], pad_id=0)


def test_a_position_moves_to_another_micro_batch_size():
    """Resume on another world size: 4 micro-batches of 3 units taken = 12 units = 6 micro-batches of 2;
    the next micro-batches continue the same epoch order."""
    a, b = MicroBatchStream(20, 3, seed=5), MicroBatchStream(20, 2, seed=5)
    it = iter(a)
    taken = [next(it) for _ in range(4)]
    b.load_state(a.state(), saved_units=3)
    assert (b.epoch, b.index, b.left_in_epoch) == (0, 6, 4)
    rest = [i for batch in b.batches(0)[6:] for i in batch]
    assert sorted(rest + [i for batch in taken for i in batch]) == list(range(20))
    with pytest.raises(ValueError, match="not a multiple of this stream's 5 units"):
        MicroBatchStream(20, 5, seed=5).load_state({"epoch": 0, "index": 1, "seed": 5}, saved_units=3)
