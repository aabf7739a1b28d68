"""The run report (report.md + loss.png, `sftlab report`) and the experiment trackers (read back offline)."""

from __future__ import annotations

import glob
import json
import sqlite3

import pytest
from test_loop import make_cfg

from sftlab.cli import main as cli_main
from sftlab.trainer.loop import RunError, run_training
from sftlab.trainer.report import write_report
from sftlab.trainer.tracking import names_of


def test_report_md_and_plot_after_a_run_and_regenerated(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    run_training(make_cfg(tiny_model_dir, chat_file, out))
    text = (out / "report.md").read_text()
    assert text.startswith("# sftlab run report: run") and "Status: finished." in text
    for section in ("## Summary", "## Data", "## Exact-match evaluation", "## Configuration (resolved)"):
        assert section in text
    assert "optimizer steps | 4 of 4" in text and "last / best validation loss" in text
    assert "16 examples kept of 16 rows" in text  # the data report
    assert "tokens/s (median step)" in text and "![loss" in text and "output_dir:" in text
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (out / "report.md").unlink()
    (out / "loss.png").unlink()
    assert cli_main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == text and (out / "loss.png").is_file()
    assert cli_main(["report", str(tmp_path)]) == 2  # not a run directory


def test_report_of_an_unfinished_run_lists_skipped_rows(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "step": s,
                    "loss": 2.0 / s,
                    "lr": 1e-4,
                    "epoch": s / 10,
                    "tokens_per_s": 100.0,
                    "target_tokens": 50,
                }
            )
            for s in (1, 2, 3)
        )
        + "\n"
    )
    (run / "data_report.json").write_text(
        json.dumps(
            {
                "summary": "3 examples kept of 5 rows",
                "bad_reasons": {"no assistant turn to learn from": 2},
                "bad_examples": ["d.jsonl:4 field 'messages': no assistant"],
            }
        )
    )
    text = write_report(run).read_text()
    assert "Status: not finished" in text and "2 x no assistant turn to learn from" in text
    assert "d.jsonl:4" in text and "(no match evaluation configured" in text


def test_trackers_write_offline_and_read_back(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "TRACKIO_DIR"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    run_training(
        make_cfg(
            tiny_model_dir,
            chat_file,
            out,
            report_to=["tensorboard", "wandb", "trackio"],
            sample_every="eval",
            sample_prompts=1,
            sample_max_new_tokens=3,
        )
    )
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard" / "run"))
    ea.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars("loss")] == [
        (r["step"], r["loss"]) for r in logged
    ]
    assert [e.step for e in ea.Scalars("eval_loss")] == [r["step"] for r in logged if "eval_loss" in r]
    # the samples beside each evaluation, as text
    assert [e.step for e in ea.Tensors("samples/text_summary")] == [
        r["step"] for r in logged if "samples" in r
    ]

    db = sqlite3.connect(out / "trackio" / "run.db")
    rows = db.execute("select step, metrics from metrics order by step").fetchall()
    assert [(s, json.loads(m)["loss"]) for s, m in rows] == [(r["step"], r["loss"]) for r in logged]
    config = json.loads(db.execute("select config from configs").fetchone()[0])
    assert config["optim.lr"] == 3e-3

    (run_file,) = glob.glob(
        str(out / "wandb" / "offline-run-*" / "run-*.wandb")
    )  # offline: no key configured
    raw = open(run_file, "rb").read()
    assert b"eval_loss" in raw and b"tokens_per_s" in raw and b"optim.lr" in raw


def test_tracker_project_run_name_and_entity(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """train.project / run_name / entity reach the trackers; WANDB_PROJECT is honoured when project is unset."""
    from accelerate import Accelerator

    calls, original = [], Accelerator.init_trackers
    monkeypatch.setattr(
        Accelerator, "init_trackers", lambda self, *a, **k: calls.append((a, k)) or original(self, *a, **k)
    )
    out = tmp_path / "run"
    cfg = make_cfg(
        tiny_model_dir, chat_file, out, report_to=["tensorboard"], project="sweep", run_name="lr3e-3"
    )
    run_training(cfg)
    assert list((out / "tensorboard" / "sweep").glob("events.out.tfevents.*"))
    ((args, kwargs),) = calls
    assert (
        args == ("sweep",) and kwargs["init_kwargs"] == {} and kwargs["config"]["train.run_name"] == "lr3e-3"
    )
    # wandb and trackio keep their settings per process (tests/trainer/test_report_and_trackers.py runs them
    # once, above): what they are handed is checked here
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert names_of(["wandb"], "run", {}) == ("from-env", {"wandb": {"name": "run"}})
    assert names_of(["wandb", "trackio"], "run", {"project": "p", "run_name": "a", "entity": "team"}) == (
        "p",
        {"wandb": {"name": "a", "entity": "team"}, "trackio": {"name": "a"}},
    )
    assert names_of(["tensorboard"], "run", {})[0] == "run"  # WANDB_PROJECT is wandb's, not tensorboard's


def test_a_missing_tracker_package_is_a_clear_error(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        RunError, match=r"train.report_to: wandb needs the wandb package: pip install 'sftlab\[wandb\]'"
    ):
        run_training(make_cfg(tiny_model_dir, chat_file, tmp_path / "run", report_to=["wandb"]))
