"""Ctrl-C that Python could not raise.

Python runs a signal handler wherever the main thread is. When that is a weakref callback
or a finaliser (the garbage collector runs them anywhere), the handler's
``KeyboardInterrupt`` cannot propagate: Python prints "Exception ignored in ..." with a
traceback and drops it, and a run or study goes on as if no Ctrl-C had come.
:func:`resend_lost_interrupts` sends such an interrupt to the main thread again instead,
silently, a moment later (:data:`AGAIN_AFTER_S`), once it has left the callback. Sent
from the hook itself, the handler would run, and raise, inside the hook, where Python
cannot raise either.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

#: how long after a Ctrl-C that Python could not raise it is sent again
AGAIN_AFTER_S = 0.05


def _resending(exc_type: type[BaseException], signum: int, saved):
    """An unraisable hook: ``exc_type`` (raised by a signal handler where Python could not
    raise it) makes ``signum`` go to the main thread again after :data:`AGAIN_AFTER_S`,
    from a timer thread, silently; anything else goes to ``saved``."""
    def on_unraisable(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, exc_type):
            main = threading.main_thread().ident
            threading.Timer(AGAIN_AFTER_S, signal.pthread_kill, (main, signum)).start()
            return
        saved(unraisable)

    return on_unraisable


@contextmanager
def resend_lost_interrupts() -> Iterator[None]:
    """While inside: an unraisable KeyboardInterrupt is sent to the main thread again
    (``signal.pthread_kill`` from a timer thread); any other unraisable exception goes to
    the hook that was there before. The hook is restored on the way out."""
    saved = sys.unraisablehook
    sys.unraisablehook = _resending(KeyboardInterrupt, signal.SIGINT, saved)
    try:
        yield
    finally:
        sys.unraisablehook = saved


def resend_lost_exits() -> None:
    """For the rest of this process (a Ray worker): a ``SystemExit`` that a signal
    handler raised where Python could not raise it (Ray's workers turn the SIGTERM that
    ends them into ``SystemExit``; landing in a weakref callback it was printed as
    "Exception ignored ... SystemExit: 1" on the study's terminal, and the worker went
    on) is not printed: SIGTERM is sent to the main thread again a moment later, so the
    worker exits as Ray asked. Any other unraisable exception goes to the hook that was
    there before. Installing it twice is installing it once."""
    if getattr(sys.unraisablehook, "resends_exits", False):
        return
    hook = _resending(SystemExit, signal.SIGTERM, sys.unraisablehook)
    hook.resends_exits = True
    sys.unraisablehook = hook
