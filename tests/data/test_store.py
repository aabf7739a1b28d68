"""Flat memory-mapped token arrays: exact round trips for every format, chunking and worker
invariance, compact labels, corruption detection at the array level; the group layout (an example of
several sequences) through the store, the cache, the fingerprint and the length policy."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
from conftest import CONVERSATIONS, write_group_store, write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data import dataset, report, store, tokenize
from sftlab.data.dataset import DataError, apply_length_policy, build_datasets
from sftlab.data.packing import pack_examples
from sftlab.data.records import to_record
from sftlab.data.report import DataReport, SourceStats
from sftlab.data.store import ArrayWriter, CorruptEntry, Examples, SourceData, TokenArrays, example_arrays
from sftlab.data.tokenize import tokenize_chunk
from sftlab.data.types import IGNORE_INDEX, TokenGroup, TokenizedExample

ROWS_BY_FORMAT = {
    "messages": [{"messages": c} for c in CONVERSATIONS],
    "prompt_completion": [
        {"prompt": "What is 2+2?", "completion": "4"},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello there"}],
        },
    ],
    "alpaca": [
        {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "Hello"},
                {"from": "gpt", "value": "Hi!"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Bye!"},
            ]
        }
    ],
    "text": [{"text": "the quick brown fox jumps", "loss_masking_spans": [[4, 8]]}, {"text": "plain text"}],
    # the second row's labels are not its ids: kept exactly through the sparse label fixes
    "pretokenized": [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11], "labels": [-100, 12, 11]}],
}


def expected(rows, fmt, tokenizer, loss_on="assistant") -> list[TokenizedExample]:
    recs = [to_record(r, fmt, "x", i + 1, vocab_size=len(tokenizer)) for i, r in enumerate(rows)]
    return tokenize_chunk(recs, tokenizer, loss_on, None)


def pairs(examples) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in examples]


@pytest.mark.parametrize("fmt", sorted(ROWS_BY_FORMAT))
@pytest.mark.parametrize("cache", [True, False])
def test_every_format_round_trips_exactly(fmt, cache, tmp_path, tokenizer):
    rows = ROWS_BY_FORMAT[fmt]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    cfg = DataConfig(
        train=[SourceConfig(path=str(path), format=fmt)],
        cache=cache,
        cache_dir=str(tmp_path / "c"),
        eval_fraction=0.0,
        max_seq_length=4096,
    )
    want = expected(rows, fmt, tokenizer)
    for _ in range(2 if cache else 1):  # written, then read back from the cache
        train, _, report = build_datasets(cfg, tokenizer, seed=0)
        assert report.bad == 0 and pairs(train) == pairs(want)
        assert train.lengths.tolist() == [len(e.input_ids) for e in want]
        for i, e in enumerate(want):
            ids, labels = train.arrays(i)
            assert ids.dtype == labels.dtype == np.int64 and ids.tolist() == e.input_ids
            assert train.num_targets(i) == e.num_targets
    assert report.sources[0].cached == cache


def entry_bytes(cache_dir) -> dict[str, bytes]:
    (entry,) = [p for p in cache_dir.iterdir()]
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir()) if p.suffix == ".bin"}


def many_rows() -> list[dict]:
    rows = [r for rs in ROWS_BY_FORMAT.values() for r in rs] + ["not an object", {"messages": []}]
    return rows * 7


@pytest.mark.parametrize("procs", [1, 2])
def test_chunking_and_workers_give_byte_identical_arrays(procs, tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "mixed.jsonl", many_rows())

    def build(rows_per_chunk, num_proc, where):
        monkeypatch.setattr(dataset, "ROWS_PER_CHUNK", rows_per_chunk)
        cfg = DataConfig(
            train=[SourceConfig(path=str(path))],
            cache_dir=str(where),
            num_proc=num_proc,
            max_bad_fraction=0.5,
            max_seq_length=4096,
        )
        return build_datasets(cfg, tokenizer, seed=0)

    joined = []
    real_append_file = ArrayWriter.append_file
    monkeypatch.setattr(
        ArrayWriter, "append_file", lambda self, *a: joined.append(a) or real_append_file(self, *a)
    )
    one_big, _, r1 = build(100_000, 1, tmp_path / "big")
    small, _, r2 = build(5, procs, tmp_path / "small")
    assert len(joined) == (
        2 * -(-len(many_rows()) // 5) if procs == 2 else 0
    )  # every chunk: ids + targets files
    assert entry_bytes(tmp_path / "big") == entry_bytes(tmp_path / "small")
    assert pairs(one_big) == pairs(small)
    if procs == 2:  # same chunking, other process count: the same checksums, so the same resume fingerprint
        assert build(5, 1, tmp_path / "small-1")[0].fingerprint() == small.fingerprint()
    assert (r1.rows, r1.bad, r1.bad_examples) == (r2.rows, r2.bad, r2.bad_examples) and r1.bad == 14
    assert not [
        p for p in (tmp_path / "small").rglob("*chunk*")
    ]  # the workers' shards were joined and removed


def test_long_chunks_tokenized_in_parts_give_byte_identical_arrays(tmp_path, tokenizer, monkeypatch):
    """A chunk is tokenized in parts of TOKENIZE_CHARS characters (long rows): the same entry, bad rows
    and reports as in one batch, with the direct renderer checked at the same chunk positions."""
    path = write_jsonl(tmp_path / "mixed.jsonl", many_rows())
    checked = []
    real = tokenize.tokenize_chunk
    monkeypatch.setattr(
        tokenize,
        "tokenize_chunk",
        lambda recs, *a, first=0: checked.append((first, len(recs))) or real(recs, *a, first=first),
    )

    def build(chars, where):
        monkeypatch.setattr(tokenize, "TOKENIZE_CHARS", chars)
        cfg = DataConfig(
            train=[SourceConfig(path=str(path))],
            cache_dir=str(where),
            max_bad_fraction=0.5,
            max_seq_length=4096,
        )
        return build_datasets(cfg, tokenizer, seed=0)

    whole, _, r1 = build(1 << 20, tmp_path / "whole")
    assert len(checked) == 1
    parts, _, r2 = build(40, tmp_path / "parts")
    assert len(checked) > 10 and sum(n for _, n in checked[1:]) == sum(n for _, n in checked[:1])
    assert entry_bytes(tmp_path / "whole") == entry_bytes(tmp_path / "parts")
    assert (
        pairs(whole) == pairs(parts) and r1.summary() == r2.summary() and r1.bad_examples == r2.bad_examples
    )


def test_targets_are_counted_a_block_at_a_time(tmp_path, tokenizer, monkeypatch):
    """The per-example target counts never copy the whole target array to int64 (8 bytes a token)."""
    path = write_jsonl(tmp_path / "mixed.jsonl", many_rows())
    cfg = DataConfig(
        train=[SourceConfig(path=str(path))],
        cache_dir=str(tmp_path / "c"),
        max_bad_fraction=0.5,
        max_seq_length=4096,
    )
    want = build_datasets(cfg, tokenizer, seed=0)[2].sources[0].targets
    store = TokenArrays(next((tmp_path / "c").iterdir()))
    per = np.add.reduceat(store.targets, store.offsets[:-1], dtype=np.int64)
    for block in (1, 3, 50, 1 << 22):
        monkeypatch.setattr(report, "SUM_BLOCK", block)
        assert report.targets_per_example(store).tolist() == per.tolist()
        assert build_datasets(cfg, tokenizer, seed=0)[2].sources[0].targets == want
    n = 3 * (1 << 20)
    writer = ArrayWriter(tmp_path, "uint16")
    writer.append("ids", np.ones(n, np.uint16))
    writer.append("targets", np.ones(n, np.uint8))
    lengths = np.full(n // 64, 64)
    writer.add_examples(lengths, np.arange(len(lengths)), np.zeros(len(lengths)), np.zeros(0), np.zeros(0))
    writer.close()
    monkeypatch.setattr(report, "SUM_BLOCK", 1 << 18)
    store = TokenArrays(tmp_path)
    tracemalloc.start()
    per = report.targets_per_example(store)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert per.tolist() == [64] * len(lengths) and peak < 8 * (1 << 18) + 4 * 8 * len(lengths) < 8 * n / 2


def test_labels_are_stored_compactly_and_rebuilt_exactly(tmp_path):
    docs = [([3, 4, 5, 6], [IGNORE_INDEX, 4, 5, IGNORE_INDEX]), ([7, 8], [7, 9]), ([1], [1])]
    writer = ArrayWriter(tmp_path, "uint32")
    for ids, labels in docs:
        i, t, fp, fv = example_arrays(ids, labels)
        writer.append("ids", i)
        writer.append("targets", t)
        writer.add_examples(np.array([len(i)]), np.array([1]), np.array([0]), fp, fv)
    writer.close()
    arrays = TokenArrays(tmp_path)
    assert (
        arrays.targets.dtype == np.uint8 and arrays.fix_pos.tolist() == [5] and arrays.fix_val.tolist() == [9]
    )
    ex = Examples.whole(arrays)
    assert pairs(ex) == [(list(a), list(b)) for a, b in docs]
    assert [ex.num_targets(i) for i in range(3)] == [2, 1, 0]
    assert isinstance(arrays.ids, np.memmap)


def test_verification_catches_a_flipped_byte_anywhere(tmp_path):
    writer = ArrayWriter(tmp_path, "uint16")
    for k in range(3):  # three chunks: the flip lands in the middle one
        writer.append("ids", np.arange(100, dtype=np.uint16) + k)
        writer.append("targets", np.ones(100, dtype=np.uint8))
        writer.add_examples(np.array([100]), np.array([k]), np.array([0]), np.zeros(0), np.zeros(0))
    writer.close()
    TokenArrays(tmp_path)
    raw = bytearray((tmp_path / "targets.bin").read_bytes())
    raw[150] = 0
    (tmp_path / "targets.bin").write_bytes(bytes(raw))
    with pytest.raises(CorruptEntry, match="targets.bin: chunk 1"):
        TokenArrays(tmp_path)
    TokenArrays(tmp_path, verify=False)  # sizes still agree: only the checksums tell


def test_packing_plans_on_lengths_and_builds_rows_when_indexed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS_BY_FORMAT["messages"] * 5)
    train, _, _ = build_datasets(
        DataConfig(train=[SourceConfig(path=str(path))], cache=False), tokenizer, seed=0
    )
    as_list = list(train)
    for packing in ("bfd", "wrapped"):
        lazy, eager = pack_examples(train, packing, 256), pack_examples(as_list, packing, 256)
        assert len(lazy) == len(eager) and lazy.lengths.tolist() == [len(r) for r in eager]
        assert all(
            (a.input_ids, a.labels, a.doc_lengths) == (b.input_ids, b.labels, b.doc_lengths)
            for a, b in zip(lazy, eager)
        )
    assert pack_examples(train, "bfd", 256).fingerprint() != pack_examples(train, "bfd", 512).fingerprint()


# --- groups: an example of k >= 1 sequences ----------------------------------------------------------

X = IGNORE_INDEX
PAIRS = [  # (chosen, rejected) sequences, each (ids, labels)
    [([1, 2, 3, 4], [X, X, 3, 4]), ([1, 2, 5], [X, X, 5])],
    [([6, 7], [X, 7]), ([6, 8, 9, 10, 11], [X, 8, 9, 10, 12])],  # a label that is not its id: a fix
    [([12, 13, 14], [X, 13, 14]), ([12, 15], [X, 15])],
]


def members(examples) -> list[list[tuple[list[int], list[int]]]]:
    return [[(m.input_ids, m.labels) for m in g.members] for g in examples]


def as_lists(groups) -> list[list[tuple[list[int], list[int]]]]:
    return [[(list(ids), list(labels)) for ids, labels in g] for g in groups]


def test_a_grouped_store_gives_whole_groups_with_their_side_values(tmp_path):
    arrays = write_group_store(tmp_path, PAIRS, side={"weight": [1.0, 0.5, 2.0]})
    assert len(arrays) == 3 and len(arrays.lengths) == 6 and arrays.groups.tolist() == [0, 2, 4, 6]
    assert {"groups.bin", "side.weight.bin"} <= {p.name for p in tmp_path.iterdir()}
    examples = Examples.whole(arrays)
    assert examples.grouped and len(examples) == 3 and all(isinstance(g, TokenGroup) for g in examples)
    assert members(examples) == as_lists(PAIRS)
    assert [float(g.side["weight"]) for g in examples] == [1.0, 0.5, 2.0]
    assert examples.lengths.tolist() == [7, 7, 5] and examples.longest.tolist() == [4, 5, 3]
    assert examples.num_tokens == 19 and [examples.num_targets(i) for i in range(3)] == [3, 5, 3]
    assert examples[1].input_ids == [6, 7, 6, 8, 9, 10, 11] and examples[1].doc_lengths == [2, 5]
    picked = examples.select([2, 0, 2])  # repeats: each a whole group, its side values with it
    assert members(picked) == as_lists([PAIRS[2], PAIRS[0], PAIRS[2]])
    assert [float(g.side["weight"]) for g in picked] == [2.0, 1.0, 2.0]
    assert picked.group.tolist() == [0, 2, 4, 6] and picked.lengths.tolist() == [5, 7, 5]
    with pytest.raises(ValueError, match="group of sequences"):
        examples.arrays(0)


def _one_chunk(directory, seqs, group_sizes=None) -> TokenArrays:
    """`seqs` in one chunk: the same token arrays whatever the layout."""
    directory.mkdir()
    compact = [example_arrays(ids, labels) for ids, labels in seqs]
    examples = len(group_sizes) if group_sizes is not None else len(seqs)
    writer = ArrayWriter(directory, "uint16", groups=group_sizes is not None)
    writer.append("ids", np.concatenate([c[0] for c in compact]))
    writer.append("targets", np.concatenate([c[1] for c in compact]))
    writer.add_examples(
        np.asarray([len(c[0]) for c in compact]),
        np.arange(1, examples + 1),
        np.zeros(examples),
        np.zeros(0),
        np.zeros(0),
        group_sizes=group_sizes,
    )
    writer.close()
    return TokenArrays(directory)


def test_the_group_layout_is_part_of_the_stores_content_and_every_fingerprint(tmp_path):
    seqs = [(ids, [X, *ids[1:]]) for pair in PAIRS for ids, _ in pair]
    sft = _one_chunk(tmp_path / "sft", seqs)
    ones = _one_chunk(tmp_path / "ones", seqs, group_sizes=np.ones(6, dtype=np.int64))
    pairs = _one_chunk(tmp_path / "pairs", seqs, group_sizes=np.full(3, 2))
    for name in ("ids.bin", "targets.bin", "offsets.bin"):  # the same tokens, differently grouped
        assert (tmp_path / "sft" / name).read_bytes() == (tmp_path / "pairs" / name).read_bytes()
    assert len({sft.digest(), ones.digest(), pairs.digest()}) == 3
    assert len({Examples.whole(a).fingerprint() for a in (sft, ones, pairs)}) == 3
    # without a layout: the files and arrays.json of an SFT store, indexing gives plain examples
    assert sft.groups is None and not (tmp_path / "sft" / "groups.bin").exists()
    assert list(json.loads((tmp_path / "sft" / "arrays.json").read_text())) == [
        "format",
        "tokens",
        "examples",
        "arrays",
    ]
    plain = Examples.whole(sft)
    assert not plain.grouped and type(plain[0]) is TokenizedExample and plain.lengths is plain.length
    mixed = Examples.concat([plain.select([0]), Examples.whole(pairs).select([1])])
    assert mixed.grouped and [len(g.members) for g in mixed] == [1, 2]
    assert members(mixed) == [
        [(seqs[0][0], seqs[0][1])],
        [(seqs[2][0], seqs[2][1]), (seqs[3][0], seqs[3][1])],
    ]


def test_a_grouped_entry_is_cached_verified_and_reopened_with_its_layout(tmp_path):
    root, key = tmp_path / "cache", "k" * 32
    tmp = store.new_entry_dir(root, key)
    built = SourceData(write_group_store(tmp, PAIRS, side={"weight": [1.0, 0.5, 2.0]}), [("p.jsonl", "line")])
    built.rows = 3
    store.commit(tmp, root, key, built, {"format": "pairs"})
    loaded = store.load(root, key)
    assert loaded is not None and loaded.cached and len(loaded) == 3
    assert loaded.arrays.groups.tolist() == [0, 2, 4, 6] and loaded.arrays.side["weight"].tolist() == [
        1,
        0.5,
        2,
    ]
    assert Examples.whole(loaded.arrays).fingerprint() == Examples.whole(built.arrays).fingerprint()
    assert loaded.where(1) == "p.jsonl:2"
    assert loaded.where_token(int(loaded.arrays.offsets[3])) == "p.jsonl:2"  # the second pair's rejected
    for name in ("groups.bin", "side.weight.bin"):  # a flipped byte in the layout: removed, to rebuild
        shutil.copytree(root / key, tmp_path / "copy")
        raw = bytearray((root / key / name).read_bytes())
        raw[9] ^= 1
        (root / key / name).write_bytes(bytes(raw))
        assert store.load(root, key) is None and not (root / key).exists()
        shutil.move(tmp_path / "copy", root / key)


def test_the_writer_refuses_a_layout_it_was_not_given(tmp_path):
    with pytest.raises(ValueError, match="group layout"):
        ArrayWriter(tmp_path, "uint16", side={"weight": "float32"})
    with pytest.raises(ValueError, match="identifier other than index and member"):
        ArrayWriter(tmp_path, "uint16", groups=True, side={"member": "float32"})
    args = (np.array([2, 3]), np.array([1]), np.array([0]), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="groups=True"):
        ArrayWriter(tmp_path, "uint16").add_examples(*args)  # two sequences, one example: no layout
    with pytest.raises(ValueError, match="adding up to the 2 sequences"):
        ArrayWriter(tmp_path, "uint16", groups=True).add_examples(*args, group_sizes=np.array([3]))
    with pytest.raises(ValueError, match="side arrays"):
        ArrayWriter(tmp_path, "uint16", groups=True, side={"weight": "float32"}).add_examples(
            *args, group_sizes=np.array([2])
        )


OVER = [  # max_seq_length 4
    [([1, 2, 3], [X, 2, 3]), ([1, 4, 5], [X, 4, 5])],  # fits
    [([1, 2, 3], [X, 2, 3]), ([1, 6, 7, 8, 9, 10], [X, 6, 7, 8, 9, 10])],  # rejected over: cut, kept
    [([1, 2, 3, 4, 5, 6], [X, X, X, X, 5, 6]), ([1, 2], [X, 2])],  # chosen over, no target before the cut
]


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_the_length_policy_keeps_or_drops_a_group_whole_and_cuts_each_member(tmp_path, policy):
    data = SourceData(write_group_store(tmp_path, OVER), [("p.jsonl", "line")])
    cfg = DataConfig(max_seq_length=4, on_overlength=policy)
    report, stats = DataReport(), SourceStats("p", "train")
    if policy == "error":
        with pytest.raises(DataError, match=r"p.jsonl:2: 6 tokens exceed data.max_seq_length=4"):
            apply_length_policy(data, cfg, report, stats)
        return
    examples = apply_length_policy(data, cfg, report, stats)
    if policy == "drop":  # both over groups go, each whole
        assert members(examples) == as_lists(OVER[:1]) and stats.dropped == 2
        return
    cut = [OVER[1][0], ([1, 6, 7, 8], [X, 6, 7, 8])]  # each member cut on its own
    assert members(examples) == as_lists([OVER[0], cut])
    assert (stats.truncated, stats.no_target, report.truncated_inside_turn) == (1, 1, 1)
    assert examples.group.tolist() == [0, 2, 4] and examples.lengths.tolist() == [6, 7]
