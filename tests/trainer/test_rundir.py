"""Safe output directories: a finished run (or anyone's files) is not overwritten unless asked, a finished
run is marked, `resume=auto` on it does nothing and succeeds, and an interrupt prints the real command."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from sftlab.cli import main
from sftlab.config import SFTConfig
from sftlab.trainer import callbacks as callbacks_mod
from sftlab.trainer import loop as loop_mod
from sftlab.trainer.checkpoint import complete_checkpoints
from sftlab.trainer.loop import RunError, run_training
from sftlab.trainer.rundir import FINISHED, kind_of


def tree(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 256},
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "train": {"output_dir": str(out), "micro_batch_size": 4, "max_steps": 2, **train},
        "checkpoint": {"every_steps": 1},
    }


def train(t: dict):
    return run_training(SFTConfig.model_validate(t))


def no_data_phase(monkeypatch):
    """Fail the test if the run gets as far as reading data."""

    def boom(*args, **kwargs):
        raise AssertionError("the data phase ran")

    monkeypatch.setattr(loop_mod, "prepare_run_data", boom)


def test_finished_run_is_marked_refused_and_replaced_with_overwrite(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train(tree(tiny_model_dir, chat_file, out))
    marker = json.loads((out / FINISHED).read_text())
    assert marker["steps"] == 2 and marker["final_loss"] > 0 and kind_of(out) == "finished"
    before = (out / "model.safetensors").read_bytes()

    with monkeypatch.context() as m:
        no_data_phase(m)
        with pytest.raises(RunError, match=r"holds a finished run \(2 optimizer steps.*train.overwrite=true"):
            train(tree(tiny_model_dir, chat_file, out, max_steps=1))
    assert (out / "model.safetensors").read_bytes() == before

    res = train(tree(tiny_model_dir, chat_file, out, max_steps=1, overwrite=True))
    assert res.steps == 1 and json.loads((out / FINISHED).read_text())["steps"] == 1
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == [
        "step-00000001"
    ]  # the old run's are gone
    assert (out / "model.safetensors").read_bytes() != before


def test_resume_auto_on_a_finished_run_exits_0_without_training(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree(tiny_model_dir, chat_file, out)))
    assert main(["train", str(cfg)]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    no_data_phase(monkeypatch)
    assert main(["train", str(cfg), "train.resume=auto", "train.log_every=5"]) == 0
    printed = capsys.readouterr().out
    assert "complete" in printed and "holds a finished run (2 optimizer steps" in printed
    assert (out / "metrics.jsonl").read_text() == metrics and (out / FINISHED).is_file()
    res = run_training(SFTConfig.model_validate(tree(tiny_model_dir, chat_file, out, resume="auto")))
    assert res.completed_before and res.steps == 2 and [r["step"] for r in res.history] == [1, 2]
    # a breaking change is still named, not silently called complete
    with pytest.raises(RunError, match=r"train.seed: \d+ -> 7"):
        run_training(SFTConfig.model_validate(tree(tiny_model_dir, chat_file, out, resume="auto", seed=7)))


def test_unfinished_run_needs_resume_or_overwrite(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tree(tiny_model_dir, chat_file, out))
    (out / FINISHED).unlink()  # as if killed after its last checkpoint
    with monkeypatch.context() as m:
        no_data_phase(m)
        with pytest.raises(
            RunError,
            match=r"holds an unfinished run \(latest checkpoint step-00000002\)\. "
            r"Continue it with train.resume=auto",
        ):
            train(tree(tiny_model_dir, chat_file, out))
    res = train(
        tree(tiny_model_dir, chat_file, out, resume="auto")
    )  # resumes at the end: only the finish is left
    assert not res.completed_before and (out / FINISHED).is_file()


def test_other_files_are_refused_and_kept_with_overwrite(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with monkeypatch.context() as m:
        no_data_phase(m)
        with pytest.raises(RunError, match=r"is not empty \(1 entries: notes.txt\) and holds no sftlab run"):
            train(tree(tiny_model_dir, chat_file, out))
        with pytest.raises(
            RunError, match="is not empty"
        ):  # resume=auto finds no checkpoint there: not a resume
            train(tree(tiny_model_dir, chat_file, out, resume="auto"))
    train(tree(tiny_model_dir, chat_file, out, overwrite=True))
    assert (out / "notes.txt").read_text() == "precious" and (out / FINISHED).is_file()


def test_an_empty_or_hidden_only_dir_is_fine(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".gitkeep").write_text("")
    assert kind_of(out) == "empty"
    assert train(tree(tiny_model_dir, chat_file, out)).steps == 2


def test_interrupt_is_acknowledged_at_once_checkpoints_and_prints_the_resume_command(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    cfg = tmp_path / "my config.yaml"
    cfg.write_text(yaml.safe_dump(tree(tiny_model_dir, chat_file, out, max_steps=5)))
    seen = {}

    class InterruptAtStep1:  # Ctrl-C after step 1's record, when no checkpoint is due (none configured)
        def on_step_end(self, record):
            if record["step"] == 1:
                os.kill(os.getpid(), signal.SIGINT)
                seen["at_once"] = (
                    capsys.readouterr().err
                )  # the handler has run: what it printed, before anything else

    monkeypatch.setattr(callbacks_mod, "env_callbacks", lambda: [InterruptAtStep1()])
    assert main(["train", str(cfg), "optim.lr=1e-3", "train.resume=null"]) == 130
    assert (
        "SIGINT: stopping after this optimizer step and saving a checkpoint; press Ctrl-C again to exit "
        "without saving"
    ) in seen["at_once"]
    printed = capsys.readouterr().out
    assert f"resume with: sftlab train '{cfg}' optim.lr=1e-3 train.resume=auto" in printed
    assert (
        out / "checkpoints" / "step-00000001" / "COMPLETE"
    ).is_file()  # the signal came after the step's save point


def test_a_mistyped_data_path_fails_before_an_overwrite_clears_anything(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    from sftlab.data import sources
    from sftlab.data.types import DataError

    out = tmp_path / "run"
    train(tree(tiny_model_dir, chat_file, out))
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    typo = str(chat_file).replace(".jsonl", ".jsnol")
    with pytest.raises(DataError, match=r"data source not found: .*chat.jsnol; did you mean .*chat.jsonl\?"):
        train(tree(tiny_model_dir, typo, out, overwrite=True))
    assert (out / FINISHED).is_file() and (out / "model.safetensors").is_file()
