"""Measure one device's training speed and memory: full-rank training and a DiLoCo worker against an
LTE peer, same model, same per-peer batch, random images (no data loading, no network, no weights
downloaded).

    python scripts/bench_device.py --model vit_small_patch32_224 --batch 16 --device cpu
    python scripts/bench_device.py --model vit_small_patch32_224 --batch 128 --device cuda --precision fp32 bf16

Every configuration runs in a process of its own, so that its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated` over the timed steps, on the CPU the process's peak resident set
(which includes Python, torch and the model's construction; `rss_after_import_bytes` is the part
before the model exists, `train_peak_bytes` the rest). `held_bytes` is what the training state occupies on the device between
steps (parameters, W's forward copy, buffers, gradients, optimizer state); an LTE peer also keeps
W's fp32 master in host memory (`master_bytes`), which the merges accumulate into; a DiLoCo worker
(`peers/diloco.py`) holds full-rank training's state plus the global model it syncs from and its
outer momentum.
Speed is the batch over the median step time of the timed steps. `--json` prints one JSON object:
`full`, `lte` and `diloco` (the first precision asked for), `results` (every precision), and the
settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    """The process's current resident set (Linux), for the part of the peak that is not training."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(spec: dict) -> dict:
    """Train `spec["mode"]` (full or lte) for warmup + steps steps on random data; speed and memory."""
    import timm  # noqa: F401 - imported before the baseline is taken, as every peer imports it
    import torch

    from peers.diloco import DiLoCo
    from peers.models import create_lte_model, create_model
    from peers.training import HeadTrainer
    from swarm.config import LTEConfig, ModelConfig, RunConfig, TrainConfig

    rss_after_import = _rss_bytes()

    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model_cfg = ModelConfig(name=spec["model"], args=spec["model_args"])
    heads = spec["heads"] if spec["mode"] == "lte" else 1
    if spec["batch"] % heads:
        raise SystemExit(f"--batch {spec['batch']} is not a multiple of --heads {heads}")
    train = TrainConfig(batch_size=spec["batch"], samples=spec["batch"] * 1000, lr=1e-4, full_lr=1e-3, grad_clip=1.0,
                        precision=spec["precision"], checkpointing=spec["checkpointing"], device=spec["device"])
    master_bytes = 0
    if spec["mode"] == "full":
        model = create_model(model_cfg).to(device)
        net = model
        trainer = HeadTrainer(model, train, 1000)
    elif spec["mode"] == "diloco":  # one worker: its model and AdamW, the global model, the outer momentum
        net = create_model(model_cfg).to(device)
        run = RunConfig(model=model_cfg, lte=LTEConfig(heads=1, rank=1, alpha=1.0, merge_every=10), train=train)
        trainer = DiLoCo(net, run, 1000)
        model = trainer.workers[0]
    else:
        lte = LTEConfig(heads=spec["run_heads"], rank=spec["rank"], alpha=spec["alpha"], merge_every=10,
                        variant=spec["variant"], nonlinear=spec["nonlinear"], storage=spec["storage"],
                        vectorised=spec["vectorised"])
        run = RunConfig(model=model_cfg, lte=lte, train=train.model_copy(update={"batch_size": spec["run_heads"]}))
        model = create_lte_model(run, list(range(heads)), device)
        net = model.model
        trainer = HeadTrainer(model, train, 1000)
        master_bytes = _tensor_bytes(layer.weight_store.master for _, layer in model.layers())
    per_head = spec["batch"] // heads
    x = torch.randn(heads, per_head, model_cfg.channels, model_cfg.image_size, model_cfg.image_size, device=device)
    y = torch.randint(0, net.num_classes, (heads, per_head), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in range(spec["warmup"]):
        trainer.step(x, y, step)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(spec["steps"]):
        start = time.perf_counter()
        loss = trainer.step(x, y, spec["warmup"] + step)
        sync()
        times.append(time.perf_counter() - start)
    # The median step: on a machine shared with other work a few slow steps say nothing of the peer.
    seconds = statistics.median(times)

    params = list(model.parameters())
    held = _tensor_bytes(params) + _tensor_bytes(model.buffers())
    held += _tensor_bytes(p.grad for p in params)
    optimizer = trainer.trainers[0].optimizer if spec["mode"] == "diloco" else trainer.optimizer
    held += _tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    if spec["mode"] == "diloco":
        held += _tensor_bytes(net.parameters()) + _tensor_bytes(trainer.global_model.momentum.values())
    if spec["mode"] == "lte":
        held += sum(layer.weight_store.forward_bytes() for _, layer in model.layers()
                    if not (device.type == "cpu" and layer.weight_store.storage == "fp32"))  # aliases the master
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": spec["mode"], "precision": spec["precision"], "samples_per_s": spec["batch"] / seconds,
            "step_seconds": seconds, "mean_step_seconds": sum(times) / len(times), "peak_bytes": peak, "held_bytes": held, "master_bytes": master_bytes,
            "rss_after_import_bytes": rss_after_import if device.type == "cpu" else None,
            "train_peak_bytes": peak - rss_after_import if device.type == "cpu" else peak,
            "trainable_numbers": sum(p.numel() for p in params if p.requires_grad), "last_loss": loss}


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['mode']} ({spec['precision']}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch32_224", help="timm model name (created with pretrained=False)")
    parser.add_argument("--model-args", default="{}", help='JSON keyword arguments for timm.create_model, e.g. \'{"img_size": 32}\'')
    parser.add_argument("--batch", type=int, default=16, help="images per step per peer (an LTE peer splits them over its heads)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing, for both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--heads", type=int, default=1, help="heads the LTE peer holds")
    parser.add_argument("--run-heads", type=int, default=32, help="N, the run's heads (the paper's 32)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=4096.0)
    parser.add_argument("--storage", choices=["fp32", "bf16", "int8", "nf4"], default="nf4")
    parser.add_argument("--variant", choices=["reset", "reset_less"], default="reset_less")
    parser.add_argument("--nonlinear", choices=["freeze", "replicate"], default="replicate")
    parser.add_argument("--vectorised", action="store_true", help="vmap over the peer's heads (with --heads > 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU compute threads (default: torch's); 1 gives steadier figures on a machine shared with other work")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.heads > args.run_heads:
        parser.error(f"--heads {args.heads} exceeds --run-heads {args.run_heads}")
    settings = {k: getattr(args, k) for k in ("model", "batch", "device", "checkpointing", "steps", "warmup", "heads",
                                              "run_heads", "rank", "alpha", "storage", "variant", "nonlinear",
                                              "vectorised", "threads")}
    settings["model_args"] = json.loads(args.model_args)
    results = {p: {mode: _run_child({**settings, "mode": mode, "precision": p}) for mode in ("full", "diloco", "lte")}
               for p in args.precision}
    first = results[args.precision[0]]
    if args.json:
        print(json.dumps({**settings, "full": first["full"], "diloco": first["diloco"], "lte": first["lte"],
                          "results": results}))
        return
    print(f"{args.model}, {args.batch} images per step on {args.device}"
          f"{', checkpointing' if args.checkpointing else ''}; LTE peer: {args.heads} head(s) of rank {args.rank}, "
          f"W in {args.storage}, {args.variant}, {args.nonlinear} non-linear parameters")
    print(f"{'precision':>9} {'mode':>6} {'samples/s':>10} {'peak MiB':>9} {'training MiB':>12} {'held MiB':>9} "
          f"{'master MiB':>10}")
    for p, pair in results.items():
        for mode, r in pair.items():
            print(f"{p:>9} {mode:>6} {r['samples_per_s']:>10.1f} {_mib(r['peak_bytes']):>9} {_mib(r['train_peak_bytes']):>12} "
                  f"{_mib(r['held_bytes']):>9} {_mib(r['master_bytes']):>10}")


if __name__ == "__main__":
    main()
