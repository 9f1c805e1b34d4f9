"""Discrete-event time for whole swarms in one process: every role, and every piece of work a role
runs beside itself, is a task on one fake clock. A task runs until it waits (a sleep, a transfer,
a future), then the loop wakes whichever task's time comes first; ties go in the order they were
scheduled. Tasks are threads, but only one of them ever runs at a time, so the protocol code runs
unchanged (its blocking calls suspend the task) and a run replays exactly from the same inputs.

What the plain `FakeClock` cannot do and this can: a transfer that takes seconds lets the rest of
the swarm move on meanwhile, and a merge running beside a peer's training steps really overlaps
them in time."""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
import traceback
from concurrent.futures import Future
from typing import Callable, Iterator, Sequence, TypeVar

from swarm.clock import FakeClock

T = TypeVar("T")
R = TypeVar("R")

HANG_SECONDS = 120.0  # real seconds a task may run without waiting before the loop calls it stuck


class Killed(BaseException):
    """Raised in a task the loop dropped (its node crashed): it must not run on."""


class Task:
    """One thread of work on the loop. `owner` names the node it belongs to (a crash ends all of
    a node's tasks at once)."""

    def __init__(self, work: Callable[[], object], name: str, owner: str | None):
        self.work, self.name, self.owner = work, name, owner
        self.wake = threading.Semaphore(0)
        self.token = 0  # which scheduled wake-up is current; older ones are stale
        self.done = False
        self.killed = False
        self.error: BaseException | None = None
        self.result: object = None
        self.thread: threading.Thread | None = None
        self.waiters: list[Task] = []

    def __repr__(self) -> str:
        return f"Task({self.name})"


