"""Progress of the long CLI commands (predict, evaluate, calibrate) on stderr.

Shown on a terminal, or anywhere with ``--progress``; ``--no-progress`` silences it. On a
terminal one line is rewritten; elsewhere a line is written at every tenth of the work.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, *, enabled: bool | None = None, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else enabled
        self.tty = tty
        self.started = time.monotonic()
        self._last_tenth = -1
        self._shown = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        share = done / total if total else 1.0
        eta = f", {elapsed / share - elapsed:.0f} s left" if 0 < share < 1 else ""
        text = f"{self.label}: {done}/{total} ({share:.0%}) in {elapsed:.0f} s{eta}"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._shown = True
        else:
            tenth = int(share * 10)
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
