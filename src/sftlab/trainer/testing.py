"""Hooks for sftlab's own tests, as callbacks; nothing here runs unless its environment variable is set.

`SFTLAB_TEST_KILL_AFTER_STEP=k`: SIGKILL this process at the end of step k (after that step's
checkpoint, if one was due), on every rank: the resume tests kill a real run, multi-process ones too.
`SFTLAB_TEST_PAUSE_IN_SAVE=<step or *>:<seconds>`: sleep in the middle of writing that checkpoint
(after the model and optimizer files, before COMPLETE), so a test can kill the process there.
`SFTLAB_TEST_STEP_UNITS=<file>`: the main process appends one JSON line per optimizer step: the training
units (indices) of the step over all processes, so a test can check which examples formed each step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any


class KillAfterStep:
    name = "test-kill"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def env_callbacks() -> list[Any]:
    """The test hooks the environment asks for (none in normal runs)."""
    kill_at = os.environ.get("SFTLAB_TEST_KILL_AFTER_STEP")
    return [KillAfterStep(int(kill_at))] if kill_at else []


def pause_in_save(step: int) -> None:
    """SFTLAB_TEST_PAUSE_IN_SAVE (module docstring); called by trainer/checkpoint.py mid-save."""
    spec = os.environ.get("SFTLAB_TEST_PAUSE_IN_SAVE")
    if spec:
        at, seconds = spec.split(":")
        if at == "*" or int(at) == step:
            time.sleep(float(seconds))


def record_step_units(micro_batches: list[list[int]], main: bool) -> None:
    """SFTLAB_TEST_STEP_UNITS (module docstring); called by trainer/loop.py as a step draws its units."""
    path = os.environ.get("SFTLAB_TEST_STEP_UNITS")
    if path and main:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(sorted(int(i) for batch in micro_batches for i in batch)) + "\n")
