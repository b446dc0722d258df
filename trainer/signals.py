"""SIGTERM / SIGINT for the whole life of a command, so a signal always ends in a defined state.

`cli.main` installs the one `STOP` flag before anything heavy is imported. Until a command
says it can stop at a safe point, a signal raises `Stopped` where the code happens to be:
writers clean up their temporary folders on the way out (every write is temp + rename), and
the CLI exits 128 + signal with one line. Inside `STOP.polling(...)` (the training loops and
the end-of-run work) a signal only sets the flag; the loop finishes its step, saves and exits
0. A second signal exits at once, unless it is the same signal within `REPEAT_WINDOW` of the
first: a scheduler (SLURM signals every process of a job step) or a terminal (Ctrl+C reaches
the whole process group) hits a worker and its launcher at the same instant, and the launcher
forwards its copy a millisecond later. That echo is one stop, not a person asking twice.
Kept free of torch and numpy: it must be importable in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# seconds: the same signal again within this is the first one's echo (see above), not a second stop
REPEAT_WINDOW = 1.0


class Stopped(BaseException):
    """A signal arrived while the command could not stop at a safe point. A BaseException, so
    `except Exception` in library code does not swallow it (KeyboardInterrupt is one too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _say(text: str) -> None:
    # os.write, not print: a handler that prints while the interrupted code is inside a print
    # (a tqdm bar, a log line) raises "reentrant call" on the buffered stream
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


class StopFlag:
    """Truthy once a signal arrived. Raise mode by default; `polling()` switches to flag mode."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._polling: list[str] = []  # what the innermost polling block does on a signal
        self._previous: dict[int, object] = {}
        self._at = 0.0  # time.monotonic() of the first signal

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == self.signal and time.monotonic() - self._at < REPEAT_WINDOW:
                return  # the same stop, delivered twice (a launcher forwarding what the scheduler sent)
            _say(f"\nsecond {signal.Signals(signum).name}: exiting now without saving\n")
            os._exit(128 + signum)
        self.signal, self._at = signum, time.monotonic()
        if not self._polling:
            raise Stopped(signum)
        _say(f"\n{signal.Signals(signum).name} received: {self._polling[-1]} (send it again to exit at once)\n")

    def install(self) -> "StopFlag":
        """Take over SIGTERM and SIGINT (main thread only; elsewhere the caller's handlers stay)."""
        if not self._previous:
            self.signal = None
            try:
                for sig in SIGNALS:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an in-process test): signals are not ours to take
                self._previous.clear()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def polling(self, what: str):
        """Inside: a signal sets the flag (printing `what` will happen) and the code polls it."""
        installed_here = not self._previous
        self.install()
        self._polling.append(what)
        try:
            yield self
        finally:
            self._polling.pop()
            if installed_here:
                self.uninstall()


STOP = StopFlag()
