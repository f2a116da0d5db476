"""Stopping cleanly: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and exit;
a time-based checkpoint cadence bounds what a SIGKILL can lose.

What launchers send. Ctrl-C in a terminal gives every process of the foreground group (each
rank) a SIGINT. The deepspeed launcher then also SIGTERMs its ranks one after the other, waiting
up to 30 s for each before a SIGKILL; torchrun and SLURM send SIGTERM first as well. So one
Ctrl-C is two signals per rank, and the second must not be read as "give up": SIGTERM never
aborts, only a second SIGINT (Ctrl-C pressed again) does, and no signal interrupts a save that
is under way (it is finished; the run exits after it). Every rank's request is seen by all of
them at the end of the step (`poll`, one collective), so all ranks save the same step together.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time

from ppo_train.dist import DistInfo, any_ranks


class StopRequest:
    def __init__(self):
        self.requested = False
        self.interrupts = 0  # SIGINTs received
        self._saving = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts >= 2 and not self._saving:  # Ctrl-C again: stop waiting for the step
            self.restore()
            raise KeyboardInterrupt
        if self.interrupts >= 2:
            print("pptrain: a checkpoint is being written; it is finished first", file=sys.stderr)

    @contextlib.contextmanager
    def saving(self):
        """While inside, no signal aborts (a checkpoint or the model is being written)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def poll(self, dist: DistInfo, save_due: bool = False) -> tuple[bool, bool]:
        """(stop, save now) agreed by every rank at a step's end: stop when any rank was asked to
        (a launcher may signal only some ranks, one at a time); save when `save_due` on any rank
        (the clock is rank 0's: other ranks pass False). One collective for both."""
        stop, due = any_ranks([self.requested, save_due], dist)
        return stop, due

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SaveClock:
    """`trainer.save_every_minutes`: a checkpoint once that many minutes have passed since the last
    one (or the start), so that a SIGKILL loses a bounded amount of work. 0 = off."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.seconds, self.clock = minutes * 60.0, clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = self.clock()
