"""Turn tokenized examples into model-ready tensors, and order them into micro-batches.

`pad_collate` right-pads a micro-batch and returns an attention mask. `MicroBatchStream` yields
micro-batches forever, one seeded permutation per epoch, and knows its position (epoch, batch
index within the epoch) so a run can be resumed exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from sftlab.data.types import IGNORE_INDEX, TokenizedExample


def pad_collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class MicroBatchStream:
    """Endless micro-batches of example indices: epoch after epoch, each in its own seeded order."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 epoch: int = 0, index: int = 0):
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.epoch, self.index = epoch, index  # index = micro-batches already taken in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch = [], None
        while True:
            if order_epoch != self.epoch:
                order, order_epoch = epoch_order(self.num_examples, self.seed, self.epoch, self.shuffle), self.epoch
            start = self.index * self.batch_size
            batch = order[start:start + self.batch_size]
            self.index += 1
            if self.index == self.batches_per_epoch:  # the epoch ends with this batch: position = next epoch
                self.epoch, self.index = self.epoch + 1, 0
            yield batch
