"""Train several configs one after another in one launched process (tests share one multi-process launch):
`python launch_runs.py PORT CONFIG [PORT CONFIG ...]`, alone or under torchrun / accelerate launch.

Under a launcher every run after the first opens its process group on a store of its own at its PORT
(a free port the test chose): the run before it took its group down (trainer/distributed.py:
leave_together), and the launcher's store still holds that group's addresses. PORT is unused for the
first run and in one process.
"""

from __future__ import annotations

import os
import sys

from sftlab.cli import main
from sftlab.compat import accelerate as accelerate_compat


def run_all(args: list[str]) -> int:
    for i, (port, config) in enumerate(zip(args[::2], args[1::2])):
        if i and "MASTER_ADDR" in os.environ:
            accelerate_compat.reset_state(reset_partial_state=True)
            os.environ.update(MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="False")
        if main(["train", config]) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_all(sys.argv[1:]))
