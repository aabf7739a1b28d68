"""Stopping a run from outside: SIGINT/SIGTERM finish the step, checkpoint and stop (`StopRequest`);
the run then ends with `Interrupted`, whose exit code is 128 + the signal number."""

from __future__ import annotations

import signal
import sys
import threading

from sftlab.errors import SftlabError


class StopRequest:
    """SIGINT/SIGTERM: finish the current optimizer step, checkpoint, exit. A second Ctrl-C exits at once.
    The first signal is acknowledged at once (on stderr, by the process that `announce`s: the main one)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        if self.announce:
            again = "; press Ctrl-C again to exit without saving" if signum == signal.SIGINT else ""
            sys.stderr.write(
                f"\n{signal.Signals(signum).name}: stopping after this optimizer step and saving a "
                f"checkpoint{again}\n"
            )
            sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(SftlabError, RuntimeError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
