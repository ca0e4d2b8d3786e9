"""The Ctrl-C handling around a Tune fit (smile_ray/orchestration/runner.py), without
Ray: what happens to an interrupt is decided by Python's signal machinery, which these
tests drive with real signals."""
from __future__ import annotations

import os
import signal
import sys
import time
import weakref

import pytest

from smile_ray.orchestration.runner import TUNE_SIGINT_ENV, interrupts_to_tune
from test_interrupts import Thing, raising_callback


def test_a_ctrl_c_before_tunes_loop_stops_at_once_and_everything_is_restored(monkeypatch):
    monkeypatch.delenv(TUNE_SIGINT_ENV, raising=False)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1), sys.unraisablehook
    with pytest.raises(KeyboardInterrupt):
        with interrupts_to_tune() as got:
            signal.raise_signal(signal.SIGINT)  # no Tune handler on SIGUSR1 yet
    assert got == [signal.SIGINT]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1), sys.unraisablehook) == before
    assert TUNE_SIGINT_ENV not in os.environ


def test_the_first_ctrl_c_goes_to_tunes_graceful_stop_and_a_second_stops_at_once():
    stops = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: stops.append(signum))  # what Tune installs
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_to_tune() as got:
                signal.raise_signal(signal.SIGINT)
                assert got == [signal.SIGINT] and stops == [signal.SIGINT]  # noted, and Tune asked to stop
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_a_ctrl_c_python_cannot_raise_in_a_weakref_callback_is_raised_again_not_printed(capfd):
    """The interrupt lands while a weakref callback runs (the garbage collector runs them
    anywhere): Python would print "Exception ignored in ..." and drop the
    KeyboardInterrupt, and the study would go on; it reaches the main thread again
    instead, and nothing is printed."""
    with pytest.raises(KeyboardInterrupt):
        with interrupts_to_tune() as got:
            thing = Thing()
            ref = weakref.ref(thing, raising_callback(signal.SIGINT))  # noqa: F841 - kept alive so the callback runs
            del thing  # the last reference: CPython runs the callback here
            time.sleep(10)  # where the main thread is next: the interrupt comes again there, at once
    assert got == [signal.SIGINT]
    assert "Exception ignored" not in capfd.readouterr().err
