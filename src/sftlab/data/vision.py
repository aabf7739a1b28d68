"""Vision-language examples: mask as the text path does, expand image tokens with the processor, collate pixels.

A conversation of content parts (data/images.py) is rendered with the processor's chat template,
where each image is the template's placeholder (`<image>`, `<|vision_start|><|image_pad|>...`). Its
labels come from the text path exactly (tokenize.py: assistant content plus end-of-turn are targets).
The processor then expands the placeholders (into as many image tokens as the image needs, with
the family's wrappers), and the labels are carried over token by token: the two token sequences
are the same but for the runs the expansion inserted, which are never targets; an image token id
is never a target either. Where the sequences differ in any other way, the row is refused (a
TemplateError), never guessed.

`vision_examples` / `vision_examples_from_jsonl` turn rows into examples in memory (images read by
data/images.py; each unusable row a BadRecord, the rest kept); an example longer than
max_seq_length is a bad row, never truncated (that could cut an image's tokens).

`encode_vision_rows` is the vision-language branch of a data chunk (dataset.encode_chunk): each row
read with its images (relative paths against its data file's directory), tokenized as above, and its
image references made storable: paths stay absolute paths, images held in memory (a Dataset's) are
written as PNG files into the cache entry (`images/<sha256>.png`, stored relative to the entry).

`vision_collate` pads ids and labels as `pad_collate` does, loads the batch's images and adds
whatever the image processor returns (`pixel_values`, `image_grid_thw`, `pixel_attention_mask`,
`image_sizes`...) and the processor's `mm_token_type_ids` where it makes them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sftlab.data.collate import pad_collate
from sftlab.data.images import image_record
from sftlab.data.records import NO_COLUMNS, Conversation, Record, formatted_row
from sftlab.data.rendering import render
from sftlab.data.sources import iter_jsonl
from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX, BadRecord, DataError, TemplateError, VisionExample

_TOKEN_ATTRS = (
    "image_token",
    "fake_image_token",
    "global_image_tag",
    "boi_token",
    "eoi_token",
    "image_start_token",
    "image_end_token",
    "vision_start_token",
    "vision_end_token",
)


def image_token_ids(processor: Any) -> set[int]:
    """The ids of the processor's image tokens: placeholders and the wrappers its expansion writes."""
    tok = processor.tokenizer
    ids = {getattr(processor, a) for a in dir(processor) if a.endswith("image_token_id")}
    names = [getattr(processor, a, None) for a in _TOKEN_ATTRS] + [
        getattr(tok, a, None) for a in _TOKEN_ATTRS
    ]
    ids |= {tok.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
    return {i for i in ids if isinstance(i, int) and i != tok.unk_token_id}


def load_image(ref: Any) -> Image.Image:
    """An RGB image from a reference (a path, or an image already in memory)."""
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else ref.convert("RGB")
    with Image.open(ref) as image:
        return image.convert("RGB")


def carry_labels(
    short: Sequence[int], labels: Sequence[int], long: Sequence[int], inserted: set[int]
) -> list[int]:
    """`labels` of the token sequence `short` carried over to `long`: `short` with runs of the ids in
    `inserted` added (and placeholders in `inserted` replaced). Inserted tokens get IGNORE_INDEX; a
    target token must find itself in `long`, else TemplateError."""
    out = [IGNORE_INDEX] * len(long)
    i = j = 0
    while i < len(short):
        if j < len(long) and long[j] == short[i]:
            out[j] = labels[i]
            i, j = i + 1, j + 1
        elif j < len(long) and long[j] in inserted:
            j += 1  # a token the expansion wrote
        elif short[i] in inserted and labels[i] == IGNORE_INDEX:
            i += 1  # a placeholder the expansion replaced
        else:
            raise TemplateError(
                f"the processor's expansion of the image tokens changed the text around them "
                f"(token {i} of the rendered conversation); the row cannot be masked exactly"
            )
    if any(t not in inserted for t in long[j:]):
        raise TemplateError("the processor's expansion added text tokens after the conversation")
    return out


def _processor_call(processor: Any, text: str, images: list[Image.Image]) -> list[int]:
    out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    ids = out["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def tokenize_vision(
    processor: Any,
    messages: list[dict[str, Any]],
    images: Sequence[Any] = (),
    loss_on: str = "assistant",
    template: str | None = None,
    tools: Any = None,
) -> VisionExample:
    """Render one conversation of content parts with the processor's template, label it as the text path
    does, expand its images with the processor and carry the labels over (TemplateError where that
    cannot be done exactly). `template`: default the processor's own chat template."""
    tok = processor.tokenizer
    template = template or getattr(processor, "chat_template", None) or tok.chat_template
    if not template:
        raise TemplateError("the processor has no chat template (set data.chat_template)")
    placeholders = sum(
        p.get("type") == "image" for m in messages if isinstance(m.get("content"), list) for p in m["content"]
    )
    if placeholders != len(images):
        raise TemplateError(f"{placeholders} image part(s) but {len(images)} image(s)")
    text_path = tokenize_conversation(tok, messages, loss_on, template, tools)
    text = render(template, messages, tools=tools, **tok.special_tokens_map)
    expanded = _processor_call(processor, text, [load_image(r) for r in images])
    special = image_token_ids(processor)
    labels = carry_labels(text_path.input_ids, text_path.labels, expanded, special)
    labels = [IGNORE_INDEX if t in special else y for t, y in zip(expanded, labels)]
    return VisionExample(expanded, labels, tuple(images))


def vision_collate(examples: Sequence[VisionExample], processor: Any, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids/labels/attention mask plus the image processor's outputs for the batch's images
    (in row order; rows without images add none), and `mm_token_type_ids` where the processor makes them."""
    batch = pad_collate(examples, pad_id)
    images = [load_image(r) for ex in examples for r in getattr(ex, "images", ())]
    if images:
        pixels = processor.image_processor(images=images, return_tensors="pt")
        batch.update({k: v for k, v in pixels.items() if isinstance(v, torch.Tensor) and k not in batch})
    if getattr(processor, "return_mm_token_type_ids", False):
        kinds = processor.create_mm_token_type_ids(batch["input_ids"].tolist())
        batch["mm_token_type_ids"] = torch.tensor(kinds, dtype=torch.long) * batch["attention_mask"]
    return batch


def _vision_example(
    processor: Any,
    row: Any,
    source: str,
    line: int,
    unit: str,
    base_dir: Any,
    fmt: str,
    loss_on: str,
    template: str | None,
    max_length: int | None,
    columns: Any = None,
) -> VisionExample:
    if isinstance(row, BadRecord):
        raise row
    conv = image_record(
        row,
        fmt,
        source,
        line,
        unit=unit,
        base_dir=base_dir,
        columns=columns,
        vocab_size=len(processor.tokenizer),
    )
    return _conversation_example(processor, conv, source, line, unit, loss_on, template, max_length)


def _conversation_example(
    processor: Any,
    conv: Record,
    source: str,
    line: int,
    unit: str,
    loss_on: str,
    template: str | None,
    max_length: int | None,
) -> VisionExample:
    if not isinstance(conv, Conversation):
        raise BadRecord(
            source, line, None, f"a {conv.format} row: a vision-language run reads chat rows", unit
        )
    try:
        ex = tokenize_vision(processor, conv.messages, conv.images, loss_on, template, conv.tools)
    except TemplateError as e:
        raise BadRecord(source, line, "messages", str(e), unit) from None
    if ex.num_targets == 0:
        raise BadRecord(source, line, None, "no target tokens: every label is masked", unit)
    if max_length is not None and len(ex.input_ids) > max_length:  # cutting it could cut an image's tokens
        raise BadRecord(
            source,
            line,
            None,
            f"{len(ex.input_ids)} tokens with its images expanded, above "
            f"max_seq_length {max_length} (image rows are not truncated)",
            unit,
        )
    return ex


def vision_examples(
    rows: Any,
    processor: Any,
    source: str,
    *,
    unit: str = "row",
    base_dir: Any = None,
    fmt: str = "auto",
    loss_on: str = "assistant",
    template: str | None = None,
    max_length: int | None = None,
) -> tuple[list[VisionExample], list[BadRecord]]:
    """The examples of in-memory rows (dicts, a Dataset, or (line, row) pairs with `unit="line"`), and
    the bad rows in order: each names its place, field and reason; the good rows are all kept."""
    examples, bad = [], []
    pairs = rows if unit == "line" else enumerate(rows)
    for line, row in pairs:
        try:
            examples.append(
                _vision_example(
                    processor, row, source, line, unit, base_dir, fmt, loss_on, template, max_length
                )
            )
        except BadRecord as e:
            bad.append(e)
    return examples, bad


def vision_examples_from_jsonl(
    path: Any, processor: Any, **kwargs: Any
) -> tuple[list[VisionExample], list[BadRecord]]:
    """`vision_examples` of a JSONL file; image paths are relative to its directory."""
    path = Path(path)
    return vision_examples(
        iter_jsonl(path), processor, str(path), unit="line", base_dir=path.parent, **kwargs
    )


def stored_ref(ref: Any, image_dir: str | None) -> str:
    """A reference that can be written down: a path as it is; an image in memory saved as a PNG file in
    `image_dir` (named by its content) and given relative to it."""
    if isinstance(ref, str):
        return ref
    if image_dir is None:
        raise DataError("an image held in memory needs a directory to be written to")
    buffer = io.BytesIO()
    load_image(ref).save(buffer, format="PNG")
    data = buffer.getvalue()
    rel = f"images/{hashlib.sha256(data).hexdigest()[:32]}.png"
    path = Path(image_dir) / rel
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return rel


def _base_dir(name: str) -> Path | None:
    path = Path(name)
    return path.parent if path.is_file() else None


def encode_vision_rows(rows: Sequence[tuple[int, int, str, Any]], ctx: Any) -> tuple[list, list, list]:
    """A chunk's rows (file index, line, unit, row) for a vision-language model -> ([(k, file index, line,
    VisionExample with storable references)], [(k, BadRecord)], the rows' records), k the row's place."""
    done, bad, records = [], [], []
    for k, (f, line, unit, row) in enumerate(rows):
        name = ctx.files[f]
        try:
            if isinstance(row, BadRecord):
                raise row
            columns = ctx.columns or NO_COLUMNS
            if ctx.formatting_func is not None:
                row, columns = formatted_row(ctx.formatting_func, row, name, line, unit), None
            conv = image_record(
                row,
                ctx.format,
                name,
                line,
                unit=unit,
                vocab_size=len(ctx.processor.tokenizer),
                columns=columns,
                base_dir=_base_dir(name),
            )
            records.append(conv)
            ex = _conversation_example(
                ctx.processor, conv, name, line, unit, ctx.loss_on, ctx.template, ctx.max_seq_length
            )
            ex.images = tuple(stored_ref(r, ctx.image_dir) for r in ex.images)
            done.append((k, f, line, ex))
        except BadRecord as e:
            bad.append((k, e))
    return done, bad, records


def processor_fingerprint(processor: Any) -> str:
    """sha256 of the processor's settings (image processor, image token counts) and chat template."""
    h = hashlib.sha256(type(processor).__name__.encode())
    h.update(processor.to_json_string().encode())
    h.update(str(getattr(processor, "chat_template", None)).encode())
    return h.hexdigest()


PACKING_REFUSAL = (
    "data.packing is not supported for vision-language models: a packed row would hold the "
    "images of several examples, and the image features and position ids (M-RoPE) of each "
    "example are laid out per row; set data.packing: none"
)
