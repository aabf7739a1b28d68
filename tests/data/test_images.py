"""Rows with images (data/images.py): content parts, the `images` column, `<image>` markers, checked files."""

from __future__ import annotations

import io

import pytest
from vlm_families import make_image

from sftlab.data.images import image_record
from sftlab.data.records import BadRecord, ColumnMap, to_record


@pytest.fixture()
def data_dir(tmp_path):
    make_image(tmp_path / "mllm_demo_data" / "1.png")
    make_image(tmp_path / "mllm_demo_data" / "2.png", seed=1)
    return tmp_path


def _read(row, data_dir, fmt="auto", **kw):
    return image_record(row, fmt, str(data_dir / "d.jsonl"), 3, base_dir=data_dir, **kw)


def test_llamafactory_markers_take_the_images_column_in_order(data_dir):
    row = {
        "messages": [
            {"content": "<image>Who are they?", "role": "user"},
            {"content": "They're football players.", "role": "assistant"},
            {"content": "What are they doing?<image>", "role": "user"},
            {"content": "Playing.", "role": "assistant"},
        ],
        "images": ["mllm_demo_data/1.png", "mllm_demo_data/2.png"],
    }
    conv = _read(row, data_dir)
    assert conv.images == (str(data_dir / "mllm_demo_data/1.png"), str(data_dir / "mllm_demo_data/2.png"))
    assert conv.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Who are they?"}]
    assert conv.messages[1]["content"] == [{"type": "text", "text": "They're football players."}]
    assert conv.messages[2]["content"] == [
        {"type": "text", "text": "What are they doing?"},
        {"type": "image"},
    ]
    assert conv.unknown == ()  # the images column is read, not reported as unknown


def test_content_parts_with_paths_and_bare_parts_with_the_column(data_dir):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": "mllm_demo_data/2.png"},
                    {"type": "text", "text": "and"},
                    {"type": "image"},
                    {"type": "text", "text": "?"},
                ],
            },
            {"role": "assistant", "content": "Both."},
        ],
        "images": ["mllm_demo_data/1.png"],
    }
    conv = _read(row, data_dir)
    assert conv.images == (str(data_dir / "mllm_demo_data/2.png"), str(data_dir / "mllm_demo_data/1.png"))
    assert [p["type"] for p in conv.messages[0]["content"]] == ["image", "text", "image", "text"]


def test_sharegpt_and_prompt_completion_rows_read_markers(data_dir):
    conv = _read(
        {
            "conversations": [
                {"from": "human", "value": "<image>Describe."},
                {"from": "gpt", "value": "A cat."},
            ],
            "images": ["mllm_demo_data/1.png"],
        },
        data_dir,
    )
    assert conv.messages[0]["content"][0] == {"type": "image"} and len(conv.images) == 1
    conv = _read(
        {"prompt": "<image>Describe.", "completion": "A dog.", "images": "mllm_demo_data/2.png"}, data_dir
    )
    assert conv.images == (str(data_dir / "mllm_demo_data/2.png"),)


@pytest.mark.parametrize(
    "images, markers, want",
    [
        (["mllm_demo_data/1.png"], 2, "has 1 image(s) but the conversation holds 2"),
        (["mllm_demo_data/1.png", "mllm_demo_data/2.png"], 1, "has 2 image(s) but the conversation holds 1"),
    ],
)
def test_marker_count_mismatch_is_a_bad_row(data_dir, images, markers, want):
    row = {
        "messages": [
            {"role": "user", "content": "<image>" * markers + "Hi"},
            {"role": "assistant", "content": "x"},
        ],
        "images": images,
    }
    with pytest.raises(BadRecord) as e:
        _read(row, data_dir)
    assert e.value.where == f"{data_dir / 'd.jsonl'}:3" and e.value.field_name == "images"
    assert want in str(e.value)


def test_missing_corrupt_and_remote_images_are_bad_rows(data_dir):
    (data_dir / "broken.png").write_bytes(b"\x89PNG not really")
    cases = {
        "missing.png": "image file not found",
        "broken.png": "cannot read image file",
        "https://example.com/a.png": "nothing is downloaded",
    }
    for ref, want in cases.items():
        row = {
            "messages": [
                {"role": "user", "content": [{"type": "image", "url": ref}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "x"},
            ]
        }
        with pytest.raises(BadRecord) as e:
            _read(row, data_dir)
        assert e.value.field_name == "messages[0].content[0]" and want in str(e.value), str(e.value)
    with pytest.raises(BadRecord, match=r"field 'images\[0\]'.*image file not found"):
        _read(
            {
                "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                "images": ["nope.png"],
            },
            data_dir,
        )


def test_in_memory_images_and_datasets_image_values(data_dir):
    image = make_image(seed=3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    row = {
        "messages": [
            {"role": "user", "content": "<image><image>Same?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": [image, {"bytes": buf.getvalue(), "path": None}],
    }
    conv = image_record(row, "auto", "dataset", 0, unit="row")
    assert conv.images[0] is image and conv.images[1].tobytes() == image.tobytes()


def test_stand_in_character_and_text_formats(data_dir):
    with pytest.raises(BadRecord, match="U\\+E000"):
        _read(
            {"messages": [{"role": "user", "content": "a\ue000"}, {"role": "assistant", "content": "x"}]},
            data_dir,
        )
    with pytest.raises(
        BadRecord, match="has 1 image.s. but the conversation holds 0"
    ):  # text is not read for images
        _read({"text": "<image> caption", "images": ["mllm_demo_data/1.png"]}, data_dir)
    assert _read({"text": "plain"}, data_dir).text == "plain"  # rows without images read as before


def test_renamed_columns_name_the_sources_fields(data_dir):
    cmap = ColumnMap({"messages": "turns", "content": "text"}, {})
    row = {"turns": [{"role": "user", "text": "<image>Hi"}, {"role": "assistant", "text": "x"}], "images": []}
    with pytest.raises(BadRecord, match="has 0 image"):
        _read(row, data_dir, columns=cmap)
    row["images"] = ["mllm_demo_data/1.png"]
    assert _read(row, data_dir, columns=cmap).messages[0]["content"][0] == {"type": "image"}


def test_text_only_path_still_refuses_image_parts():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    with pytest.raises(BadRecord, match="vision-language model"):
        to_record(row, "auto", "d.jsonl", 1)
