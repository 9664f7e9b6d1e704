"""Start-up progress on stderr: a live elapsed-time line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

SPINNER = "|/-\\"


class Progress:
    def __init__(self, out: TextIO | None = None, quiet: bool = False):
        self._out = out if out is not None else sys.stderr  # looked up now: it may have been replaced
        self._live = self._out.isatty()
        self._quiet = quiet

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float,
             check: Callable[[], None] = lambda: None, interval_s: float = 0.1) -> float:
        """Poll `predicate` until true, showing `what` and the elapsed time; `check` raises to give up
        (e.g. a child exited). TimeoutError after timeout_s. Returns the seconds it took."""
        start = time.monotonic()
        if not self._quiet and not self._live:
            print(f"  {what} ...", file=self._out, flush=True)
        tick = 0
        while not predicate():
            check()
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                self._end_line()
                raise TimeoutError(f"timed out after {timeout_s:.0f}s: {what}")
            if self._live and not self._quiet:
                print(f"\r  {SPINNER[tick % 4]} {what} ... {elapsed:4.1f}s", end="", file=self._out, flush=True)
                tick += 1
            time.sleep(interval_s)
        elapsed = time.monotonic() - start
        if not self._quiet:
            prefix = "\r" if self._live else ""
            print(f"{prefix}  ok {what} ({elapsed:.1f}s)    ", file=self._out, flush=True)
        return elapsed

    def note(self, text: str) -> None:
        if not self._quiet:
            print(text, file=self._out, flush=True)

    def _end_line(self) -> None:
        if self._live and not self._quiet:
            print(file=self._out, flush=True)
