"""compat/datasets.py against the installed datasets: `Dataset._fingerprint` is a string that names the
content (equal for equal data built the same way, another after a transform), which the data cache keys on."""

from __future__ import annotations

import datasets

from sftlab.compat import datasets as datasets_compat


def test_fingerprint_names_the_content():
    rows = {"text": ["a", "b", "c"]}
    ds = datasets.Dataset.from_dict(rows)
    fp = datasets_compat.fingerprint(ds)
    assert isinstance(fp, str) and fp
    assert fp == ds._fingerprint
    assert datasets_compat.fingerprint(datasets.Dataset.from_dict(rows)) == fp
    assert datasets_compat.fingerprint(ds.select([0, 1])) != fp
    assert datasets_compat.fingerprint(ds.map(lambda r: {"text": r["text"] + "!"})) != fp


def test_fingerprint_of_what_has_none():
    assert datasets_compat.fingerprint(object()) is None
    assert datasets_compat.fingerprint(None) is None
