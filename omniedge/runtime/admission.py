"""A bounded first-come-first-served queue: one request runs, at most `max_waiting` wait, the rest are refused.

Requests share one model and one memory budget, so they run one at a time; a caller that would wait
behind a full queue gets `QueueFullError` at once instead of piling up threads and request bodies.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator

from omniedge.errors import OmniedgeError


class QueueFullError(OmniedgeError):
    """Too many requests are already waiting."""


class AdmissionQueue:
    """FIFO turns with a bound on how many may wait (None: no bound)."""

    def __init__(self, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise OmniedgeError(f"max_queue must be >= 0, got {max_waiting}", "pass 0 or more, or None")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._busy)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this caller's turn (FIFO) and hold it for the block; QueueFullError if the queue is full."""
        me = object()
        with self._cond:
            if self._busy or self._waiting:
                if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                    self.refused += 1
                    raise QueueFullError(
                        f"the server is busy: 1 request running and {len(self._waiting)} waiting (the limit)",
                        "retry in a moment, or start the server with a larger --max-queue",
                    )
                self._waiting.append(me)
                try:
                    while self._busy or self._waiting[0] is not me:
                        self._cond.wait()
                finally:
                    self._waiting.remove(me)
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
