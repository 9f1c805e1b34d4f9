"""A whole swarm on this machine: a coordinator and volunteer peers as separate processes on
127.0.0.1, each in its own process group, observed through their JSON event files and always
reaped (peer, DHT process and p2pd daemons). Used by `lte-swarm demo`, the benchmarks and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from swarm.errors import LTESwarmError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding `peers` and `swarm`


def peer_threads() -> int:
    """torch threads of every local peer process (`LTE_PEER_THREADS`, default 1). A head's
    arithmetic depends on it (CPU kernels split their sums by thread), so whatever replays these
    peers' training bit for bit must use it too."""
    return int(os.environ.get("LTE_PEER_THREADS") or 1)


class LocalSwarmError(LTESwarmError):
    """A local peer process died or did not get where it should in time."""


def process_family(pid: int) -> list[int]:
    """PIDs of a process and every process it started (hivemind's DHT and averager processes, their
    p2pd daemons); none once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def tree_pss(pid: int) -> int:
    """Bytes of memory held by a process family (`process_family`): the sum of their proportional
    set sizes, in which a page shared by k processes counts 1/k in each (forked processes share
    much of their parent's memory)."""
    total = 0
    for member in process_family(pid):
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:  # gone meanwhile
            continue
        total += 1024 * next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


def tree_fds(pid: int) -> int:
    """Open file descriptors of a process family (`process_family`)."""
    total = 0
    for member in process_family(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:  # gone meanwhile
            pass
    return total


class PeerProcess:
    def __init__(self, name: str, args: list[str], events: Path, log: Path, cwd: Path):
        self.name, self.events, self.log = name, events, log
        self._log_file = open(log, "w")
        # One compute thread each: the processes share this machine's cores, and torch's default
        # of a thread per core in every process oversubscribes them many times over.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(peer_threads())}
        # The processes run this very copy of the code, wherever the caller imported it from.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        self.handle = subprocess.Popen(args, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env)

    def read(self) -> list[dict]:
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
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
                raise LocalSwarmError(f"{self.name} exited ({self.handle.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.2)
        raise LocalSwarmError(f"{self.name}: timed out waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:]) if self.log.exists() else ""

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.handle.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.handle.wait(timeout)


class LocalSwarm:
    def __init__(self, workdir: Path, config: Path, launcher: Callable[[str], list[str]] | None = None):
        """`launcher(name)` is a command prefix for the process called `name`, e.g. `ip netns exec NS`
        to run it in a network namespace of its own (scripts/bench_wan.py); none by default."""
        # Absolute: the processes run in the workdir, the caller may be anywhere.
        self.workdir, self.config = Path(workdir).resolve(), Path(config).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher
        self.procs: list[PeerProcess] = []
        self.coordinator: PeerProcess | None = None
        self.run_id = ""
        self.maddrs: list[str] = []

    def spawn(self, name: str, args: list[str]) -> PeerProcess:
        """Start `python ARGS` as the process `name` (events in `name`.jsonl, log in `name`.log),
        reaped by `close`; ARGS can use {events} for the events file's path."""
        events = self.workdir / f"{name}.jsonl"
        prefix = self.launcher(name) if self.launcher is not None else []
        command = [*prefix, sys.executable, *(a.replace("{events}", str(events)) for a in args)]
        proc = PeerProcess(name, command, events, self.workdir / f"{name}.log", self.workdir)
        self.procs.append(proc)
        return proc

    def start_coordinator(self, *extra: str, run_dir: Path | None = None, timeout: float = 120) -> PeerProcess:
        proc = self.spawn("coordinator", [
            "-m", "peers.cli", "start", "--config", str(self.config),
            "--run-dir", str(Path(run_dir).resolve() if run_dir else self.workdir / "run"), "--events", "{events}",
            "-v", *extra])
        found = proc.wait_for(lambda es: any(e["event"] == "started" for e in es), timeout, "the run to start")
        maddrs = next(e for e in found if e["event"] == "maddrs")
        self.run_id, self.maddrs = maddrs["run_id"], maddrs["maddrs"]
        self.coordinator = proc
        return proc

    def join(self, name: str, *extra: str) -> PeerProcess:
        return self.spawn(name, ["-m", "peers.cli", "join", "--initial-peers", *self.maddrs, "--run-id", self.run_id,
                                 "--events", "{events}", "-v", *extra])

    def close(self, grace: float = 15.0) -> None:
        """SIGTERM everyone still running, then SIGKILL each whole process group."""
        for proc in self.procs:
            if proc.handle.poll() is None:
                proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.handle.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc.signal_group(signal.SIGKILL)
            proc._log_file.close()
