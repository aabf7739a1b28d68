"""`sftlab prepare --show N`: the plain marking reads back exactly, and it marks exactly the label positions."""

from __future__ import annotations

import functools
import io
import os
import random
import re

import pytest
from conftest import CONVERSATIONS, write_jsonl

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.data.preview import histogram, mark_plain, parse_marked, sample
from sftlab.data.types import IGNORE_INDEX
from sftlab.trainer.data import prepare_run_data, print_preview

HEADER = re.compile(r"^-- example (\d+)/(\d+): (.+):(\d+) \((\d+) tokens, (\d+) targets\)$")


def merged(runs):
    out = []
    for text, target in runs:
        if not text:
            continue
        if out and out[-1][1] == target:
            out[-1] = (out[-1][0] + text, target)
        else:
            out.append((text, target))
    return out


@pytest.mark.parametrize(
    "runs",
    [
        [("a[[0]]", False)],
        [("x", False), ("a]", True), ("]b", False)],
        [("[", True)],
        [("\\", False), ("[", True)],
        [("\\[ x \\]", True), ("\\", False)],
        [("[[", False), ("]]", True), ("[", False)],
    ],
)
def test_plain_marking_reads_back_exactly(runs):
    assert parse_marked(mark_plain(runs)) == merged(runs)


def test_plain_marking_reads_back_on_random_bracket_soup():
    rng = random.Random(0)
    for _ in range(2000):
        runs = [
            ("".join(rng.choice("ab[]\\") for _ in range(rng.randint(1, 5))), k % 2 == 1)
            for k in range(rng.randint(0, 2), rng.randint(3, 7))
        ]
        assert parse_marked(mark_plain(runs)) == merged(runs), runs
    assert (
        mark_plain([("f(x[0]) \\frac", False), ("ok", True)]) == "f(x[0]) \\frac[[ok]]"
    )  # escapes only where needed


def test_sample_is_seeded_and_histogram_counts_everything():
    assert sample(10, 3, 5).tolist() == sample(10, 3, 5).tolist() and len(set(sample(10, 3, 5))) == 3
    assert sample(2, 5, 0).tolist() == [0, 1]
    import numpy as np

    lines = histogram(np.array([3, 4, 4, 9, 20]))
    assert sum(int(line.split()[-1]) for line in lines) == 5 and lines[0].startswith(" 3-")


def blocks(out: str) -> list[tuple[re.Match, str]]:
    """(header match, body) of each shown example; the body is what follows up to the next line starting
    with '-- example' or '== ', less the one newline the printer adds."""
    found, lines = [], out.split("\n")
    k = 0
    while k < len(lines):
        m = HEADER.match(lines[k])
        if not m:
            k += 1
            continue
        j = k + 1
        while j < len(lines) and not (HEADER.match(lines[j]) or lines[j].startswith("== ")):
            j += 1
        body = "\n".join(lines[k + 1 : j])
        if j < len(lines) and lines[j].startswith("== "):  # a blank line precedes '== '
            body = body[:-1]
        found.append((m, body))
        k = j
    return found


def token_flags_from_marks(tokenizer, ids, runs) -> list[bool]:
    """Independently of the printer: walk the tokens, each decoded alone, through the parsed runs; a token is a
    target when its characters lie in a target run (it must not straddle two runs)."""
    chars = [flag for text, flag in runs for _ in text]
    flags, pos = [], 0
    for t in ids:
        piece = tokenizer.decode([int(t)], skip_special_tokens=False)
        inside = set(chars[pos : pos + len(piece)])
        assert len(inside) == 1, f"token {piece!r} straddles a mark"
        flags.append(inside.pop())
        pos += len(piece)
    assert pos == len(chars)
    return flags


@pytest.fixture()
def show_config(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    chats = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS * 2)]
    )
    text = "Q: What is the capital of France? [see 1]\nA: Paris. a[[0]] \\ done"
    texts = write_jsonl(
        tmp_path / "text.jsonl", [{"text": f"{text} {i}", "loss_masking_spans": [[0, 32]]} for i in range(5)]
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\n"
        f"data: {{train: [{{path: {chats}}}, {{path: {texts}}}], packing: bfd, max_seq_length: 256}}\n"
    )
    return cfg


def test_show_marks_exactly_the_label_positions(show_config, capsys):
    assert main(["prepare", str(show_config)]) == 0  # builds the cache
    capsys.readouterr()
    cache = show_config.parent / "cache" / "data"
    before = sorted((p, p.stat().st_mtime_ns) for p in cache.rglob("*"))
    assert main(["prepare", str(show_config), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert main(["prepare", str(show_config), "--show", "2"]) == 0
    timeless = functools.partial(re.sub, r"prepared in [0-9.]+s", "prepared in Ts")
    assert timeless(capsys.readouterr().out) == timeless(out)  # seeded sample, same output (but the timing)
    assert sorted((p, p.stat().st_mtime_ns) for p in cache.rglob("*")) == before  # --show writes nothing
    data = prepare_run_data(load_config(show_config))
    tokenizer = data.tokenizer
    by_place = {}
    for source, examples in zip(data.report.source_data, data.report.source_examples):
        for i in range(len(examples)):
            by_place[source.where_token(int(examples.start[i]))] = examples.arrays(i)
    shown = blocks(out)
    assert [(m[1], m[2], os.path.basename(m[3])) for m, _ in shown] == [
        ("1", "2", "chat.jsonl"),
        ("2", "2", "chat.jsonl"),
        ("1", "2", "text.jsonl"),
        ("2", "2", "text.jsonl"),
    ]
    for m, body in shown:
        ids, labels = by_place[f"{m[3]}:{m[4]}"]
        assert (int(m[5]), int(m[6])) == (len(ids), int((labels != IGNORE_INDEX).sum()))
        runs = parse_marked(body)
        assert token_flags_from_marks(tokenizer, ids, runs) == [
            lab != IGNORE_INDEX for lab in labels.tolist()
        ]
        assert any(flag for _, flag in runs) and any(not flag for _, flag in runs)
    assert "\\[\\[0\\]\\]" in out  # the text's own brackets are escaped
    assert re.search(r"== train\[0\] .*chat.jsonl: format: messages \(6 rows\); targets: \d+\.\d% of", out)
    assert re.search(r"== train\[1\] .*text.jsonl: format: text \(5 rows\); targets: \d+\.\d% of", out)
    assert re.search(r"lengths: min \d+, median \d+, p95 \d+, max \d+ tokens", out)
    assert "packing: packed (bfd) into" in out and "length histogram" in out
    assert "warning: fields no reader of the format uses, ignored: id (6 rows)" in out
    assert "train 11 examples" in out and "rows (packing: bfd)" in out


def test_show_colours_targets_on_a_terminal(show_config):
    from rich.console import Console

    from sftlab.data.preview import RICH_LEGEND, TARGET_STYLE, styled

    text = styled([("ctx ", False), ("answer", True), (" more", False)])
    assert [(text.plain[s.start : s.end], str(s.style)) for s in text.spans if s.style == TARGET_STYLE] == [
        ("answer", TARGET_STYLE)
    ]
    data = prepare_run_data(load_config(show_config))
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", soft_wrap=True)
    print_preview(data, load_config(show_config), console, 1)
    out = console.file.getvalue()
    assert RICH_LEGEND in out and "\x1b[1;32m" in out and "[[" not in out.split("text.jsonl")[0]
