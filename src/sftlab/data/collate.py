"""Turn tokenized examples into model-ready tensors, and order them into micro-batches.

`pad_collate` right-pads a micro-batch and returns an attention mask. `MicroBatchStream` yields
micro-batches forever, one seeded permutation per epoch (fixed row counts, or token budgets with
length grouping), and knows its position (epoch, batch index within the epoch) so a run can be
resumed exactly.

A micro-batch of examples of one sequence (`TokenizedExample`, SFT) is `input_ids`, `attention_mask`
and `labels`, one row per example. A micro-batch of groups (`TokenGroup`: k >= 1 sequences per example
and its side values, data/store.py) is laid out as one padded batch whose rows are the MEMBERS, group
after group, in their order within the group (e.g. chosen, rejected), plus the group layout:

    input_ids, attention_mask, labels  [rows, longest row]   exactly as for single sequences
    group_index   int64 [rows]     which example of the micro-batch (0, 1, ...) each row belongs to
    group_member  int64 [rows]     the row's place in its example (0 = its first sequence)
    group_<name>  [examples]       each side array, one value per example (e.g. `group_weight`)

so one forward pass serves every member. The keys starting with `group_` (`GROUP_PREFIX`) are not
model inputs: an objective for groups reads them and hands the model `model_inputs(batch)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sftlab.data.types import IGNORE_INDEX, TokenGroup, TokenizedExample

GROUP_PREFIX = "group_"  # the batch keys of the group layout (group_index, group_member, side arrays)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its group layout keys: what the model (and the labels' loss) reads."""
    return {k: v for k, v in batch.items() if not k.startswith(GROUP_PREFIX)}


def pad_collate(
    examples: Sequence[TokenizedExample] | Sequence[TokenGroup], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask; groups as their members' rows plus the group layout."""
    if examples and isinstance(examples[0], TokenGroup):
        return group_collate(examples, pad_id)
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


def group_collate(groups: Sequence[TokenGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """The members of every group as padded rows, group after group, with `group_index`,
    `group_member` and one `group_<name>` tensor per side array (see the module docstring)."""
    names = sorted(groups[0].side)
    if any(sorted(g.side) != names for g in groups):
        raise ValueError(f"groups of one micro-batch must carry the same side arrays, the first has {names}")
    batch = pad_collate([m for g in groups for m in g.members], pad_id)
    sizes = torch.tensor([len(g.members) for g in groups], dtype=torch.long)
    batch[GROUP_PREFIX + "index"] = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    batch[GROUP_PREFIX + "member"] = torch.cat([torch.arange(int(n)) for n in sizes])
    for name in names:
        batch[GROUP_PREFIX + name] = torch.as_tensor(np.asarray([g.side[name] for g in groups]))
    return batch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def token_budget_batches(
    order: Sequence[int], lengths: Sequence[int], max_tokens: int, window: int = 512
) -> list[list[int]]:
    """Cut `order` into micro-batches whose padded size (rows x longest row) stays within `max_tokens`.

    Length grouping: each window of `window` consecutive units of the (shuffled) order is sorted by
    length, longest first, then filled greedily, so rows of similar length share a micro-batch and
    little padding is added; which units meet stays random across windows and epochs. A unit longer
    than the budget gets a micro-batch of its own.
    """
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(
            order[start : start + window], key=lambda i: -lengths[i]
        )  # stable: ties keep their order
        batch: list[int] = []
        for i in chunk:
            if batch and (len(batch) + 1) * lengths[batch[0]] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return batches


class MicroBatchStream:
    """Endless micro-batches of example indices: epoch after epoch, each in its own seeded order.

    The stream is global: one of its micro-batches is the step's micro-batch of every rank together,
    split among ranks afterwards. Fixed-size micro-batches of `global_units` units (micro_batch_size x
    world size), or, with `global_tokens` (micro_batch_tokens x world size) and the units' `lengths`,
    token-budget micro-batches (`token_budget_batches`) in a seeded order. Either way the position
    (epoch, micro-batches taken in it) identifies the next micro-batch exactly, for resume.

    An optimizer step takes `grad_accum_steps` micro-batches, or what is left of the epoch (`left_in_epoch`):
    a step never spans two epochs, so with fixed-size micro-batches the examples of each step are the
    step's slice of the epoch's order, whatever the world size and accumulation that cut it
    (`load_state` moves a position to another micro-batch size: resume on another world size).
    """

    def __init__(
        self,
        num_examples: int,
        global_units: int,
        seed: int,
        shuffle: bool = True,
        epoch: int = 0,
        index: int = 0,
        lengths: Sequence[int] | None = None,
        global_tokens: int | None = None,
    ):
        if global_tokens is not None and (lengths is None or len(lengths) != num_examples):
            raise ValueError("token-budget micro-batches need the length of every unit")
        self.num_examples, self.global_units, self.seed, self.shuffle = (
            num_examples,
            global_units,
            seed,
            shuffle,
        )
        self.lengths, self.global_tokens = lengths, global_tokens
        self.epoch, self.index = epoch, index  # index = micro-batches already taken in this epoch
        self._cached: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch`, in order."""
        if self._cached is None or self._cached[0] != epoch:
            order = epoch_order(self.num_examples, self.seed, epoch, self.shuffle)
            if self.global_tokens is None:
                batches = [order[i : i + self.global_units] for i in range(0, len(order), self.global_units)]
            else:
                batches = token_budget_batches(order, self.lengths, self.global_tokens)
                if self.shuffle:  # the sorted windows must not put long batches first every epoch
                    g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919)
                    batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
            self._cached = (epoch, batches)
        return self._cached[1]

    @property
    def batches_per_epoch(self) -> int:
        if self.global_tokens is None:
            return -(-self.num_examples // self.global_units)
        return len(self.batches(self.epoch))

    @property
    def left_in_epoch(self) -> int:
        """Micro-batches left in the current epoch (the current step takes at most these)."""
        return self.batches_per_epoch - self.index

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state(self, state: dict[str, int], saved_units: int | None = None) -> None:
        """Continue from a position `state()` gave; the seed must be this stream's (else the order differs).
        `saved_units`: the fixed micro-batch size (units over all processes) of the stream that saved it,
        when it differs from this one's (another world size): the position moves to the same unit of the
        epoch's order, which must start one of this stream's micro-batches."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the stream was saved with seed {state['seed']}, this one has {self.seed}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if saved_units is not None and saved_units != self.global_units:
            if self.global_tokens is not None or self.global_units <= 0:
                raise ValueError("token-budget micro-batches keep their size: there is no position to move")
            taken = index * saved_units  # units of the epoch's order already trained on
            if taken % self.global_units:
                raise ValueError(
                    f"the stream stopped after {taken} units of epoch {epoch}, not a multiple of this "
                    f"stream's {self.global_units} units per micro-batch"
                )
            index = taken // self.global_units
        self.epoch, self.index = epoch, index

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.batches(self.epoch)
            batch = batches[self.index]
            self.index += 1
            if self.index == len(batches):  # the epoch ends with this batch: position = next epoch
                self.epoch, self.index = self.epoch + 1, 0
            yield batch
