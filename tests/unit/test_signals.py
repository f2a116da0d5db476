"""Signals and the time-based checkpoint cadence (ppo_train/signals.py).

One Ctrl-C under the deepspeed launcher is a SIGINT (the terminal's, to every rank) followed by
the launcher's SIGTERM: the second signal used to raise KeyboardInterrupt, so nothing was saved.
Signals are sent to this process for real (Python runs the handler at the next bytecode)."""

from __future__ import annotations

import os
import signal

import pytest

from ppo_train.dist import SINGLE
from ppo_train.signals import SaveClock, StopRequest


@pytest.fixture
def stop():
    request = StopRequest()
    yield request
    request.restore()


def _send(*signals) -> None:
    for sig in signals:
        os.kill(os.getpid(), sig)


def test_ctrl_c_under_the_launcher_requests_one_stop_and_never_aborts(stop):
    _send(signal.SIGINT, signal.SIGTERM, signal.SIGTERM)
    assert stop.requested and stop.poll(SINGLE) == (True, False)


def test_a_second_ctrl_c_gives_up_waiting(stop):
    _send(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is not stop._handle  # the default handler is back


def test_no_signal_interrupts_a_save(stop):
    with stop.saving():
        _send(signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT)
    assert stop.requested and stop.interrupts == 3


def test_handlers_are_restored(stop):
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_save_clock_counts_from_the_last_save():
    now = [100.0]
    clock = SaveClock(2, clock=lambda: now[0])
    now[0] += 119
    assert not clock.due()
    now[0] += 1
    assert clock.due()
    clock.reset()
    assert not clock.due()
    off = SaveClock(0, clock=lambda: now[0])
    now[0] += 10**6
    assert not off.due()


def test_poll_agrees_the_save_flag(stop):
    assert stop.poll(SINGLE, save_due=True) == (False, True)
