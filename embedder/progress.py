"""Progress of the long loops (pretraining, embedding, fine-tuning): a tqdm bar with rate and
ETA in the terminal, and the same news for a listener the caller registers (the Prefect task
shows it as a progress artifact and logs the bar's values, the training loss, to MLflow as
the run goes), so this library stays free of Prefect and MLflow.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

# (percent done, one line: what, how far, rate, ETA; the step; the latest numeric values
# shown on the bar, e.g. train_loss) -> None
Listener = Callable[[float, str, int, dict[str, float]], None]
_LISTENER: ContextVar[Listener | None] = ContextVar("progress_listener", default=None)
NOTIFY_EVERY_S = 5.0


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send the progress of loops run inside the block to `listener` too.

    `listener(percent 0..100, line, step, values)` is called from the loop's own thread, at
    most every NOTIFY_EVERY_S (5) seconds per Progress plus once at its start and end; what
    it raises stops the loop. Held in a context variable, so it follows the block's thread
    or task, not the process; nested blocks replace the outer listener until they exit."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


class Progress:
    """A tqdm bar (rate, ETA; a line every 10 s instead of a redraw when not a terminal)
    that also tells the listener, at most every NOTIFY_EVERY_S seconds and at the end.

    `total` and `initial` (work done before, e.g. by a resumed run) count `unit`s; the rate
    is counted from `initial`, in units per second. `enabled=False` hides the bar and tells
    no listener. The listener is the one of `listening` when the Progress is created."""

    def __init__(
        self, desc: str, total: int, *, unit: str, initial: int = 0, enabled: bool = True
    ) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit=unit,
            desc=desc,
            disable=not enabled,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,  # logs, not a flood, when piped
        )
        self.desc, self.unit, self.total, self.done = desc, unit, total, initial
        self.listener = _LISTENER.get() if enabled else None
        self.started = time.monotonic()
        self.initial = initial
        self.last = 0.0
        self.values: dict[str, float] = {}
        self._notify(force=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """`n` more units done. `postfix` values are shown on the bar; the numeric ones
        (e.g. train_loss=0.41) replace the values the listener is given."""
        self.done += n
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
            self.values = {k: float(v) for k, v in postfix.items() if isinstance(v, int | float)}
        self.bar.update(n)
        self._notify()

    def _notify(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.listener is None or (not force and now - self.last < NOTIFY_EVERY_S):
            return
        self.last = now
        elapsed = now - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s"
        if rate > 0:
            eta = (self.total - self.done) / rate
            line += f", {rate:,.2f} {self.unit}/s, ETA {_duration(eta)}"
        self.listener(100.0 * self.done / max(self.total, 1), line, self.done, dict(self.values))

    def close(self) -> None:
        """Close the bar and tell the listener the final state."""
        self.bar.close()
        self._notify(force=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
