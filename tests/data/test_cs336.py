"""The CS336 interface: `PackedSFTDataset` and `iterate_batches`, checked against a hand-built token stream."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from conftest import build_tokenizer, write_jsonl
from tokenizers import processors

from sftlab.data import PackedSFTDataset, iterate_batches

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
)

ROWS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Convert the date to YYYY-MM-DD format. March 5, 2021", "response": "2021-03-05"},
    {"prompt": "Tell me a joke.", "response": "Why did the chicken cross the road?"},
    {"prompt": "Numbers: one two", "response": "three four five"},
    {"prompt": "Hello!", "response": "Hello! How can I help you today?"},
    {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"},
]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """Like the shared tokenizer, but its default encoding prepends BOS (as Llama-style tokenizers do)."""
    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    assert tok.encode("Hello")[0] == tok.bos_token_id
    return tok


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", ROWS)


def hand_docs(tokenizer, rows) -> list[list[int]]:
    return [tokenizer.encode(ALPACA.format(**row)) + [tokenizer.eos_token_id] for row in rows]


def split_docs(stream: list[int], eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            docs.append(tuple(cur))
            cur = []
    assert not cur
    return docs


@pytest.mark.parametrize("tok_name", ["tokenizer", "bos_tokenizer"])
@pytest.mark.parametrize("seq_length", [1, 7, 16, 64])
def test_items_are_consecutive_chunks_of_the_stream(request, data_file, tok_name, seq_length):
    tok = request.getfixturevalue(tok_name)
    stream = [t for doc in hand_docs(tok, ROWS) for t in doc]
    ds = PackedSFTDataset(tok, data_file, seq_length, shuffle=False)
    assert ds.tokens.tolist() == stream
    assert len(ds) == (len(stream) - 1) // seq_length > 0
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
        assert item["input_ids"].tolist() == stream[i * seq_length : (i + 1) * seq_length]
        assert item["labels"].tolist() == stream[i * seq_length + 1 : (i + 1) * seq_length + 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bos_and_eos_delimit_documents(data_file, tokenizer, bos_tokenizer):
    for tok, starts_with_bos in ((tokenizer, False), (bos_tokenizer, True)):
        docs = split_docs(
            PackedSFTDataset(tok, data_file, 8, shuffle=False).tokens.tolist(), tok.eos_token_id
        )
        assert len(docs) == len(ROWS)
        assert all((d[0] == tok.bos_token_id) == starts_with_bos for d in docs)
        assert tok.decode(docs[0], skip_special_tokens=True) == ALPACA.format(**ROWS[0])


def test_chunk_count_edge(data_file, tokenizer):
    n = len(PackedSFTDataset(tokenizer, data_file, 8, shuffle=False).tokens)
    for m in (n, n - 1, (n - 1) // 2, (n - 1) // 3 + 1, n + 5):
        assert len(PackedSFTDataset(tokenizer, data_file, m, shuffle=False)) == (n - 1) // m
    assert (
        len(PackedSFTDataset(tokenizer, data_file, n, shuffle=False)) == 0
    )  # no next token for a full chunk
    assert len(PackedSFTDataset(tokenizer, data_file, n - 1, shuffle=False)) == 1
    last = PackedSFTDataset(tokenizer, data_file, n - 1, shuffle=False)[0]
    assert last["labels"][-1].item() == tokenizer.eos_token_id  # the stream's final token is a label


def test_shuffle_changes_document_order_not_the_documents(data_file, bos_tokenizer):
    tok = bos_tokenizer
    plain = split_docs(PackedSFTDataset(tok, data_file, 8, shuffle=False).tokens.tolist(), tok.eos_token_id)
    orders = set()
    for seed in range(5):
        ds = PackedSFTDataset(tok, data_file, 8, shuffle=True, seed=seed)
        docs = split_docs(ds.tokens.tolist(), tok.eos_token_id)
        assert Counter(docs) == Counter(plain)
        orders.add(tuple(docs))
    assert len(orders) > 1 and any(order != tuple(plain) for order in orders)
    random.seed(3)
    a = PackedSFTDataset(tok, data_file, 8, shuffle=True).tokens
    random.seed(3)
    assert torch.equal(a, PackedSFTDataset(tok, data_file, 8, shuffle=True).tokens)  # global `random` state


@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_iterate_batches(data_file, tokenizer, batch_size):
    ds = PackedSFTDataset(tokenizer, data_file, 8, shuffle=False)
    batches = iterate_batches(ds, batch_size, shuffle=False)
    assert len(batches) == math.ceil(len(ds) / batch_size)
    got = list(batches)
    assert len(got) == len(batches)
    for k, batch in enumerate(got):
        size = batch_size if k < len(got) - 1 else len(ds) - batch_size * (len(got) - 1)
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == batch["labels"].shape == (size, 8)
        assert batch["input_ids"].dtype == torch.long
    for key in ("input_ids", "labels"):
        assert torch.equal(
            torch.cat([b[key] for b in got]), torch.stack([ds[i][key] for i in range(len(ds))])
        )


def test_iterate_batches_shuffle_is_a_permutation_of_chunks(data_file, tokenizer):
    ds = PackedSFTDataset(tokenizer, data_file, 4, shuffle=False)
    torch.manual_seed(0)
    shuffled = torch.cat([b["input_ids"] for b in iterate_batches(ds, 5, shuffle=True)])
    ordered = torch.stack([ds[i]["input_ids"] for i in range(len(ds))])
    assert shuffled.shape == ordered.shape and not torch.equal(shuffled, ordered)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, ordered.tolist()))


def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer):
    from sftlab.data import PackedSFTDataset

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2 field 'response'"):
        PackedSFTDataset(tokenizer, p, 4, False)
    p.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        PackedSFTDataset(tokenizer, p, 4, False)
