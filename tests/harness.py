"""Real multi-process swarms on 127.0.0.1 for tests: a coordinator and volunteer peers, each in its
own process group, observed through their JSON event files, always reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from tests.conftest import ROOT

FAST_SWARM = dict(lease_seconds=6.0, settle_seconds=0.5, merge_grace=3.0, round_timeout=20.0,
                  request_timeout=5.0, poll_seconds=0.1, checkpoint_every=2)


def write_config(path: Path, *, heads: int, merge_every: int, rounds: int, **swarm) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "digits-vit-tiny.yaml").read_text())
    raw["lte"].update(heads=heads, merge_every=merge_every)
    per_head = 8
    raw["train"].update(batch_size=per_head * heads, samples=per_head * heads * merge_every * rounds, eval_every=1,
                        warmup_steps=2)
    raw["model"]["args"].update(depth=2)
    raw["swarm"] = {**FAST_SWARM, **swarm}
    path.write_text(yaml.safe_dump(raw))
    return path


class Proc:
    def __init__(self, name: str, args: list[str], events: Path, log: Path):
        self.name, self.events, self.log = name, events, log
        self.handle = subprocess.Popen(args, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def read(self) -> list[dict]:
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return out

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.read() if e["event"] == kind]

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.read()
            if predicate(events):
                return events
            if self.handle.poll() is not None and not predicate(self.read()):
                raise AssertionError(f"{self.name} exited ({self.handle.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: timed out waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:]) if self.log.exists() else ""

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.handle.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.handle.wait(timeout)


class Swarm:
    """Starts processes in tmp_path and guarantees they (and their p2pd daemons) are gone afterwards."""

    def __init__(self, tmp_path: Path, config: Path):
        self.tmp, self.config = tmp_path, config
        self.procs: list[Proc] = []
        self.coordinator: Proc | None = None
        self.run_id = ""
        self.maddrs: list[str] = []

    def start_coordinator(self, run_dir: Path | None = None) -> Proc:
        args = [sys.executable, "scripts/start_run.py", "--config", str(self.config),
                "--run-dir", str(run_dir or self.tmp / "run"), "--events", str(self.tmp / "coordinator.jsonl"), "-v"]
        proc = Proc("coordinator", args, self.tmp / "coordinator.jsonl", self.tmp / "coordinator.log")
        self.procs.append(proc)
        events = proc.wait_for(lambda es: any(e["event"] == "started" for e in es), 90, "the run to start")
        found = next(e for e in events if e["event"] == "maddrs")
        self.run_id, self.maddrs = found["run_id"], found["maddrs"]
        self.coordinator = proc
        return proc

    def join(self, name: str, *extra: str) -> Proc:
        args = [sys.executable, "-m", "peers.cli", "join", "--initial-peers", *self.maddrs, "--run-id", self.run_id,
                "--events", str(self.tmp / f"{name}.jsonl"), "-v", *extra]
        proc = Proc(name, args, self.tmp / f"{name}.jsonl", self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.handle.poll() is None:
                proc.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.handle.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc.kill_group(signal.SIGKILL)  # the group: the peer, its DHT process and p2pd daemons


def last(proc: Proc, kind: str) -> dict:
    events = proc.of(kind)
    assert events, f"{proc.name} has no {kind} event:\n{proc.tail()}"
    return events[-1]
