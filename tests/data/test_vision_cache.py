"""Vision-language sources through the data phase (build_datasets with a processor): image references stored
beside the token arrays and carried through mixing and the eval split, the cache (processor and image files in
its key), images a Dataset holds in memory, worker processes, over-length rows, the report and the preview."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
from PIL import Image
from vlm_families import build_family, make_image

from sftlab.config.schema import DataConfig
from sftlab.data import preview
from sftlab.data.dataset import build_datasets
from sftlab.data.types import IGNORE_INDEX, VisionExample
from sftlab.data.vision import image_token_ids, vision_collate


@pytest.fixture(scope="module")
def idefics3():
    return build_family("idefics3")[0]


def _rows(d, n=8, size=(16, 16)):
    """n rows, each one image (img/<k>.png, relative to the file) whose answer names its number."""
    rows = []
    for k in range(n):
        make_image(d / "img" / f"{k}.png", size=size, seed=k)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>Which image?"},
                    {"role": "assistant", "content": f"Image {k}."},
                ],
                "images": [f"img/{k}.png"],
            }
        )
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path, **kw):
    return DataConfig(train=[{"path": str(path)}], max_seq_length=256, **kw)


def _answer(tokenizer, ex):
    return tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE_INDEX])


def test_image_references_follow_their_examples_through_mixing_and_the_eval_split(tmp_path, idefics3):
    path = _rows(tmp_path)
    train, evals, report = build_datasets(
        _cfg(path, eval_fraction=0.25), idefics3.tokenizer, 0, processor=idefics3
    )
    assert (len(train), len(evals)) == (6, 2) and train.has_images
    for examples in (train, evals):
        for i in range(len(examples)):
            ex = examples[i]
            assert isinstance(ex, VisionExample) and len(ex.images) == 1 and os.path.isabs(ex.images[0])
            k = int(os.path.basename(ex.images[0]).split(".")[0])
            assert f"Image {k}." in _answer(idefics3.tokenizer, ex)  # the image of this very row
    stats = report.sources[0]
    assert stats.images == 8 and stats.image_tokens == 8 * 7  # <fake><global-img><image>x4<fake> per image
    assert "images: 8 (1.00 per example), 56 image tokens" in report.summary()
    batch = vision_collate([train[0], train[1]], idefics3, idefics3.tokenizer.pad_token_id)
    assert (
        batch["pixel_values"].shape[:2] == (1, 2) and batch["input_ids"].shape[0] == 2
    )  # Idefics3: [1, images, ...]


def test_the_cache_is_reused_and_rebuilt_when_an_image_or_the_processor_changes(tmp_path, idefics3):
    path = _rows(tmp_path)
    cfg = _cfg(path, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)[2].sources[0]
    again = build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)
    assert not first.cached and again[2].sources[0].cached
    assert again[0].images(0) == build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)[0].images(0)
    make_image(tmp_path / "img" / "3.png", size=(24, 16), seed=99)  # an image file changes: rebuilt
    assert not build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)[2].sources[0].cached
    other = build_family("idefics3")[0]
    other.image_seq_len = 9  # another expansion: another key
    train, _, report = build_datasets(cfg, other.tokenizer, 0, processor=other)
    assert not report.sources[0].cached and report.sources[0].image_tokens == 8 * 12


def test_an_entry_holds_one_offset_per_example_and_records_each_image_file_once(tmp_path, idefics3):
    path = _rows(tmp_path)
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows + rows[:3]) + "\n")  # three files named twice
    cfg = _cfg(path, cache_dir=str(tmp_path / "cache"))
    train = build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)[0]
    refs = train.stores[0].images
    assert (
        len(refs) == 11 and refs.starts.dtype == np.int64 and len(refs.starts) == 12
    )  # no object per example
    assert list(refs) == [refs[i] for i in range(11)] and refs[-1] == refs[10] == refs[2]
    assert refs[0] == (str((tmp_path / "img" / "0.png").resolve()),)
    entry = next((tmp_path / "cache").glob("*/image_files.jsonl"))
    recorded = [json.loads(x) for x in entry.read_text().splitlines()]
    assert sorted(p for p, *_ in recorded) == sorted(
        str((tmp_path / "img" / f"{k}.png").resolve()) for k in range(8)
    )
    os.remove(
        tmp_path / "img" / "5.png"
    )  # a recorded file is gone: the entry is rebuilt (the row is now bad)
    again = build_datasets(cfg, idefics3.tokenizer, 0, processor=idefics3)[2].sources[0]
    assert not again.cached and again.bad == 1


def test_images_held_in_memory_are_written_into_the_cache_entry(tmp_path, idefics3):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Colour {k}."}]},
            ],
            "images": [Image.new("RGB", (12 + k, 10), (40 * k, 0, 0))],
        }
        for k in range(4)
    ]
    ds = datasets.Dataset.from_list(rows)
    for cache in (True, False):
        cfg = DataConfig(max_seq_length=256, cache=cache, cache_dir=str(tmp_path / "cache"))
        train, _, _ = build_datasets(cfg, idefics3.tokenizer, 0, train_sources=[ds], processor=idefics3)
        refs = [train.images(i)[0] for i in range(len(train))]
        assert all(os.path.isfile(r) and "/images/" in r for r in refs)
        assert sorted(Image.open(r).size for r in refs) == [(12 + k, 10) for k in range(4)]
        assert vision_collate(list(train), idefics3, 0)["pixel_values"].shape[:2] == (1, 4)


def test_worker_processes_give_the_same_examples(tmp_path, idefics3):
    path = _rows(tmp_path)
    one = build_datasets(_cfg(path, cache=False), idefics3.tokenizer, 0, processor=idefics3)[0]
    two = build_datasets(_cfg(path, cache=False, num_proc=2), idefics3.tokenizer, 0, processor=idefics3)[0]
    assert [(e.input_ids, e.labels, e.images) for e in one] == [
        (e.input_ids, e.labels, e.images) for e in two
    ]


def test_an_image_row_over_max_seq_length_is_a_bad_row_never_truncated(tmp_path, idefics3):
    path = _rows(tmp_path, n=4)
    with path.open("a") as f:
        f.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "<image>" + "long " * 300},
                        {"role": "assistant", "content": "Yes."},
                    ],
                    "images": ["img/0.png"],
                }
            )
            + "\n"
        )
    train, _, report = build_datasets(
        _cfg(path, max_bad_fraction=0.5), idefics3.tokenizer, 0, processor=idefics3
    )
    assert len(train) == 4 and report.bad == 1
    assert "image rows are not truncated" in report.bad_examples[0] and ":5" in report.bad_examples[0]


def test_the_preview_shows_each_image_with_its_size(tmp_path, idefics3):
    path = _rows(tmp_path, n=2, size=(20, 12))
    train, _, _ = build_datasets(_cfg(path), idefics3.tokenizer, 0, processor=idefics3)
    ids, labels = train.arrays(0)
    runs = preview.decoded_runs(
        idefics3.tokenizer, ids.tolist(), labels.tolist(), image_token_ids(idefics3), train.images(0)
    )
    text = preview.mark_plain(runs)
    assert "<image 20x12>Which image?" in text and "<global-img>" not in text and "[[ Image 0." in text
