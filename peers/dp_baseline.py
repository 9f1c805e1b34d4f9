"""The data-parallel baseline LTE is measured against: one peer of `hivemind.Optimizer` training the
run's full-rank model on its own shard of the run's data, gradients averaged over hivemind. Used
by scripts/bench_wan.py, which starts one such process per peer (and a bare DHT node to join).

Everything that is not the communication is the project's own: the timm model with the run's seed
(`create_model`), the data shards and evaluation set (`DataSource`), the learning-rate schedule
(`lr_factor`, stepped once per hivemind epoch) and `evaluate`. One hivemind epoch is one global
batch of `--target` samples, so with `--target` = T x the run's batch it covers the samples of one
LTE merge round and its all-reduce comes as often as LTE's merge.

    python -m peers.dp_baseline bootstrap --host /ip4/ADDR/tcp/0 --events FILE
    python -m peers.dp_baseline train --config RUN.yaml --index I --peers P --initial-peers MADDR ...
        --host /ip4/ADDR/tcp/0 --target N --lr LR [--evaluate] --events FILE
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from typing import Callable

import torch

from peers.data import DataSource, ImageShape
from peers.models import create_model
from peers.node import EventLog
from peers.training import evaluate, lr_factor
from swarm.config import RunConfig, load_config

log = logging.getLogger(__name__)

DONE_KEY = "dp-baseline-done"


def stop_on_term() -> None:
    """SIGTERM ends the peer like Ctrl+C, so that `finally` shuts hivemind's processes down."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def bootstrap(host: str, events: EventLog) -> None:
    """A DHT node for the peers to join (what the coordinator is in an lte-swarm run)."""
    import hivemind

    dht = hivemind.DHT(host_maddrs=[host], start=True, startup_timeout=30)
    try:
        events.emit("maddrs", maddrs=[str(m) for m in dht.get_visible_maddrs()], pid=os.getpid())
        while True:
            time.sleep(1.0)
    finally:
        dht.shutdown()


def wait_for_peers(opt, peers: int, timeout: float = 300.0) -> None:
    """Start together: until its progress tracker has seen every peer, hivemind.Optimizer would
    finish epochs alone, skipping the averaging (it averages only when it sees other peers). A
    peer is seen once it reported samples: call this after the first step."""
    deadline = time.monotonic() + timeout
    while opt.tracker.global_progress.num_peers < peers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {opt.tracker.global_progress.num_peers} of {peers} peers in {timeout:.0f}s")
        time.sleep(0.2)


def barrier(dht, key: str, index: int, peers: int, timeout: float) -> bool:
    """Announce `index` under the DHT key `key`, then wait until `peers` peers have (True) or
    `timeout` passed (False)."""
    from hivemind.utils import get_dht_time

    deadline = time.monotonic() + timeout
    dht.store(key, subkey=index, value=True, expiration_time=get_dht_time() + timeout + 60)
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        if found is not None and isinstance(found.value, dict) and len(found.value) >= peers:
            return True
        time.sleep(0.25)
    return False


def linger(dht, index: int, peers: int, timeout: float) -> None:
    """Stay a state donor until every peer is done (or `timeout`): a peer an epoch behind catches up
    by downloading the state from the others, and hivemind retries that forever if they are gone."""
    barrier(dht, DONE_KEY, index, peers, timeout)


def epochs_for(cfg: RunConfig, target: int) -> int:
    """Hivemind epochs (global batches of `target` samples) that make up the run's sample budget."""
    return max(1, math.ceil(cfg.train.samples / target))


