"""The `sftlab` command: config show, generate, chat, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import sys

import yaml

from sftlab.cli import main


def test_config_show_prints_the_resolved_demo_config(capsys):
    assert main(["config", "show", "optim.lr=3e-4"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["optim"]["lr"] == 3e-4 and tree["model"]["name_or_path"] == "default"
    assert tree["train"]["max_steps"] == 12  # the demo config, with every default filled in


def test_bad_override_is_one_clear_error(capsys):
    assert main(["config", "show", "optim.lrr=1"]) == 2
    out = capsys.readouterr().out
    assert "optim.lrr: unknown key" in out and "Traceback" not in out


def test_train_with_missing_model_fails_cleanly(tmp_path, chat_file, capsys):
    rc = main(["train", f"model.name_or_path={tmp_path}/nope", f"data.train.0.path={chat_file}",
               f"train.output_dir={tmp_path}/run"])
    assert rc == 2 and "model path not found" in capsys.readouterr().out


def test_generate_and_chat_on_a_saved_model(tiny_model_dir, capsys, monkeypatch):
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hello!", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n/reset\nTell me a joke.\n/exit\n"))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model>") == 2
