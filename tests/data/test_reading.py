"""Reading a source (reading.py): rows with image content parts make the source one clear error, before
training, naming the file, the first rows and their count (a text-only model cannot train on images)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets

TEXT = {
    "messages": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
    ]
}
IMAGE = {
    "messages": [  # an OpenAI/HF vision row, as in LLaMA-Factory's mllm demos after conversion
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "cat.png"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
    ]
}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def build(tokenizer, path, **kw):
    return build_datasets(DataConfig(train=[SourceConfig(path=str(path))], **kw), tokenizer, seed=0)


@pytest.mark.parametrize(
    "kw",
    [{}, {"max_bad_fraction": 1.0}, {"on_bad_record": "error"}],
    ids=["default", "any-bad-fraction", "strict"],
)
def test_image_rows_are_one_error_naming_the_file_rows_and_count(tmp_path, tokenizer, kw):
    path = write_jsonl(tmp_path / "vl.jsonl", [TEXT, IMAGE, TEXT] + [IMAGE] * 8)
    with pytest.raises(DataError) as e:
        build(tokenizer, path, **kw)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith(f"data source {path}: 9 of 11 rows have images")
    assert f"({path} lines 2, 4, 5, 6, 7 and 4 more; the first: field 'messages[0].content[0]')" in msg
    assert "need a vision-language model" in msg and "text-only model" in msg and "docs/vision.md" in msg
    with pytest.raises(DataError, match="9 of 11 rows have images"):  # nothing was cached as skipped
        build(tokenizer, path, **kw)


def test_image_rows_across_chunks_and_worker_processes_are_all_counted(tmp_path, tokenizer):
    rows = [IMAGE if i % 100 == 7 else TEXT for i in range(1100)]  # 3 chunks of 512 rows
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(DataError) as e:
        build(tokenizer, path, num_proc=2)
    assert "11 of 1100 rows have images" in str(e.value)
    assert f"{path} lines 8, 108, 208, 308, 408 and 6 more" in str(e.value)


def test_image_rows_of_a_parquet_file_are_cited_by_1_based_row(tmp_path, tokenizer):
    answer = {
        "role": "assistant",
        "content": [{"type": "text", "text": "A cat."}],
    }  # a column holds one type: parts
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}, answer]}
    image = {"messages": [IMAGE["messages"][0], answer]}
    pq.write_table(pa.Table.from_pylist([image, text, image]), tmp_path / "vl.parquet")
    with pytest.raises(DataError, match=r"2 of 3 rows have images \(\S*vl.parquet rows 1, 3;"):
        build(tokenizer, tmp_path / "vl.parquet")


def test_text_rows_and_other_bad_rows_are_unchanged(tmp_path, tokenizer):
    audio = {"messages": [{"role": "user", "content": [{"type": "audio"}]}, TEXT["messages"][1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [TEXT] * 4 + [audio])
    train, _, report = build(tokenizer, path)
    assert len(train) == 4 and report.bad == 1
    assert report.bad_examples == [
        f"{path}:5 field 'messages[0].content[0]': must be a content part "
        '{"type": "text", "text": "..."}, got {\'type\': \'audio\'}'
    ]


def test_llamafactory_images_column_with_markers_is_the_same_one_error(tmp_path, tokenizer):
    """LLaMA-Factory's mllm_demo.json: `<image>` markers in the text and an `images` column. A text-only run
    would train on the literal `<image>` text without the picture: the source is refused, naming the rows."""
    mllm = {
        "messages": [
            {"role": "user", "content": "<image>Who are they?"},
            {"role": "assistant", "content": "Two football players."},
        ],
        "images": ["mllm_demo_data/1.jpg"],
    }
    path = tmp_path / "mllm_demo.json"
    path.write_text(json.dumps([mllm, TEXT, {**mllm, "images": []}, mllm]))
    with pytest.raises(DataError) as e:
        build(tokenizer, path)
    msg = str(e.value)
    assert msg.startswith(
        f"data source {path}: 2 of 4 rows have images ({path} rows 1, 4; the first: field 'images')"
    )
    assert "text-only model" in msg


def test_the_heap_is_frozen_while_the_workers_run_and_thawed_after(tmp_path, tokenizer, monkeypatch):
    """Forked workers share the main process's heap; frozen, the collector's passes (in the workers and
    here) do not write to those pages, which would give every process a private copy of them."""
    import gc

    from sftlab.data.store import ArrayWriter

    seen = []
    real = ArrayWriter.add_examples
    monkeypatch.setattr(
        ArrayWriter, "add_examples", lambda self, *a: seen.append(gc.get_freeze_count()) or real(self, *a)
    )
    path = write_jsonl(tmp_path / "rows.jsonl", [TEXT] * 600)
    assert len(build(tokenizer, path, num_proc=2)[0]) == 600
    assert len(seen) == 2 and min(seen) > 0 and gc.get_freeze_count() == 0
    seen.clear()
    assert len(build(tokenizer, path, num_proc=1, cache=False)[0]) == 600
    assert seen == [0, 0]  # one process: nothing to share, nothing frozen
