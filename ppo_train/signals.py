"""SIGTERM/SIGINT: finish the current optimizer step, save a checkpoint, exit 0."""

from __future__ import annotations

import signal

from ppo_train.dist import any_rank


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: give up waiting for the step to end
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True

    def any_rank(self, dist) -> bool:
        """True if any rank was asked to stop (a launcher may signal only some ranks)."""
        return any_rank(self.requested, dist)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
