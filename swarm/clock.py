"""Time as the protocol sees it: DHT time for records, a monotonic clock for durations, and a sleep
that a stop request cuts short. Injected everywhere, so protocol tests run on a fake clock."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from typing import Callable, Iterator, Sequence, TypeVar

from swarm.errors import Stopped

T = TypeVar("T")
R = TypeVar("R")


class Clock:
    """Real time. `sleep` returns early, raising `Stopped`, once `stop` is set, so no wait of any
    role outlives a Ctrl+C or SIGTERM by more than one DHT call."""

    def __init__(self, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()

    def now(self) -> float:
        """DHT time: what record expirations and ready/claim times are written in (wall clock)."""
        return time.time()

    def monotonic(self) -> float:
        """For durations and local deadlines: never jumps when the wall clock is adjusted."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise Stopped()

    def check(self) -> None:
        """Raise `Stopped` if a stop was requested (between two steps of work)."""
        if self.stop.is_set():
            raise Stopped()

    def background(self, work: Callable[[], T]) -> "Future[T]":
        """Run `work` beside the caller (a merge round's step, while the caller trains on); its
        result or error lands in the future. A daemon thread: a stop ends the work through the
        clock, and an exit never waits for a transfer."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # Stopped too: the caller re-raises it where it waits
                future.set_exception(exc)
        threading.Thread(target=run, name="background-work", daemon=True).start()
        return future

    def wait_for(self, future: Future, timeout: float | None = None) -> None:
        """Until `future` is done or `timeout` passed (whichever comes first)."""
        wait([future], timeout=timeout)

    def gather(self, work: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[tuple[int, R]]:
        """`work` on each item, `workers` at a time; (index, result) as each finishes, so the
        caller keeps its leases alive between two. An error surfaces where its item is handed out;
        leaving the loop early still waits for the work in flight."""
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
            futures = {pool.submit(work, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                yield futures[future], future.result()


class FakeClock(Clock):
    """Time that moves only when told: `sleep` and `advance` move it, nothing else does. Both of
    its readings are the same number, starting at an arbitrary wall-clock-like value."""

    def __init__(self, start: float = 1.7e9, stop: threading.Event | None = None):
        super().__init__(stop)
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def set(self, t: float) -> None:
        self.t = max(self.t, t)

    def sleep(self, seconds: float) -> None:
        self.check()
        self.advance(seconds)

    def background(self, work: Callable[[], T]) -> "Future[T]":
        """Done at once, in the caller's thread: under a fake clock every run replays alike."""
        return settled(work)

    def gather(self, work: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[tuple[int, R]]:
        """One item after another, in order, in the caller's thread (a replayable order)."""
        for i, item in enumerate(items):
            yield i, work(item)


def settled(work: Callable[[], T]) -> "Future[T]":
    """`work` done now, its result or error in a future (what an asynchronous API hands back)."""
    future: Future = Future()
    try:
        future.set_result(work())
    except Exception as exc:
        future.set_exception(exc)
    return future


def run_steps(clock: Clock, step: Callable[[], float], done: Callable[[], bool]) -> bool:
    """Call `step` until `done()`, waiting as long as each step asks (a step that asks for no wait
    is still a point where a stop request is noticed). False if a stop request ended it."""
    try:
        while not done():
            wait = step()
            clock.sleep(wait) if wait > 0 else clock.check()
    except Stopped:
        return False
    return True
