"""The loop every role runs: it steps until done, waits what each step asks, and ends at a stop."""

from __future__ import annotations

import threading

from swarm.clock import FakeClock, run_steps


def test_run_steps_waits_as_asked_and_ends_when_done():
    clock = FakeClock(start=0.0)
    waits = iter([0.5, 0.0, 2.0])
    seen = []

    def step():
        seen.append(clock.now())
        return next(waits)

    assert run_steps(clock, step, lambda: len(seen) == 3) is True
    assert seen == [0.0, 0.5, 0.5] and clock.now() == 2.5


def test_a_stop_request_ends_the_loop_at_its_next_wait_even_a_zero_one():
    stop = threading.Event()
    clock = FakeClock(start=0.0, stop=stop)
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 2:
            stop.set()
        return 0.0

    assert run_steps(clock, step, lambda: False) is False
    assert len(calls) == 2
