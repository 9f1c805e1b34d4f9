"""DiLoCo over hivemind: one worker of the networked DiLoCo baseline (arXiv 2311.08105) per
process, as OpenDiLoCo ran it. Used by scripts/bench_wan.py, which starts one such process per peer,
the first without initial peers (the others join its DHT: its `maddrs` event).

Each worker trains the run's full-rank model (the same W0 everywhere, from the run's model seed) on
its own shard of the run's data with AdamW at `train.full_lr` and the run's schedule, for H =
`diloco.inner_steps` steps (0: `lte.merge_every`) of the run's per-head batch; then the workers
average their changes since the last sync with hivemind's `DecentralizedAverager` (a butterfly
all-reduce: each of N workers reduces 1/N of the vector), apply the mean through the outer step
(`diloco.outer`: Nesterov, rate 0.7, momentum 0.9 by default) to their copy of the global model and
start the next H steps from it, keeping their AdamW moments (`peers.diloco.GlobalModel`, the same
step as the simulation's).

Why hivemind's averager and not lte-swarm's merge transport: the averager is what a user picks for
DiLoCo today (OpenDiLoCo, INTELLECT-1), and its all-reduce is the bandwidth-optimal exchange of one
dense vector, where the owner-reduced merge is built around contributions that differ per head.
Its wire codecs are hivemind's: `8bit` (uniform 8-bit quantization), `fp16` or `fp32`; hivemind
offers no 4-bit codec (its codecs are an enumeration of its wire protocol).

Rounds are aligned by their number: round r matches only peers in round r (its group key), and
every worker waits at the start until all `--peers` joined. A round whose group is smaller than
the swarm (a peer late or gone) averages over those present: the workers' global models then
differ, and the `round` event says how many took part.

    python -m peers.diloco_baseline --config RUN.yaml --index I --peers P --initial-peers MADDR ...
        --host /ip4/ADDR/tcp/0 [--evaluate] [--compression 8bit] --events FILE
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time

import torch

from peers.data import DataSource, ImageShape
from peers.diloco import GlobalModel
from peers.dp_baseline import barrier, run_peer
from peers.models import create_model
from peers.node import EventLog
from peers.training import HeadTrainer, evaluate
from swarm.config import RunConfig, load_config

log = logging.getLogger(__name__)

PREFIX = "diloco-baseline"
CODECS = ("8bit", "fp16", "fp32")


def codec(name: str):
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    return {"8bit": Uniform8BitQuantization, "fp16": Float16Compression, "fp32": NoCompression}[name]()


def inner_steps(cfg: RunConfig) -> int:
    return cfg.diloco.inner_steps or cfg.lte.merge_every


def rounds_for(cfg: RunConfig, peers: int) -> int:
    """Syncs that make up the run's sample budget: H steps of every peer's batch each."""
    return max(1, math.ceil(cfg.train.samples / (inner_steps(cfg) * cfg.head_batch * peers)))


def group_bits(round_: int) -> str:
    """The round's group key suffix: a worker in round r can only meet workers in round r (or in
    round r + 256, which no run of H steps per round ever has in flight at once)."""
    return format(round_ % 256, "08b")


def train(cfg: RunConfig, index: int, peers: int, initial_peers: list[str], host: str, evaluate_every: int,
          events: EventLog, matchmaking_time: float, averaging_timeout: float, compression: str) -> None:
    """Train the run's rounds. Emits `maddrs` (this worker's DHT addresses), `joined`, one `round` per sync (seconds of local forward and
    backward so far, the group's size, the global model's norm), `eval` (with `evaluate_every` > 0:
    the global model after every that many rounds and the last) and `left`."""
    import hivemind

    torch.manual_seed(cfg.train.seed + index)
    worker = create_model(cfg.model)
    global_model = GlobalModel(copy.deepcopy(worker), cfg.diloco.outer)
    h, rounds = inner_steps(cfg), rounds_for(cfg, peers)
    trainer = HeadTrainer(worker, cfg.train, h * rounds)
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    batches = source.batches(index, peers, cfg.head_batch)
    eval_set = source.eval_set() if evaluate_every > 0 else None
    names = [name for name, _ in worker.named_parameters()]
    # What the averager averages in place: the workers' changes, in the order of the parameters.
    changes = [torch.zeros_like(p) for p in worker.parameters()]
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=[host], start=True, startup_timeout=30)
    averager = None
    try:
        # the first worker can be the others' initial peer: no node of its own is needed to start a run
        events.emit("maddrs", maddrs=[str(m) for m in dht.get_visible_maddrs()], pid=os.getpid())
        averager = hivemind.DecentralizedAverager(
            changes, dht, start=True, prefix=PREFIX, target_group_size=peers, min_group_size=2,
            initial_group_bits=group_bits(0), min_matchmaking_time=matchmaking_time,
            request_timeout=min(3.0, matchmaking_time / 2), allreduce_timeout=averaging_timeout,
            next_chunk_timeout=averaging_timeout / 4, compression=codec(compression), shutdown_timeout=10)
        if not barrier(dht, f"{PREFIX}-joined", index, peers, averaging_timeout * 2):
            raise TimeoutError(f"not every one of {peers} peers joined in {averaging_timeout * 2:.0f}s")
        events.emit("joined", index=index, rounds=rounds, inner_steps=h, pid=os.getpid())
        seconds_train, step = 0.0, 0
        for r in range(rounds):
            started = time.perf_counter()
            for _ in range(h):
                x, y = next(batches)
                loss = trainer.step(x[None], y[None], step)
                step += 1
            seconds_train += time.perf_counter() - started
            mine = global_model.changes(worker)
            with averager.get_tensors() as shared:
                for name, tensor in zip(names, shared):
                    tensor.copy_(mine[name])
            averager.set_group_bits(group_bits(r))
            try:
                group = averager.step(gather=r, timeout=averaging_timeout)
            except Exception as exc:  # a failed all-reduce: the round goes on with this worker's change alone
                log.warning("round %d: averaging failed (%s); applying this worker's change alone", r, exc)
                group = None
            members = len(group) if group else 1
            if group and any(v != r for v in group.values()):
                log.warning("round %d: met workers of rounds %s", r, sorted(set(group.values())))
            with averager.get_tensors() as shared:
                mean = {name: tensor.clone() for name, tensor in zip(names, shared)} if members > 1 else mine
            global_model.step(mean, 1.0)
            global_model.restart(worker)
            norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in global_model.model.parameters()))
            events.emit("round", round=r, steps=step, loss=loss, seconds_train=seconds_train, members=members,
                        global_norm=norm)
            if eval_set is not None and ((r + 1) % evaluate_every == 0 or r + 1 == rounds):
                global_model.model.eval()
                acc, eval_loss = evaluate(global_model.model, *eval_set, device=torch.device("cpu"))
                events.emit("eval", round=r, accuracy=acc, loss=eval_loss)
        events.emit("left", round=rounds, steps=step, seconds_train=seconds_train)
        # Serve the last round's parts until every worker has its mean.
        barrier(dht, f"{PREFIX}-done", index, peers, averaging_timeout)
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config (model, data, batch, samples, diloco)")
    parser.add_argument("--index", type=int, default=0, help="this peer's data shard")
    parser.add_argument("--peers", type=int, default=1, help="number of peers (data shards)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--host", default="/ip4/127.0.0.1/tcp/0", help="multiaddr to listen on")
    parser.add_argument("--events", help="append one JSON line per event to this file")
    parser.add_argument("--evaluate-every", type=int, default=0, help="evaluate every this many rounds (0: never)")
    parser.add_argument("--matchmaking-time", type=float, default=5.0)
    parser.add_argument("--averaging-timeout", type=float, default=120.0)
    parser.add_argument("--compression", choices=CODECS, default="8bit", help="the changes' codec on the wire")
    args = parser.parse_args(argv)
    run_peer(args.events, lambda events: train(
        load_config(args.config), args.index, args.peers, args.initial_peers, args.host, args.evaluate_every, events,
        args.matchmaking_time, args.averaging_timeout, args.compression))


if __name__ == "__main__":
    main()
