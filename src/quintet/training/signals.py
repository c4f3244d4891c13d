"""Stop a run cleanly on Ctrl-C, or on the signals cluster schedulers send before preempting a job.

While a :class:`StopSignals` is installed, the first SIGINT, SIGTERM or SIGUSR1 only records that a
stop was asked for: the Trainer finishes its step, writes a checkpoint and returns, and a run of
several stages starts no further stage. A second signal acts as it would without quintet (Ctrl-C
raises KeyboardInterrupt, SIGTERM terminates), so a stuck process can still be stopped.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """A context manager: while inside, ``received`` names the first stop signal that arrived (or is None)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the received signal (128 + its number)."""
        return 128 + signal.Signals[self.received].value if self.received else 0

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        for other, handler in self._previous.items():
            default = signal.default_int_handler if other == signal.SIGINT else signal.SIG_DFL
            signal.signal(other, handler if callable(handler) else default)

    def __enter__(self) -> StopSignals:
        # signal handlers can only be set from the main thread; elsewhere nothing is installed
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
