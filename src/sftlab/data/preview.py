"""Examples rendered with their target tokens marked: what `sftlab prepare --show N` prints.

An example is cut into runs of consecutive tokens that are targets (label not -100) or not, and
each run is decoded on its own (special tokens kept), so a marked run is exactly the text the
model is trained to write at those positions. On a terminal the runs are coloured (`styled`);
otherwise targets are wrapped in `[[` and `]]` (`mark_plain`), and a literal `[`, `]` or `\\`
that stands next to another of these characters or next to a mark is escaped with a backslash,
so `parse_marked` gives back the runs exactly. For a vision-language model each stretch of image
tokens shows as `<image WxH>` (the size of the image it stands for). Also here: a seeded sample of examples and a
text histogram of lengths.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from PIL import Image
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from sftlab.data.types import IGNORE_INDEX

OPEN, CLOSE = "[[", "]]"
_SPECIAL = "[]\\"
TARGET_STYLE, CONTEXT_STYLE = "bold green", "dim"
PLAIN_LEGEND = (
    "[[...]] marks target tokens (trained on); the rest carries no loss. A literal [, ] or \\ next to "
    "another of them or to a mark is escaped with \\."
)
RICH_LEGEND = "target tokens (trained on) in bold green; the dimmed rest carries no loss."

Run = tuple[str, bool]  # (text, is target)


def target_runs(ids: Sequence[int], labels: Sequence[int]) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they are targets, in order."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        target = int(label) != IGNORE_INDEX
        if runs and runs[-1][1] == target:
            runs[-1][0].append(int(token))
        else:
            runs.append(([int(token)], target))
    return runs


def decoded_runs(
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    labels: Sequence[int],
    image_ids: Collection[int] = (),
    images: Sequence[Any] = (),
) -> list[Run]:
    """Each run of `target_runs` decoded to text, special tokens included; with `image_ids` (a vision
    model's image tokens) each stretch of them is one `<image WxH>` of `images` in turn."""
    decode = lambda toks: tokenizer.decode(
        toks, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    if not image_ids:
        return [(decode(run), target) for run, target in target_runs(ids, labels)]
    sizes = iter(image_size(r) for r in images)
    out: list[Run] = []
    for run, target in target_runs(ids, labels):
        text, k = "", 0
        while k < len(run):
            j = k
            while j < len(run) and (run[j] in image_ids) == (run[k] in image_ids):
                j += 1
            text += decode(run[k:j]) if run[k] not in image_ids else f"<image {next(sizes, '?')}>"
            k = j
        out.append((text, target))
    return out


def image_size(ref: Any) -> str:
    """`WxH` of an image reference (a path or an image), read from its header."""
    try:
        if isinstance(ref, str):
            with Image.open(ref) as image:
                return f"{image.width}x{image.height}"
        return f"{ref.width}x{ref.height}"
    except Exception:  # noqa: BLE001 - a preview never fails on an image
        return "?"


def mark_plain(runs: Sequence[Run]) -> str:
    """The runs as one string, targets wrapped in [[ ]], with the escaping `parse_marked` reverses."""
    items: list[str] = []  # single characters, or OPEN / CLOSE
    for text, target in runs:
        items += [OPEN, *text, CLOSE] if target else list(text)

    def special(k: int) -> bool:
        return 0 <= k < len(items) and (items[k] in (OPEN, CLOSE) or items[k] in _SPECIAL)

    out = []
    for k, item in enumerate(items):
        if len(item) == 1 and item in _SPECIAL and (special(k - 1) or special(k + 1)):
            out.append("\\" + item)
        else:
            out.append(item)
    return "".join(out)


def parse_marked(marked: str) -> list[Run]:
    """The runs of a `mark_plain` string (adjacent pieces of the same kind joined, empty ones dropped)."""
    runs: list[Run] = []
    buf: list[str] = []
    target = False
    i = 0

    def flush() -> None:
        if buf:
            runs.append(("".join(buf), target))
            buf.clear()

    while i < len(marked):
        pair = marked[i : i + 2]
        if marked[i] == "\\" and i + 1 < len(marked) and marked[i + 1] in _SPECIAL:
            buf.append(marked[i + 1])
        elif pair in (OPEN, CLOSE):
            flush()
            target = pair == OPEN
        else:
            buf.append(marked[i])
            i += 1
            continue
        i += 2
    flush()
    return runs


def styled(runs: Sequence[Run]) -> Text:
    """The runs as rich Text: targets bold green, the rest dimmed."""
    out = Text()
    for text, target in runs:
        out.append(text, style=TARGET_STYLE if target else CONTEXT_STYLE)
    return out


def sample(count: int, n: int, seed: int) -> np.ndarray:
    """min(n, count) distinct indices of `count`, seeded, in ascending order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(n, count), replace=False))


def histogram(lengths: np.ndarray, bins: int = 8, width: int = 40) -> list[str]:
    """Text bars: how many examples fall in each length range (in tokens)."""
    if not len(lengths):
        return []
    lo, hi = int(lengths.min()), int(lengths.max())
    edges = np.unique(np.linspace(lo, hi + 1, min(bins, hi + 1 - lo) + 1).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    label = len(str(hi))
    return [
        f"{a:>{label}}-{b - 1:<{label}} {'#' * max(1 if c else 0, round(width * c / top)):<{width}} {c}"
        for a, b, c in zip(edges[:-1], edges[1:], counts)
    ]
