"""Read the images of a chat row: a Conversation whose messages are content parts and that carries
image references (paths or in-memory images), never decoded pixels.

A row names its images in any of three ways, in the order they appear in the conversation:

- content parts `{"type": "image", "image" | "path" | "url": ...}` (also `image_url` /
  `input_image` parts, OpenAI style) inside a message's content list;
- bare parts `{"type": "image"}` (TRL style), each taking the next entry of the row's `images` column;
- LLaMA-Factory's `<image>` markers in message text (or in prompt/completion/instruction strings),
  each taking the next entry of the `images` column (data/mllm_demo.json).

The number of markers and bare parts must equal the number of entries in `images`; a path is
relative to the data file's directory; an http(s) URL is refused (nothing is fetched); a missing or
unreadable file is a bad row. An entry may also be a PIL image or a `datasets.Image` value
(`{"bytes", "path"}`). The row is read by records.py as it reads any row (each image stands in its
text as one private-use character), then every message's content becomes parts: `{"type": "text",
"text"}` and `{"type": "image"}`, which is what vision-language chat templates render.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from sftlab.data.records import NO_COLUMNS, ColumnMap, Conversation, Record, to_record
from sftlab.data.types import BadRecord

IMAGE_PARTS = ("image", "image_url", "input_image")
REF_KEYS = ("image", "path", "url", "image_url")
MARKER = "<image>"
STANDIN = "\ue000"  # one image inside text while records.py reads the row (Unicode private use area)
# the row's fields that may hold text with images, in the order a conversation renders them
_TEXT_FIELDS = (
    "system",
    "instruction",
    "input",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "output",
)

ImageRef = Any  # an absolute path (str) or a PIL image


class _Images:
    """The images of one row, collected in conversation order while its text is rewritten."""

    def __init__(self, row: dict[str, Any], key: str, source: str, line: int, unit: str, base: Path | None):
        self.source, self.line, self.unit, self.base, self.key = source, line, unit, base, key
        column = row.get(key)
        self.has_column = column is not None
        self.column = (
            list(column) if isinstance(column, (list, tuple)) else [] if column is None else [column]
        )
        self.refs: list[tuple[Any, str]] = []  # (raw reference, the field it came from)
        self.taken = 0  # entries of the images column used so far
        self.text_keys: tuple[str, ...] = ("content", "value")

    def bad(self, field_name: str | None, reason: str) -> BadRecord:
        return BadRecord(self.source, self.line, field_name, reason, self.unit)

    def from_column(self, where: str) -> str:
        if self.taken < len(self.column):
            self.refs.append((self.column[self.taken], f"{self.key}[{self.taken}]"))
        self.taken += 1
        return STANDIN

    def text(self, value: str, where: str, markers: bool = True) -> str:
        if STANDIN in value:
            raise self.bad(where, "holds the character U+E000, which stands for an image here; remove it")
        if not (markers and self.has_column and MARKER in value):
            return value
        pieces = value.split(MARKER)
        return "".join(
            p + (self.from_column(where) if k < len(pieces) - 1 else "") for k, p in enumerate(pieces)
        )

    def parts(self, parts: list[Any], where: str) -> list[Any]:
        out = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PARTS:
                ref = next((part[k] for k in REF_KEYS + (kind,) if part.get(k) is not None), None)
                if isinstance(ref, dict) and kind == "image_url":
                    ref = ref.get("url")
                if ref is None:
                    self.from_column(f"{where}[{j}]")
                else:
                    self.refs.append((ref, f"{where}[{j}]"))
                out.append({"type": "text", "text": STANDIN})
            elif kind == "text" and isinstance(part.get("text"), str):
                out.append({**part, "text": self.text(part["text"], f"{where}[{j}].text", markers=False)})
            else:
                out.append(part)  # records.py names what is wrong with it
        return out

    def value(self, value: Any, where: str) -> Any:
        """A field's value with its images replaced by the stand-in character."""
        if isinstance(value, str):
            return self.text(value, where)
        if isinstance(value, list) and value and all(isinstance(p, dict) and "type" in p for p in value):
            return self.parts(value, where)
        if isinstance(value, list):  # messages or turns: only their text (content / value) holds images
            return [
                {k: self.value(v, f"{where}[{i}].{k}") if k in self.text_keys else v for k, v in m.items()}
                if isinstance(m, dict)
                else m
                for i, m in enumerate(value)
            ]
        return value

    def check_count(self) -> None:
        if self.taken != len(self.column):
            used = f"{self.taken} <image> marker(s) or image part(s) without a reference"
            raise self.bad(
                self.key,
                f"has {len(self.column)} image(s) but the conversation holds {used}; "
                "each marker or bare image part takes one entry, in order",
            )


