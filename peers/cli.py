"""The `lte-swarm` command line: thin typer commands over the peer roles; rich draws, nothing else does."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.text import Text

from swarm.config import DATA_SPEC_HELP, RunConfig, load_config
from swarm.errors import ConfigError, LTESwarmError

app = typer.Typer(
    help="Pre-train a model together with strangers: LoRA-the-Explorer over a hivemind swarm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """Pre-train a model together with strangers: LoRA-the-Explorer over a hivemind swarm."""
err = Console(stderr=True)


class Baseline(str, Enum):
    full = "full"
    lora = "lora"


@contextmanager
def user_errors() -> Iterator[None]:
    """Print the project's own errors as one line and exit 2; let Ctrl+C exit 130 quietly."""
    try:
        yield
    except LTESwarmError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def resolve_config(config: Path, data: Optional[str], samples: Optional[int], device: Optional[str]) -> RunConfig:
    cfg = load_config(config)
    overrides = {key: value for key, value in
                 (("data.source", data), ("train.samples", samples), ("train.device", device)) if value is not None}
    return cfg.with_overrides(overrides) if overrides else cfg


@app.command()
def simulate(
    config: Path = typer.Option(..., "--config", "-c", help="run config (YAML), e.g. configs/digits-vit-tiny.yaml"),
    data: Optional[str] = typer.Option(None, help=f"override the config's data: {DATA_SPEC_HELP}"),
    samples: Optional[int] = typer.Option(None, help="override the training budget (samples over all heads)"),
    baseline: Optional[Baseline] = typer.Option(None, help="train a baseline instead of LTE: full-rank or a single LoRA"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto (overrides train.device)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the result as the last line"),
) -> None:
    """Run all N heads of a config in one process (the reference the swarm reproduces)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from peers.simulate import EvalPoint, simulate as run_simulation

    with user_errors():
        cfg = resolve_config(config, data, samples, device)
        mode = baseline.value if baseline else "lte"
        label = {"lte": f"LTE N={cfg.lte.heads} r={cfg.lte.rank} T={cfg.lte.merge_every}",
                 "full": "full-rank", "lora": f"single LoRA r={cfg.lte.rank}"}[mode]
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err,
                      transient=False, disable=not err.is_terminal) as progress:
            task = progress.add_task(label, total=cfg.steps, status="")

            def on_eval(p: EvalPoint) -> None:
                line = (f"round {p.round:4d}  samples {p.samples:8d}  acc {p.accuracy:6.2%}  "
                        f"eval loss {p.loss:.3f}  train loss {p.train_loss:.3f}")
                progress.update(task, status=f"acc {p.accuracy:.2%}")
                if not err.is_terminal:
                    err.print(line, highlight=False)
                else:
                    progress.console.print(line, highlight=False)

            result = run_simulation(cfg, mode, on_eval=on_eval, on_step=lambda i, n: progress.update(task, completed=i))
        summary = {"mode": mode, "accuracy": result.accuracy, "loss": result.loss, "samples": result.samples,
                   "seconds": round(result.seconds, 3), "steps": result.steps, "rounds": result.rounds,
                   "weight_digest": result.weight_digest}
        if as_json:
            print(json.dumps(summary))
        else:
            err.print(f"{label}: accuracy {result.accuracy:.2%}, eval loss {result.loss:.3f}, "
                      f"{result.samples} samples in {result.seconds:.1f}s", highlight=False)


@app.command()
def join(
    initial_peers: List[str] = typer.Option(..., "--initial-peers", help="multiaddr(s) of peers already in the swarm (more may follow as arguments)"),
    more_peers: List[str] = typer.Argument(None, metavar="[MADDR]...", show_default=False, help="more initial peers"),
    run_id: Optional[str] = typer.Option(None, help="the run to join (default: the newest run in the DHT)"),
    device: str = typer.Option("cpu", help="cpu, cuda or auto"),
    heads: int = typer.Option(1, min=1, help="how many LoRA heads this peer trains"),
    data: Optional[str] = typer.Option(None, help=f"this peer's own data (default: the run's): {DATA_SPEC_HELP}"),
    identity: Optional[Path] = typer.Option(None, help="file with this peer's private key (a stable peer id across restarts)"),
    host_maddrs: List[str] = typer.Option(["/ip4/127.0.0.1/tcp/0"], help="multiaddrs to listen on"),
    throttle: float = typer.Option(0.0, min=0.0, help="pause this many seconds after every step (to share a busy machine)"),
    events: Optional[str] = typer.Option(None, help="append one JSON line per event to this file"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every round"),
) -> None:
    """Join a run as a volunteer: claim heads, train them on your data, merge with the swarm.
    Ctrl+C leaves cleanly (the heads are released for others)."""
    from peers.node import EventLog, find_run, start_dht, stop_on_signals
    from peers.trainer import Trainer, TrainerOptions

    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    with user_errors():
        log_events = EventLog(events)
        with stop_on_signals() as stop:
            dht = start_dht([*initial_peers, *(more_peers or [])], host_maddrs, str(identity) if identity else None)
            trainer = None
            try:
                keys, record, cfg = find_run(dht, run_id)
                if data is not None:
                    from swarm.config import check_data_spec

                    try:
                        check_data_spec(data)
                    except ValueError as exc:
                        raise ConfigError(str(exc)) from None
                err.print(f"joined run {keys.run_id}: {cfg.model.name}, N={cfg.lte.heads} r={cfg.lte.rank} "
                          f"T={cfg.lte.merge_every}, {cfg.rounds} rounds; peer {dht.peer_id}", highlight=False)
                trainer = Trainer(cfg, keys, dht, TrainerOptions(heads=heads, data=data, device=device, throttle=throttle),
                                  stop, log_events)
                trainer.run()
            finally:
                if trainer is not None:
                    trainer.close()
                dht.shutdown()
                log_events.close()
        err.print("left the swarm")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
