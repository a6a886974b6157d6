"""Stopping a run cleanly: SIGTERM (preemption, `kill`, a scheduler) or SIGINT (Ctrl-C).

The handler only records the signal; the loop asks `requested(step)` after each step, and when
it says yes finishes that step, writes a checkpoint and exits 0, so rerunning the same command
resumes exactly. A second Ctrl-C aborts at once (KeyboardInterrupt).

With several processes each must stop at the same step, or the others wait forever in the next
collective: there JAX's preemption sync manager (started by `jax.distributed.initialize`)
catches SIGTERM and `multihost_utils.reached_preemption_sync_point(step)` gives every process
the same answer at the same step.

    with StopSignals(process_count) as stop:
        while step < total_steps:
            ...one step...
            if stop.requested(step):
                save(step)
                break
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any


class StopSignals:
    """Records SIGTERM/SIGINT while active (a context manager) and answers `requested`."""

    def __init__(self, process_count: int = 1):
        self.process_count = process_count
        self.received: str | None = None  # the signal's name, once one came
        self._previous: dict[int, Any] = {}
        self._sync_point = process_count > 1

    def __enter__(self) -> StopSignals:
        # Python handles signals in the main thread only; with several processes JAX's
        # preemption notifier owns SIGTERM (a handler of ours would replace it).
        if threading.current_thread() is threading.main_thread() and self.process_count == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort without the checkpoint
        self.received = signal.Signals(signum).name
        print(
            f"zoo: {self.received} received; stopping after this step with a checkpoint "
            "(Ctrl-C again aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (the same answer in every process)."""
        if not self._sync_point:
            return self.received is not None
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        except RuntimeError as e:  # jax.distributed was set up without its preemption service
            logging.warning("no preemption sync across processes (%s): SIGTERM kills the run", e)
            self._sync_point = False
            return False