def train(cfg: RunConfig, index: int, peers: int, initial_peers: list[str], host: str, target: int, lr: float,
          evaluate_every: int, events: EventLog, matchmaking_time: float, averaging_timeout: float,
          compression: str) -> None:
    """Train until the swarm has done the run's epochs. Emits `joined`, one `epoch` per epoch
    (seconds of local forward/backward so far), `eval` (with `evaluate_every` > 0) and `left`,
    then lingers as a donor until every peer is done."""
    import hivemind
    from hivemind.compression import Float16Compression, Uniform8BitQuantization

    torch.manual_seed(cfg.train.seed + index)
    codec = {"8bit": Uniform8BitQuantization, "fp16": Float16Compression}[compression]
    model = create_model(cfg.model)
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    batches = source.batches(index, peers, cfg.head_batch)
    eval_set = source.eval_set() if evaluate_every > 0 else None
    epochs = epochs_for(cfg, target)
    # The run's warm-up is in steps of the run's batch; an epoch here is target / batch of them.
    schedule = cfg.train.model_copy(update={
        "warmup_steps": math.ceil(cfg.train.warmup_steps * cfg.train.batch_size / target)})
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[host], start=True, startup_timeout=30)
    opt = None
    try:
        opt = hivemind.Optimizer(
            dht=dht, run_id="dp-baseline", params=model.parameters(), target_batch_size=target,
            batch_size_per_step=cfg.head_batch,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay),
            scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: lr_factor(e, epochs, schedule)),
            matchmaking_time=matchmaking_time, averaging_timeout=averaging_timeout,
            load_state_timeout=averaging_timeout,
            grad_compression=codec(), state_averaging_compression=codec(), load_state_compression=codec(),
            use_local_updates=False, verbose=False)
        events.emit("joined", index=index, epochs=epochs, pid=os.getpid())
        seconds_train, steps, epoch, evaluated = 0.0, 0, opt.local_epoch, -1
        # Done when the swarm is: a peer that fell behind stops with the others.
        while max(opt.local_epoch, opt.tracker.global_epoch) < epochs:
            x, y = next(batches)
            started = time.perf_counter()
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            seconds_train += time.perf_counter() - started
            opt.step()  # accumulates locally; at the end of an epoch, averages with the peers and steps
            opt.zero_grad()
            steps += 1
            if steps == 1:
                wait_for_peers(opt, peers)
            if opt.local_epoch != epoch:
                epoch = opt.local_epoch
                events.emit("epoch", epoch=epoch, steps=steps, loss=loss.item(), seconds_train=seconds_train)
                if eval_set is not None and (epoch % evaluate_every == 0 or epoch >= epochs):
                    model.eval()
                    acc, eval_loss = evaluate(model, *eval_set, device=torch.device("cpu"))
                    events.emit("eval", epoch=epoch, accuracy=acc, loss=eval_loss)
                    evaluated = epoch
        if eval_set is not None and evaluated < epochs:
            # Another peer finished the last epoch first: take the swarm's final state, then evaluate it.
            if opt.local_epoch < opt.tracker.global_epoch:
                opt.load_state_from_peers()
            model.eval()
            acc, eval_loss = evaluate(model, *eval_set, device=torch.device("cpu"))
            events.emit("eval", epoch=opt.local_epoch, accuracy=acc, loss=eval_loss)
        events.emit("left", epoch=opt.local_epoch, steps=steps, seconds_train=seconds_train)
        linger(dht, index, peers, averaging_timeout)
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["bootstrap", "train"])
    parser.add_argument("--host", default="/ip4/127.0.0.1/tcp/0", help="multiaddr to listen on")
    parser.add_argument("--events", help="append one JSON line per event to this file")
    parser.add_argument("--config", help="the run's config (model, data, batch, samples, schedule)")
    parser.add_argument("--index", type=int, default=0, help="this peer's data shard")
    parser.add_argument("--peers", type=int, default=1, help="number of peers (data shards)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--target", type=int, help="hivemind's target_batch_size (samples per global step)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate of the global steps")
    parser.add_argument("--evaluate-every", type=int, default=0, help="evaluate every this many epochs (0: never)")
    parser.add_argument("--matchmaking-time", type=float, default=5.0)
    parser.add_argument("--averaging-timeout", type=float, default=120.0)
    parser.add_argument("--compression", choices=["8bit", "fp16"], default="8bit")
    args = parser.parse_args(argv)

    def work(events: EventLog) -> None:
        if args.role == "bootstrap":
            bootstrap(args.host, events)
        else:
            train(load_config(args.config), args.index, args.peers, args.initial_peers, args.host, args.target,
                  args.lr, args.evaluate_every, events, args.matchmaking_time, args.averaging_timeout,
                  args.compression)

    run_peer(args.events, work)


def run_peer(events_path: str | None, work: Callable[[EventLog], None]) -> None:
    """Run a baseline peer's `work` as every baseline process runs: warnings logged, the compute
    threads the launcher set, SIGTERM and Ctrl+C ending it through every `finally`, its events
    appended to `events_path`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stop_on_term()
    events = EventLog(events_path)
    try:
        work(events)
    except KeyboardInterrupt:
        pass
    finally:
        events.close()


if __name__ == "__main__":
    main()
