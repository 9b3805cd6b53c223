"""Results of a thread pool taken back in the order the work was submitted, with a bound on what waits.

A loop that hands work to a pool (partition's mask writes, eval's scoring and PNG writes, the image store's
decoding) must keep its results in order and must not let finished-but-untaken work pile up in memory.
`OrderedQueue` holds the submitted futures, each with a weight (1 per item, or its pixels), and gives them back
oldest first: as soon as the oldest is done, and while the waiting weight is over a limit (the loop then waits
for the oldest). Torch-free, and it imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class OrderedQueue(Generic[T]):
    """Submitted futures, given back in submission order with at most `limit` weight waiting after each
    `add` whose `due` was taken in full. Used as a context manager, it cancels what is left when the block
    ends: nothing after a full `drain`, so this matters when the block ends early or on an error."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending: deque[tuple[Future[T], int]] = deque()
        self._weight = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def weight(self) -> int:
        """The weight of the futures not given back yet."""
        return self._weight

    def add(self, future: Future[T], weight: int = 1) -> None:
        """Queue a just-submitted future; take `due()` next to hold the bound."""
        self._pending.append((future, weight))
        self._weight += weight

    def due(self) -> Iterator[Future[T]]:
        """The futures to finish now, oldest first: while the oldest is done or the waiting weight is over the
        limit (so one future heavier than the limit is given back at once). Each is removed as it is given;
        the caller takes its result (waiting for it) before asking for the next."""
        while self._pending and (self._pending[0][0].done() or self._weight > self.limit):
            yield self._pop()

    def drain(self) -> Iterator[Future[T]]:
        """Every future left, oldest first, for the caller to finish at the end."""
        while self._pending:
            yield self._pop()

    def raise_failed(self) -> None:
        """Raise the error of the oldest finished future that failed (CancelledError for a cancelled one), if
        any, without waiting for those still running: a loop calls it to stop before its next piece of work."""
        for future, _ in self._pending:
            if future.done() and future.exception() is not None:
                future.result()

    def _pop(self) -> Future[T]:
        future, weight = self._pending.popleft()
        self._weight -= weight
        return future

    def __enter__(self) -> OrderedQueue[T]:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Cancel the futures left (those not started yet; a running one finishes in its pool)."""
        for future, _ in self._pending:
            future.cancel()
