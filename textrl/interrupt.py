"""Stopping a training loop cleanly on SIGINT (Ctrl-C) or SIGTERM.

A training iteration that is cut in the middle leaves the optimizer, the RNGs and the KL controller in a
state no checkpoint can describe, so a first signal only asks the loop to stop: it finishes the iteration
it is in, writes a checkpoint and raises :class:`TrainingInterrupted`, from which the run resumes exactly.
A second signal abandons the iteration at once (a plain ``KeyboardInterrupt``); the last checkpoint
written stays as it was.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a complete iteration (and, when a folder was set, a checkpoint).

    A ``KeyboardInterrupt`` so that a script's ``except Exception`` does not swallow a Ctrl-C.

    Attributes:
        signum: the signal that stopped it (``signal.SIGINT`` or ``signal.SIGTERM``).
        checkpoint: the newest checkpoint (written on the way out, unless ``abandoned``), or None.
        num_timesteps: the agent's token count when it stopped.
        abandoned: a second signal stopped it in the middle of an iteration, which was not completed; the
            checkpoint is the last one written before.
    """

    def __init__(self, signum: int, checkpoint: Path | None, num_timesteps: int, abandoned: bool = False):
        self.signum, self.checkpoint, self.num_timesteps = signum, checkpoint, num_timesteps
        self.abandoned = abandoned
        name = signal.Signals(signum).name
        if abandoned:
            where = f"last checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint was written"
            super().__init__(f"stopped at once by a second {name}: the iteration in progress was abandoned; {where}")
        else:
            where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (no folder to write it to)"
            super().__init__(f"stopped by {name} at {num_timesteps} tokens; {where}")


class StopRequest:
    """A context manager that turns SIGINT/SIGTERM into a request the loop polls (``requested``).

    Handlers are installed only in the main thread, and only over the interpreter's defaults: a program that
    installed its own SIGINT or SIGTERM handler keeps it. Leaving the context restores what was there.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, message: str = ""):
        self.message = message
        """Printed to stderr on the first signal (what happens next)."""
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: abandon the iteration now
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: {self.message} (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is defaults[signum]:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
