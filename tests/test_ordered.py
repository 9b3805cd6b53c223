"""mega_nerf.ordered.OrderedQueue against a plain list-based reference of its rule, on futures completed by hand
(concurrent.futures.Future with set_result / set_exception): what each add gives back, in submission order
whatever order the work finishes in, the weight bound, early errors and the cancellation of the rest; and
data.store.ordered_map, built on it, against the builtin map."""
from __future__ import annotations

import random
import time
from concurrent.futures import CancelledError, Future

import pytest

from mega_nerf.data.store import ordered_map
from mega_nerf.ordered import OrderedQueue


def reference_takes(weights: list[int], limit: int, finished: list[set[int]]) -> list[list[int]]:
    """The indices each add gives back under the rule (take the oldest while it is finished or the waiting
    weight is over `limit`; taking one finishes it), `finished[i]` being those finished just before add i."""
    waiting: list[int] = []
    done: set[int] = set()
    takes = []
    for i in range(len(weights)):
        done |= finished[i]
        waiting.append(i)
        taken = []
        while waiting and (waiting[0] in done or sum(weights[j] for j in waiting) > limit):
            taken.append(waiting.pop(0))
            done.add(taken[-1])
        takes.append(taken)
    return takes


def take(future: Future[int], value: int) -> int:
    """The caller's side: wait for the future (here: finish it by hand, as its worker would) and take its result."""
    if not future.done():
        future.set_result(value)
    return future.result()


@pytest.mark.parametrize("seed", range(5))
def test_results_come_back_in_order_within_the_bound_as_the_reference_gives_them(seed: int) -> None:
    rng = random.Random(seed)
    n, limit = 40, 8
    weights = [rng.choice([1, 2, 3, 5, 13]) for _ in range(n)]  # 13: heavier than the limit
    finished = [set(rng.sample(range(i), rng.randint(0, i))) for i in range(n)]  # out of order
    futures = [Future() for _ in range(n)]
    queue: OrderedQueue[int] = OrderedQueue(limit)
    takes, results = [], []
    for i in range(n):
        for j in sorted(finished[i], key=lambda _: rng.random()):
            if not futures[j].done():
                futures[j].set_result(j)
        queue.add(futures[i], weights[i])
        taken = []
        for future in queue.due():
            taken.append(futures.index(future))
            results.append(take(future, taken[-1]))
        takes.append(taken)
        given = len(results)
        assert queue.weight == sum(weights[given:i + 1]) <= limit
        assert len(queue) == i + 1 - given
        assert given == i + 1 or not futures[given].done()  # a finished oldest is never left waiting
    assert takes == reference_takes(weights, limit, finished)
    results += [take(future, futures.index(future)) for future in queue.drain()]
    assert results == list(range(n))
    assert queue.weight == 0 and len(queue) == 0


def test_one_item_heavier_than_the_limit_is_waited_for_at_once() -> None:
    queue: OrderedQueue[int] = OrderedQueue(10)
    light, heavy, last = Future(), Future(), Future()
    queue.add(light, 3)
    assert list(queue.due()) == [] and queue.weight == 3
    queue.add(heavy, 20)
    given = []
    for future in queue.due():
        given.append(future)
        take(future, 0)
    assert given == [light, heavy] and queue.weight == 0
    queue.add(last, 3)
    assert list(queue.due()) == [] and queue.weight == 3


def test_a_failed_future_is_raised_early_oldest_first_without_waiting() -> None:
    queue: OrderedQueue[int] = OrderedQueue(100)
    running, first, second = Future(), Future(), Future()
    for future in (running, first, second):
        queue.add(future)
    queue.raise_failed()  # none failed yet: returns at once, though `running` is not done
    second.set_exception(KeyError("second"))
    first.set_exception(ValueError("first"))
    with pytest.raises(ValueError, match="first"):
        queue.raise_failed()
    assert len(queue) == 3 and list(queue.due()) == []  # nothing given back: the oldest is still running


def test_an_error_in_the_block_cancels_what_is_left_and_a_drained_queue_cancels_nothing() -> None:
    started, queued, failed = Future(), Future(), Future()
    started.set_running_or_notify_cancel()  # a worker holds it: it can no longer be cancelled
    failed.set_exception(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"), OrderedQueue(1) as queue:
        for future in (failed, started, queued):
            queue.add(future)
        for future in queue.due():
            future.result()
    assert queued.cancelled() and not started.cancelled()
    with pytest.raises(CancelledError), OrderedQueue(1) as queue:
        queue.add(queued)
        queue.raise_failed()  # a cancelled future counts as failed
    done = Future()
    with OrderedQueue(1) as queue:
        queue.add(done)
        assert [take(f, 7) for f in queue.drain()] == [7]
    assert not done.cancelled()


def test_ordered_map_equals_map_whatever_order_the_threads_finish_in() -> None:
    delays = random.Random(0).choices([0.0, 0.001, 0.003], k=60)

    def slow_square(i: int) -> int:
        time.sleep(delays[i])
        return i * i
    assert list(ordered_map(slow_square, range(60), threads=3)) == list(map(slow_square, range(60)))



def test_ordered_map_cancels_the_work_not_started_when_a_call_fails() -> None:
    """A failing call ends the map with its error, and what is queued behind it and not started is cancelled, not
    run: item 0 fails after 0.3 s while the map has submitted items 1 to 3 (2 threads: at most 3 wait), item 1
    holds the other thread for 1 s, so item 3 is still queued when the error comes back."""
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.3 if i == 0 else 1.0)
        if i == 0:
            raise OSError("disk full")
        return i
    with pytest.raises(OSError, match="disk full"):
        list(ordered_map(work, range(10), threads=2))
    assert {0, 1} <= set(started) and 3 not in started
