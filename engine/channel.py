"""A per-request output channel that a blocking iterator and an asyncio task can both read."""

from __future__ import annotations

import asyncio
import threading
from collections import deque


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class OutputChannel:
    """Thread-safe queue of stream deltas (or one exception) from the engine loop to one consumer."""

    def __init__(self):
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item) -> None:
        """Deliver a delta or an exception; wakes a blocked thread or an awaiting task."""
        with self._cv:
            self._items.append(item)
            self._cv.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:
                pass  # the consumer's event loop is closed: nobody is listening any more

    def get(self, timeout: float | None = None):
        """Block until the next item arrives."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._items, timeout=timeout):
                raise TimeoutError("no output from the engine within the timeout")
            return self._items.popleft()

    async def aget(self):
        """Await the next item without tying up a thread."""
        while True:
            with self._cv:
                if self._items:
                    return self._items.popleft()
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._waiter = (loop, fut)
            await fut
