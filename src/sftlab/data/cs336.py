"""The Stanford CS336 (assignment 5) SFT data interface: a token stream cut into fixed-length chunks.

`PackedSFTDataset` formats each {"prompt", "response"} JSONL row with the Alpaca template, encodes
it with the tokenizer's default special-token handling (a BOS where the tokenizer adds one),
appends the EOS id as a document delimiter, concatenates all documents (in file order, or in a
shuffled order) and serves consecutive non-overlapping chunks of `seq_length` tokens, each with
its next-token labels. No per-document masking happens here: this is plain language-model
chunking, as the interface specifies (see `sftlab.data.packing` for document-isolated packing).
"""

from __future__ import annotations

import json
import random
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sftlab.data.templates import ALPACA_PREAMBLE

ALPACA_TEMPLATE = ALPACA_PREAMBLE + "\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"


class PackedSFTDataset(Dataset):
    """Item i: `input_ids` = tokens[i*m : (i+1)*m], `labels` = tokens[i*m+1 : (i+1)*m+1] (m = seq_length).

    With N tokens in the stream there are floor((N - 1) / m) items: every chunk needs the token
    after it, and a final partial chunk is dropped. `shuffle=True` shuffles the documents before
    concatenation with `random.Random(seed)` (`seed=None`: the global `random` state).
    """

    def __init__(
        self, tokenizer, dataset_path: str | PathLike, seq_length: int, shuffle: bool, seed: int | None = None
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to delimit documents")
        texts = []
        with open(Path(dataset_path), encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{dataset_path}:{lineno}: invalid JSON: {e.msg}") from None
                for key in ("prompt", "response"):
                    if not isinstance(row, dict) or not isinstance(row.get(key), str):
                        raise ValueError(f"{dataset_path}:{lineno} field '{key}': missing or not a string")
                texts.append(ALPACA_TEMPLATE.format(prompt=row["prompt"], response=row["response"]))
        if shuffle:
            (random.Random(seed) if seed is not None else random).shuffle(texts)
        docs = tokenizer(texts)["input_ids"] if texts else []  # default special tokens, like encode()
        eos = np.asarray([tokenizer.eos_token_id], dtype=np.int64)
        stream = np.concatenate(
            [part for doc in docs for part in (np.asarray(doc, dtype=np.int64), eos)] or [eos[:0]]
        )
        self.tokens = torch.from_numpy(stream)  # one flat int64 array, no per-token Python objects
        self.seq_length = seq_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"chunk {i} out of range for {len(self)} chunks")
        start = (i % len(self)) * self.seq_length
        return {
            "input_ids": self.tokens[start : start + self.seq_length],
            "labels": self.tokens[start + 1 : start + self.seq_length + 1],
        }


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
    """One epoch of batches of (batch_size, seq_length) tensors (the last may be smaller); len = ceil(len/batch)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)