class Completion:
    """Something tasks can wait for: a transfer, a DHT answer, work run beside. Done once, with a
    value or an error."""

    def __init__(self, loop: "EventLoop"):
        self.loop = loop
        self.done = False
        self.value: object = None
        self.error: BaseException | None = None
        self.waiters: list[Task] = []
        self.callbacks: list[Callable[[], None]] = []

    def then(self, callback: Callable[[], None]) -> None:
        """Call `callback` in the loop once done (at once if it is)."""
        if self.done:
            callback()
        else:
            self.callbacks.append(callback)

    def finish(self, value: object = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        for task in self.waiters:
            self.loop.schedule(task, self.loop.clock.t)
        self.waiters = []
        for callback in self.callbacks:
            callback()
        self.callbacks = []


class EventFuture(Future):
    """A `concurrent.futures.Future` whose waits suspend the calling task instead of blocking its
    thread (which would stop the whole loop)."""

    def __init__(self, loop: "EventLoop", completion: Completion):
        super().__init__()
        self._loop, self._completion = loop, completion

    def done(self) -> bool:
        return self._completion.done

    def _settle(self, timeout: float | None) -> None:
        if not self._completion.done:
            self._loop.wait(self._completion, timeout)
        if not self._completion.done:
            raise TimeoutError()
        if not super().done():
            if self._completion.error is not None:
                self.set_exception(self._completion.error)
            else:
                self.set_result(self._completion.value)

    def result(self, timeout: float | None = None):
        self._settle(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None):
        self._settle(timeout)
        return super().exception(0)


class EventLoop:
    """The scheduler: a heap of (time, order, what) where what is a task to resume or a callback."""

    def __init__(self, clock: "EventClock"):
        self.clock = clock
        self._heap: list = []
        self._order = itertools.count()
        self._main = threading.Semaphore(0)
        self.current: Task | None = None
        self.live: set[Task] = set()  # tasks not done yet (a done one, and what it returned, is let go)
        self.events = 0

    # ---- scheduling -----------------------------------------------------------------------------
    def spawn(self, work: Callable[[], object], name: str = "task", owner: str | None = None,
              at: float | None = None) -> Task:
        """A new task, first run at `at` (now by default); it belongs to `owner`, or to the owner of
        the task that spawns it."""
        if owner is None and self.current is not None:
            owner = self.current.owner
        task = Task(work, name, owner)
        self.live.add(task)
        self.schedule(task, self.clock.t if at is None else at)
        return task

    def schedule(self, task: Task, t: float) -> None:
        """Wake `task` at `t` (replacing any wake-up it had)."""
        task.token += 1
        heapq.heappush(self._heap, (t, next(self._order), task, task.token))

    def call_at(self, t: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._order), callback, 0))

    def kill(self, owner: str) -> None:
        """Drop every task of `owner` at once, wherever it is (a SIGKILL): none of them runs again."""
        for task in self.live:
            if task.owner == owner:
                task.killed = True

    # ---- running ----------------------------------------------------------------------------------
    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Process events in time order up to fake time `until`, or until `stop()` holds."""
        while self._heap:
            t, _, what, token = self._heap[0]
            if t > until or (stop is not None and stop()):
                return
            heapq.heappop(self._heap)
            if isinstance(what, Task):
                if what.done or what.killed or token != what.token:
                    continue
                self.clock.set(t)
                self.events += 1
                self._resume(what)
            else:
                self.clock.set(t)
                what()
        self.clock.set(until)

    def _resume(self, task: Task) -> None:
        self.current = task
        if task.thread is None:
            task.thread = threading.Thread(target=self._body, args=(task,), name=f"sim-{task.name}", daemon=True)
            task.thread.start()
        else:
            task.wake.release()
        if not self._main.acquire(timeout=HANG_SECONDS):
            frame = sys._current_frames().get(task.thread.ident)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "?"
            raise RuntimeError(f"task {task.name} ran {HANG_SECONDS:.0f}s of real time without waiting "
                               f"(blocked outside the loop?):\n{where}")
        self.current = None

    def _body(self, task: Task) -> None:
        try:
            task.result = task.work()
        except Killed:
            pass
        except BaseException as exc:  # kept for whoever waits on the task; the loop goes on
            task.error = exc
        finally:
            task.done = True
            self.live.discard(task)
            for waiter in task.waiters:
                self.schedule(waiter, self.clock.t)
            task.waiters = []
            self._main.release()

    # ---- waiting (inside a task) ----------------------------------------------------------------
    def _suspend(self) -> None:
        task = self.current
        self._main.release()
        task.wake.acquire()
        self.current = task
        if task.killed:
            raise Killed()

    def _task(self) -> Task:
        task = self.current
        if task is None or threading.current_thread() is not task.thread:
            raise RuntimeError("a wait on the event loop from outside its tasks")
        return task

    def sleep_until(self, t: float) -> None:
        task = self._task()
        self.schedule(task, max(t, self.clock.t))
        self._suspend()

    def wait(self, completion: Completion, timeout: float | None = None) -> None:
        """Until `completion` is done, or `timeout` seconds passed."""
        task = self._task()
        if completion.done:
            return
        completion.waiters.append(task)
        task.token += 1  # no wake-up pending but the completion's, or the timeout's
        if timeout is not None:
            self.schedule(task, self.clock.t + timeout)
        self._suspend()
        if task in completion.waiters:
            completion.waiters.remove(task)

    def wait_tasks(self, tasks: list[Task]) -> None:
        """Until at least one of `tasks` is done."""
        task = self._task()
        if any(t.done for t in tasks):
            return
        task.token += 1
        for t in tasks:
            t.waiters.append(task)
        self._suspend()
        for t in tasks:
            if task in t.waiters:
                t.waiters.remove(task)


class EventClock(FakeClock):
    """The clock of a discrete-event swarm: `sleep` and `advance` suspend the calling task, work
    run beside or in parallel becomes tasks of its own."""

    def __init__(self, start: float = 1.7e9):
        super().__init__(start)
        self.loop = EventLoop(self)

    def sleep(self, seconds: float) -> None:
        self.check()
        self.loop.sleep_until(self.t + max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        if self.loop.current is None:
            super().advance(seconds)
        else:
            self.loop.sleep_until(self.t + max(0.0, seconds))

    def background(self, work: Callable[[], T]) -> "Future[T]":
        completion = Completion(self.loop)

        def run() -> None:
            try:
                completion.finish(work())
            except Killed:
                raise
            except BaseException as exc:
                completion.finish(error=exc)
        self.loop.spawn(run, name="beside")
        return EventFuture(self.loop, completion)

    def wait_for(self, future: Future, timeout: float | None = None) -> None:
        if not isinstance(future, EventFuture):
            if not future.done():
                raise RuntimeError("a foreign future on the event loop")
            return
        try:
            future._settle(timeout)
        except TimeoutError:
            pass

    def gather(self, work: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[tuple[int, R]]:
        """At most `workers` items in flight as tasks of their own, handed out as each finishes."""
        pending = list(enumerate(items))
        running: dict[Task, int] = {}
        while pending or running:
            while pending and len(running) < max(1, workers):
                i, item = pending.pop(0)
                running[self.loop.spawn(lambda item=item: work(item), name="gather")] = i
            self.loop.wait_tasks(list(running))
            for task in [t for t in running if t.done]:
                i = running.pop(task)
                if task.error is not None:
                    raise task.error
                yield i, task.result
