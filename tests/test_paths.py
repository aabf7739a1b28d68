"""sftlab.paths: the one rule for what is a local path (never looked up on the Hub), and its error text."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftlab.paths import is_local_path, missing_local_path


@pytest.mark.parametrize(
    "spec",
    [
        "./run",
        "../run",
        ".",
        "..",
        ".hidden",
        "/abs/run",
        "~/run",
        "runs/a/b",
        "C:\\models\\x",
        Path("owner/name"),
    ],
)
def test_paths_that_look_local_are_local(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_local_path(spec)


@pytest.mark.parametrize(
    "spec", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "default", "teknium/OpenHermes-2.5"]
)
def test_hub_ids_are_not_local_unless_they_exist(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_local_path(spec)
    (tmp_path / spec).mkdir(parents=True)
    assert is_local_path(spec)  # a directory of that name is what is meant (transformers reads it too)


def test_a_missing_local_path_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = missing_local_path("./nope")
    assert message.startswith(f"model path not found: ./nope (from {tmp_path}); ")
    assert "never looked up on the Hugging Face Hub" in message
    assert missing_local_path(str(tmp_path / "x"), "model.tokenizer: directory").startswith(
        f"model.tokenizer: directory not found: {tmp_path / 'x'};"
    )  # absolute: no "(from ...)"
    assert missing_local_path(Path("nope")) is not None  # a Path is a path
    (tmp_path / "there").mkdir()
    assert missing_local_path("./there") is None and missing_local_path("owner/name") is None
    assert missing_local_path("x" * 5000) is None  # a name too long for the file system is no path
