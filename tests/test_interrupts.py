"""A Ctrl-C that Python could not raise is sent again (smile_ray/interrupts.py), driven
with real signals under Python's own SIGINT handler, as a `smile-ray train` has it."""
from __future__ import annotations

import signal
import sys
import time
import weakref

import pytest

from smile_ray.interrupts import resend_lost_exits, resend_lost_interrupts


class Thing:
    pass


def raising_callback(signum):
    """A weakref callback inside which the handler of ``signum`` runs."""
    def callback(_ref):
        signal.raise_signal(signum)
        for _ in range(3):  # a backward jump: Python runs the pending handler here, inside the callback
            pass
    return callback


def test_a_ctrl_c_inside_a_weakref_callback_reaches_the_main_thread(capfd):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with resend_lost_interrupts():
            thing = Thing()
            ref = weakref.ref(thing, raising_callback(signal.SIGINT))  # noqa: F841 - kept so that the callback runs
            del thing  # the last reference: CPython runs the callback here
            time.sleep(10)  # the main thread's next stop: interrupted there at once
    assert "Exception ignored" not in capfd.readouterr().err


def test_other_unraisable_errors_go_to_the_hook_that_was_there(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def failing_callback(_ref):
        raise ValueError("a bug in a callback")

    with resend_lost_interrupts():
        thing = Thing()
        ref = weakref.ref(thing, failing_callback)  # noqa: F841
        del thing
    assert [u.exc_type for u in seen] == [ValueError] and sys.unraisablehook == seen.append


def test_a_sigterm_exit_inside_a_weakref_callback_ends_the_process_quietly(capfd, monkeypatch):
    """A Ray worker turns SIGTERM into SystemExit (as ray/_private/worker.py's handler
    does); landing in a weakref callback it was printed as "Exception ignored ...
    SystemExit: 1" on a study's terminal and lost. With the hook it is raised in the main
    thread a moment later, and nothing is printed."""
    def exit_on_sigterm(signum, frame):
        raise SystemExit(1)

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    saved = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        resend_lost_exits()
        resend_lost_exits()  # twice is once
        with pytest.raises(SystemExit):
            thing = Thing()
            ref = weakref.ref(thing, raising_callback(signal.SIGTERM))  # noqa: F841
            del thing
            time.sleep(10)
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert "Exception ignored" not in capfd.readouterr().err
