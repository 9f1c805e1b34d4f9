"""What every peer role runs in and does first and last: its runtime (DHT node, blob transport,
clock, stop event, event log), finding the run, and stopping cleanly."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from swarm import dht_io
from swarm.clock import Clock
from swarm.config import RunConfig, parse_config
from swarm.errors import ConfigError, LTESwarmError
from swarm.identity import Identity
from swarm.keys import RUNS_KEY, RunKeys
from swarm.schemas import RunAnnouncement, RunRecord

if TYPE_CHECKING:
    from swarm.leases import HeadLeases
    from swarm.membership import Membership
    from swarm.rounds import MergeProtocol

log = logging.getLogger(__name__)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class SwarmError(LTESwarmError):
    """The swarm cannot be joined or used: no reachable peer, no such run, no donor."""


def start_dht(initial_peers: list[str], host_maddrs: list[str] | None = None, identity_path: str | None = None,
              client_mode: bool = False, signer: Identity | None = None, announce_maddrs: list[str] | None = None):
    """A hivemind DHT node, or a one-line SwarmError saying why it could not start. `announce_maddrs`
    are the addresses others should dial (a public address in front of `host_maddrs`). With `signer`,
    it signs with that identity and refuses unsigned records from its first moment (validators
    added later would leave a window in which a stranger's record could settle in its storage)."""
    import hivemind
    from hivemind.p2p import P2PDaemonError

    class IsolatedDHT(hivemind.DHT):
        def run(self) -> None:
            _isolate_dht_process(parent=self._parent_pid)
            super().run()

    try:
        validators = signing_validators(signer) if signer is not None else ()
        dht = IsolatedDHT(initial_peers=initial_peers or None, host_maddrs=host_maddrs or LOOPBACK,
                           record_validators=validators,
                           identity_path=identity_path, client_mode=client_mode, start=True,
                           announce_maddrs=announce_maddrs or None,
                           # Keys read once are not searched for again in the background before they
                           # expire: each such search asks every node for the whole key, and a round
                           # reads its records itself when it needs them.
                           cache_refresh_before_expiry=0,
                           startup_timeout=30, await_ready=True)
        try:
            dht.run_coroutine(dht_io.serve_reads)  # others' polls of the keys it holds
            if initial_peers:
                dht.run_coroutine(functools.partial(dht_io.keep_routing, initial_peers=list(initial_peers)))
        except BaseException:
            dht.shutdown()
            raise
        return dht
    except (P2PDaemonError, TimeoutError, ConnectionError, OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f" {' '.join(initial_peers)}" if initial_peers else ""
        raise SwarmError(f"could not start a DHT node or reach the initial peers{where}: {text}") from None


def _isolate_dht_process(parent: int) -> None:
    """Runs first in the DHT's forked process. Ctrl+C in a terminal (and `kill -TERM -PGID`)
    signals a whole process group; if the DHT process and its p2pd daemon got it too, p2pd would
    die at once and the peer's last DHT writes (releasing its heads) and the DHT's shutdown would
    hang on timeouts. So the DHT process and the p2pd it spawns get a process group of their own,
    and only the peer's main process reacts to such signals, shutting the DHT down in order.

    Nothing may outlive the peer: the DHT process asks the kernel for SIGTERM when its parent dies
    (Linux), and on SIGTERM it kills its own children (p2pd) before exiting."""
    import ctypes
    import os
    import sys
    import threading
    import time

    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum, frame):
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the peer died before we got here
        on_term(signal.SIGTERM, None)

    def watch_parent() -> None:
        """Backstop of the death signal: its Python handler runs only when the main thread gets
        to it, and a main thread stuck in a long native call would keep p2pd alive meanwhile."""
        while os.getppid() == parent:
            time.sleep(0.5)
        on_term(signal.SIGTERM, None)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


def announce_run(dht, keys: RunKeys, identity: Identity, record: RunRecord, expiration: float) -> None:
    """The coordinator's signed run record and its entry in the list of runs."""
    dht_io.store(dht, keys.run, identity, record, expiration)
    dht_io.store(dht, RUNS_KEY, identity, RunAnnouncement(created=record.created, model=record.config["model"]["name"]),
                  expiration, tag=keys.run_id)


def announced_runs(dht, now: float) -> list[str]:
    """Run ids announced by the coordinators they pin (anyone can announce a run of their own;
    nobody can announce someone else's)."""
    found = dht_io.read(dht, RUNS_KEY, RunAnnouncement, now)
    runs = []
    for (run_id, writer), _ in found.items():
        try:
            if RunKeys(run_id).coordinator == writer:
                runs.append(run_id)
        except ConfigError:
            continue
    return sorted(set(runs))


def find_run(dht, run_id: str | None, timeout: float = 20.0, clock: Clock | None = None
             ) -> tuple[RunKeys, RunRecord, RunConfig]:
    """Read a run's record (its config), signed by the coordinator its run id pins. With no run
    id: the one run announced, or an error listing them if there are several (a stranger can
    announce a run too, so a volunteer must choose)."""
    clock = clock or Clock()
    deadline = clock.monotonic() + timeout
    keys = RunKeys(run_id) if run_id is not None else None
    while True:
        if keys is None:
            runs = announced_runs(dht, clock.now())
            if len(runs) > 1:
                raise SwarmError(f"{len(runs)} runs are announced in this DHT ({', '.join(runs[:5])}); "
                                 "choose one with --run-id")
            if runs:
                keys = RunKeys(runs[0])
        if keys is not None:
            found = dht_io.by_writer(dht_io.read(dht, keys.run, RunRecord, clock.now())).get(keys.coordinator)
            if found is not None and found.run_id == keys.run_id and found.coordinator == keys.coordinator:
                return keys, found, parse_config(found.config, origin=f"run {keys.run_id}")
        if clock.monotonic() > deadline:
            what = f"run {keys.run_id!r}" if keys is not None else "any run"
            raise SwarmError(f"found no record of {what} signed by its coordinator in the DHT within {timeout:.0f}s; "
                             "check --initial-peers and --run-id, and that the coordinator is up")
        clock.sleep(0.5)


def signing_validators(identity: Identity) -> list:
    """Sign with `identity` (which also checks everyone else's signatures) and accept only signed
    records with finite lifetimes and plain values."""
    from swarm.identity import SignedOnlyValidator

    return [identity.validator, SignedOnlyValidator()]


def install_signing(dht, identity: Identity) -> None:
    """`signing_validators` on a node that was started without them (every node of a run has them
    before it reads or writes; `start_dht(signer=...)` installs them from its first moment)."""
    dht.add_validators(signing_validators(identity))


def install_run_validators(dht, run_id: str) -> None:
    """What a node checks once it knows its run: the status schema and the run scope."""
    from swarm.schemas import run_validators

    dht.add_validators(run_validators(run_id))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, so that loops finish their step and leave cleanly."""
    stop = threading.Event()
    previous = {}

    def handler(signum, frame):
        if stop.is_set():  # second Ctrl+C: give up waiting
            raise KeyboardInterrupt
        log.warning("stopping (signal %d): finishing the current step, then leaving the swarm", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class EventLog:
    """Machine-readable progress: one JSON object per line (for scripts, tests and dashboards)."""

    def __init__(self, path: str | None):
        self._file = open(path, "a", buffering=1) if path else None

    def emit(self, event: str, **fields) -> None:
        import json

        if self._file is not None:
            self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Rounds(NamedTuple):
    server: Any
    leases: "HeadLeases"
    protocol: "MergeProtocol"
    membership: "Membership"


def join_rounds(rt: "Runtime", keys: RunKeys, cfg: RunConfig, model, *, holds_heads: bool, round_: int = 0,
                invite=None) -> Rounds:
    """What every role needs to take part in a run's rounds, wired the same way for all: the run's
    validators, a blob server, who the run admits (with this node's `invite` to a closed run), the
    lease view (with this node's own claims when it `holds_heads`) and the merge protocol over
    `model`."""
    from peers.models import run_reach
    from swarm.admission import install_storage_policy
    from swarm.leases import HeadLeases
    from swarm.membership import Membership
    from swarm.rounds import MergeProtocol

    install_run_validators(rt.dht, keys.run_id)
    server = rt.blob_server(keys.run_id)
    sw = cfg.swarm
    leases = HeadLeases(rt.dht, keys, rt.identity if holds_heads else None, cfg.lte.heads, sw.lease_seconds,
                        sw.settle_seconds, rt.clock, sw.clock_skew, sw.read_replicas, sw.max_heads_per_peer)
    protocol = MergeProtocol(rt.dht, server, keys, rt.identity, sw, model, holders=leases.holders, clock=rt.clock,
                             round_=round_, rounds_total=cfg.rounds, reachable=rt.reachable,
                             reach=run_reach(model, cfg), fragments=cfg.lte.fragments)
    membership = Membership(rt.dht, keys, sw, rt.clock, invite, p2p=rt.p2p)
    leases.incumbents, leases.admits = protocol.incumbents, membership.admits
    server.serves = membership.admits_peer
    install_storage_policy(rt.dht, keys.run_id, sw)
    return Rounds(server, leases, protocol, membership)


@dataclass
class Runtime:
    """What a role (trainer, coordinator, monitor) runs in. Real roles get a hivemind DHT, blobs over
    its P2P and real time; protocol tests get the in-memory network and a fake clock."""

    dht: Any
    stop: threading.Event
    events: EventLog
    clock: Clock
    blob_server: Callable[[str], Any]  # namespace -> a server of this node's blobs
    identity: Identity  # whose signature this node's records carry (its DHT signs with it)
    reachable: bool = True  # False: behind NAT (client mode); it pushes its blobs, serves none

    @property
    def peer(self) -> str:
        """This node's name in the protocol: the fingerprint of its signing key."""
        return self.identity.fingerprint

    @property
    def p2p(self) -> str:
        return str(self.dht.peer_id)



def real_runtime(dht, stop: threading.Event, events: EventLog, identity: Identity, reachable: bool = True) -> Runtime:
    """A runtime on a real DHT node started with `start_dht(signer=identity)`."""
    from swarm.transport import BlobServer

    return Runtime(dht=dht, stop=stop, events=events, clock=Clock(stop),
                   blob_server=lambda namespace: BlobServer(dht, namespace=namespace, stop=stop), identity=identity,
                   reachable=reachable)


@contextlib.contextmanager
def open_runtime(initial_peers: list[str], host_maddrs: list[str] | None = None, identity_path: str | None = None,
                 events_path: str | None = None, client_mode: bool = False,
                 identity: Identity | None = None, announce_maddrs: list[str] | None = None) -> Iterator[Runtime]:
    """Signals, a DHT node and the event log for one role; always torn down, in reverse order.
    `identity_path` keeps the P2P address stable; `identity` is the signing key (a new one if None)."""
    events = EventLog(events_path)
    identity = identity or Identity()
    try:
        with stop_on_signals() as stop:
            dht = start_dht(initial_peers, host_maddrs, identity_path, client_mode=client_mode, signer=identity,
                            announce_maddrs=announce_maddrs)
            try:
                yield real_runtime(dht, stop, events, identity, reachable=not client_mode)
            finally:
                dht.shutdown()
    finally:
        events.close()