def _resolve(images: _Images, ref: Any, where: str) -> ImageRef:
    """A checked reference: an absolute path of a readable image file, or an in-memory image."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict) and (
        ref.get("bytes") is not None or ref.get("path") is not None
    ):  # datasets.Image
        if ref.get("bytes") is not None:
            try:
                image = Image.open(io.BytesIO(ref["bytes"]))
                image.load()
            except Exception as e:  # noqa: BLE001 - any decoding failure is this row's
                raise images.bad(where, f"cannot decode the image bytes: {e}") from None
            return image
        ref = ref["path"]
    if not isinstance(ref, str) or not ref.strip():
        raise images.bad(where, f"must be an image path, URL or image, got {type(ref).__name__}")
    if ref.startswith(("http://", "https://", "data:")):
        raise images.bad(
            where,
            f"{ref[:60]!r}: images are read from local files only (nothing is downloaded); "
            "download it and give its path",
        )
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = (images.base or Path.cwd()) / path
    if not path.is_file():
        raise images.bad(where, f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # noqa: BLE001 - any decoding failure is this row's
        raise images.bad(where, f"cannot read image file {path}: {e}") from None
    return str(path.resolve())


def as_parts(content: Any) -> Any:
    """A message's text (images as stand-ins) as content parts; None (tool calls only) stays None."""
    if not isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(content.split(STANDIN)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def image_record(
    row: Any,
    fmt: str,
    source: str,
    line: int,
    *,
    unit: str = "line",
    vocab_size: int | None = None,
    columns: ColumnMap | None = None,
    base_dir: str | Path | None = None,
) -> Record:
    """`to_record` for a vision-language model: a chat row becomes a Conversation of content parts
    with its `images` (checked references, in order); `base_dir`: where relative image paths start
    (the data file's directory). Any unusable image or a count mismatch is a BadRecord."""
    if not isinstance(row, dict):
        return to_record(row, fmt, source, line, unit=unit, vocab_size=vocab_size, columns=columns)
    cmap = columns or NO_COLUMNS
    key = cmap.theirs("images")
    images = _Images(row, key, source, line, unit, Path(base_dir) if base_dir is not None else None)
    images.text_keys = (cmap.theirs("content"), cmap.theirs("value"))
    fields = [cmap.theirs(f) for f in _TEXT_FIELDS]
    rewritten = {k: v for k, v in row.items() if k != key}
    for name in sorted((k for k in rewritten if k in fields), key=fields.index):
        rewritten[name] = images.value(rewritten[name], name)
    images.check_count()
    record = to_record(rewritten, fmt, source, line, unit=unit, vocab_size=vocab_size, columns=columns)
    if not isinstance(record, Conversation):
        if images.refs:
            raise images.bad(key if images.has_column else None, f"a {record.format} row cannot hold images")
        return record
    found = sum(
        (m.get("content") or "").count(STANDIN) for m in record.messages if isinstance(m.get("content"), str)
    )
    if found != len(images.refs):  # e.g. an image in a field the format does not read
        raise images.bad(
            key if images.has_column else None,
            f"{len(images.refs)} image(s) given but "
            f"{found} reach the conversation (images only count in message text)",
        )
    record.images = tuple(_resolve(images, ref, where) for ref, where in images.refs)
    record.messages = [{**m, "content": as_parts(m.get("content"))} for m in record.messages]
    return record
