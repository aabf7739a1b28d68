"""Packing: BFD bins, wrapped chunks, boundary labels, and the key property that a packed row gives
every document exactly the logits and loss it gets alone (no cross-document attention)."""

from __future__ import annotations

import random
from itertools import accumulate

import numpy as np
import pytest
import torch
from conftest import build_model, write_group_store
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from sftlab.data import packing
from sftlab.data.packing import (
    PackedRow,
    pack_bfd,
    pack_examples,
    pack_wrapped,
    packed_collate,
    packing_efficiency,
)
from sftlab.data.store import Examples
from sftlab.data.types import IGNORE_INDEX, TokenizedExample
from sftlab.model.loss import count_targets, summed_nll

VOCAB = 400
TOL = 1e-5


def make_docs(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    """Random documents; every other one has a 'prompt' half without loss."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for k, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        labels = list(ids) if k % 2 == 0 else [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        docs.append(TokenizedExample(ids, labels))
    return docs


def bounds(row: PackedRow) -> list[int]:
    """Document boundaries in a row: [0, l0, l0 + l1, ..., len(row)]."""
    return [0, *accumulate(row.doc_lengths)]


def block_causal(pos: torch.Tensor) -> torch.Tensor:
    """The mask packing needs, as booleans (batch, 1, T, T): causal within a document, never across one;
    a document starts wherever the position does not increase by exactly 1 (as transformers finds them)."""
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    t = torch.arange(pos.size(-1))
    return ((doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :]))[:, None]


def tiny_llama(attn: str):
    model = build_model(VOCAB, seed=0).eval()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    assert all(layer.self_attn.config._attn_implementation == attn for layer in model.model.layers)
    return model


def first_fit_in_order(lengths: list[int], capacity: int) -> int:
    rooms: list[int] = []
    for n in lengths:
        for j, room in enumerate(rooms):
            if room >= n:
                rooms[j] -= n
                break
        else:
            rooms.append(capacity - n)
    return len(rooms)


# ---------------------------------------------------------------------------------------------- BFD


def test_bfd_small_example_exact():
    # longest first: 5 -> bin0 (room 1), 4 -> bin1 (room 2), 3 -> bin2 (room 3), 3 -> bin2 (room 0),
    # 2 -> bin1 (best fit: room 2), 1 -> bin0
    assert pack_bfd([5, 4, 3, 3, 2, 1], 6) == [[0, 5], [1, 4], [2, 3]]
    # ties: equal lengths go in index order, into the earliest-opened of equally good bins
    assert pack_bfd([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert pack_bfd([3, 3, 1, 1], 4) == [[0, 2], [1, 3]]
    assert pack_bfd([], 8) == []


@pytest.mark.parametrize("seed", range(5))
def test_bfd_properties_on_random_lengths(seed):
    rng = random.Random(seed)
    capacity = 512
    lengths = [rng.randint(1, capacity) if rng.random() < 0.5 else rng.randint(1, 64) for _ in range(1500)]
    bins = pack_bfd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every document exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) and b for b in bins)
    assert pack_bfd(lengths, capacity) == bins  # deterministic
    lower_bound = -(-sum(lengths) // capacity)
    ff = first_fit_in_order(lengths, capacity)
    assert lower_bound <= len(bins) <= ff
    assert len(bins) <= 1.02 * lower_bound + 1
    rows = pack_examples(make_docs(lengths, seed), "bfd", capacity)
    assert packing_efficiency(rows, capacity) >= 0.97
    assert packing_efficiency(rows, capacity) > sum(lengths) / (ff * capacity)


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The plain best-fit-decreasing of lists that `bfd_bins` must reproduce exactly."""
    bins: list[list[int]] = []
    rooms: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        b = min(fits, key=lambda b: (rooms[b], b)) if fits else len(bins)
        if not fits:
            bins.append([])
            rooms.append(capacity)
        bins[b].append(i)
        rooms[b] -= lengths[i]
    return [sorted(b) for b in bins]


@pytest.mark.parametrize("block", [1, 7, 1 << 16])
def test_bfd_in_blocks_of_documents_is_the_plain_best_fit_decreasing(block, monkeypatch):
    monkeypatch.setattr(packing, "BFD_BLOCK", block)
    rng = random.Random(block)
    lengths = [rng.choice([rng.randint(1, 300), rng.randint(1, 20), 300]) for _ in range(700)]
    assert pack_bfd(lengths, 300) == reference_bfd(lengths, 300)
    order, offsets = packing.bfd_rows(np.asarray(lengths), 300)
    assert order.dtype == offsets.dtype == np.int64
    assert [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == reference_bfd(lengths, 300)


def test_bfd_rejects_documents_over_capacity():
    with pytest.raises(ValueError, match="document 2 has 9 tokens.*capacity 8"):
        pack_bfd([3, 8, 9], 8)
    with pytest.raises(ValueError, match="document 1 is empty"):
        pack_bfd([3, 0], 8)


def test_bfd_packs_50k_documents_near_the_lower_bound():
    """Scale check (its speed is measured in benchmarks/bench_data.py, not asserted here)."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 2048) for _ in range(50_000)]
    bins = pack_bfd(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(50_000))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    lower_bound = -(-sum(lengths) // 2048)
    assert len(bins) <= lower_bound * 1.01


# ------------------------------------------------------------------------------------ rows, labels


def test_wrapped_chunks_split_documents_into_new_documents():
    docs = make_docs([5, 7, 3])
    rows = pack_wrapped(docs, 4)
    assert [r.doc_lengths for r in rows] == [[4], [1, 3], [4], [3]]
    stream = [t for d in docs for t in d.input_ids]
    assert [t for r in rows for t in r.input_ids] == stream
    assert rows[1].position_ids == [0, 0, 1, 2] and rows[2].position_ids == [0, 1, 2, 3]
    # every piece start (a document start, or a continuation in a new row) has no label; the rest keep theirs
    flat_labels = [t for d in docs for t in d.labels]
    starts = {0, 4, 5, 8, 12}
    for pos, label in enumerate(t for r in rows for t in r.labels):
        assert label == (IGNORE_INDEX if pos in starts else flat_labels[pos])
    assert pack_wrapped(docs, 15)[0].doc_lengths == [5, 7, 3]  # exact fit: one row, nothing split


@pytest.mark.parametrize("packing", ["greedy", "none"])  # `none` packs nothing: the trainer pads examples
def test_pack_examples_refuses_what_is_not_a_packing(packing):
    with pytest.raises(ValueError, match="unknown packing"):
        pack_examples(make_docs([3, 6]), packing, 8)


def test_boundary_labels_never_cross_documents():
    docs = [TokenizedExample(ids, list(ids)) for ids in ([5, 6, 7], [8], [9, 10, 11, 12])]
    row = PackedRow.from_docs((d.input_ids, d.labels) for d in docs)
    assert row.labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12]
    assert row.position_ids == [0, 1, 2, 0, 0, 1, 2, 3] and row.doc_lengths == [3, 1, 4]
    other = PackedRow.from_docs([([13, 14], [13, 14])])
    batch = packed_collate([row, other])  # flattened: (1, 10)
    assert batch["labels"].tolist() == [row.labels + [IGNORE_INDEX, 14]]
    assert batch["position_ids"].tolist() == [row.position_ids + [0, 1]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    # the shifted loss predicts labels[t + 1] from position t: t and t + 1 must be the same document
    pos = batch["position_ids"][0]
    for t in range(pos.numel() - 1):
        if batch["labels"][0, t + 1] != IGNORE_INDEX:
            assert pos[t + 1] == pos[t] + 1
    assert count_targets(batch["labels"]) == sum(count_targets(torch.tensor([d.labels])) for d in docs) + 1


def test_padded_collate_pads_with_a_separate_block():
    rows = [PackedRow.from_docs([([1, 2, 3], [1, 2, 3])]), PackedRow.from_docs([([4], [4])])]
    batch = packed_collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX] * 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_packing_efficiency():
    rows = [PackedRow([1] * 6, [1] * 6, [6]), PackedRow([1] * 2, [1] * 2, [1, 1])]
    assert packing_efficiency(rows, 8) == 0.5
    assert packing_efficiency([], 8) == 0.0


# ------------------------------------------------------------------ the key test: documents isolated

LENGTHS = [7, 1, 12, 4, 9, 2]


def run_alone(model, docs):
    with torch.no_grad():
        out = []
        for d in docs:
            logits = model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits
            out.append((logits[0], summed_nll(logits, torch.tensor([d.labels]))))
    return out


@pytest.mark.parametrize("layout", ["flat", "padded"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_match_documents_run_alone(attn, layout):
    model = tiny_llama(attn)
    docs = make_docs(LENGTHS, seed=1)
    rows = pack_examples(docs, "bfd", 16)
    assert [r.doc_lengths for r in rows] == [[12, 4], [7, 9], [1, 2]]  # several rows, several documents each
    batch = packed_collate(rows, pad_id=None if layout == "flat" else 0)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    alone = run_alone(model, docs)
    doc_of = [tuple(ex.input_ids) for ex in docs]
    # walk the rows' documents in collate order and compare each with the same document alone
    offset, checked = 0, 0
    for r, row in enumerate(rows):
        b = 0 if layout == "flat" else r
        base = offset if layout == "flat" else 0
        for s, e in zip(bounds(row), bounds(row)[1:]):
            ids = row.input_ids[s:e]
            k = doc_of.index(tuple(ids))
            got = logits[b, base + s : base + e]
            assert (got - alone[k][0]).abs().max().item() <= TOL
            doc_loss = summed_nll(got[None], batch["labels"][b : b + 1, base + s : base + e])
            assert abs(doc_loss.item() - alone[k][1].item()) <= TOL
            checked += 1
        offset += len(row)
    assert checked == len(docs)
    packed_loss = summed_nll(logits, batch["labels"]).item()
    assert abs(packed_loss - sum(loss.item() for _, loss in alone)) <= TOL
    assert count_targets(batch["labels"]) == sum(count_targets(torch.tensor([d.labels])) for d in docs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_negative_control_without_restarting_positions_documents_leak(attn):
    model = tiny_llama(attn)
    docs = make_docs(LENGTHS[:3], seed=1)
    row = PackedRow.from_docs((d.input_ids, d.labels) for d in docs)
    ids = torch.tensor([row.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(len(row))[None], use_cache=False).logits[0]
    alone = run_alone(model, docs)
    s = bounds(row)
    assert (logits[s[0] : s[1]] - alone[0][0]).abs().max() <= TOL  # the first document sees nothing before it
    assert (logits[s[2] : s[3]] - alone[2][0]).abs().max() > 1e-3  # later ones attend to earlier documents


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv_cache_disables_packed_detection(attn):
    """Why packed batches run with use_cache=False: with a KV cache, transformers ignores the packing."""
    model = tiny_llama(attn)
    docs = make_docs(LENGTHS[:3], seed=1)
    row = PackedRow.from_docs((d.input_ids, d.labels) for d in docs)
    batch, s = packed_collate([row]), bounds(row)
    alone = run_alone(model, docs)
    with torch.no_grad():
        cached = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits[0]
        uncached = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
    assert (
        cached[s[2] : s[3]] - alone[2][0]
    ).abs().max() > 1e-3  # a KV cache: transformers ignores the packing
    for k in range(3):
        assert (uncached[s[k] : s[k + 1]] - alone[k][0]).abs().max() <= TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_derives_block_diagonal_mask_from_position_ids(attn):
    """The evidence, at the mask level: no attention_mask + no cache -> a block-diagonal causal mask."""
    model = tiny_llama(attn)
    pos = torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]])
    embeds = torch.zeros(2, 6, model.config.hidden_size)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None, position_ids=pos
    )
    allowed = mask if mask.dtype == torch.bool else mask == 0  # sdpa: bool; eager: additive float
    assert torch.equal(allowed, block_causal(pos))
    assert not allowed[0, 0, 3, 2] and allowed[0, 0, 5, 4] and not allowed[0, 0, 4, 3]
    cached = create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=DynamicCache(config=model.config),
        position_ids=pos,
    )
    assert cached is None or bool((cached if cached.dtype == torch.bool else cached == 0)[0, 0, 3, 2])


def test_groups_are_not_packed(tmp_path):
    groups = Examples.whole(write_group_store(tmp_path, [[([1, 2], [-100, 2]), ([1, 3], [-100, 3])]]))
    for how in ("bfd", "wrapped"):
        with pytest.raises(ValueError, match=r"groups\) are not packed"):
            pack_examples(groups, how, 8)
