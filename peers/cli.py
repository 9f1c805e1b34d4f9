"""The `lte-swarm` command line: thin typer commands over the peer roles; rich draws, nothing else does."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.text import Text

from swarm.config import DATA_SPEC_HELP, RunConfig, load_config
from swarm.errors import ConfigError, LTESwarmError, Stopped

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
    diloco = "diloco"


@contextmanager
def user_errors() -> Iterator[None]:
    """Print the project's own errors as one line and exit 2; let Ctrl+C exit 130 quietly."""
    try:
        yield
    except LTESwarmError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, Stopped):
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
    baseline: Optional[Baseline] = typer.Option(None, help="train a baseline instead of LTE: full-rank, a single LoRA or DiLoCo"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto (overrides train.device)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the result as the last line"),
) -> None:
    """Run all N heads of a config in one process (the reference the swarm reproduces)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from peers.simulate import EvalPoint, simulate as run_simulation
    from peers.study import ARMS

    with user_errors():
        cfg = resolve_config(config, data, samples, device)
        mode = baseline.value if baseline else "lte"
        label = ARMS[mode].label(cfg)
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
def start(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="run config (YAML; default: the shipped digits-vit-tiny.yaml)"),
    run_dir: Optional[Path] = typer.Option(None, help="where W and the round are checkpointed; resumed if it holds a run (default: runs/<config name>)"),
    host_maddrs: List[str] = typer.Option(["/ip4/127.0.0.1/tcp/0"], help="multiaddrs to listen on; for the internet e.g. /ip4/0.0.0.0/tcp/31337"),
    initial_peers: List[str] = typer.Option([], help="join an existing DHT instead of starting a new one"),
    identity: Optional[Path] = typer.Option(None, help="file with this peer's private key (a stable peer id across restarts)"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: config name plus a random suffix)"),
    events: Optional[str] = typer.Option(None, help="append one JSON line per event to this file"),
    adopt_swarm_state: bool = typer.Option(False, help="resuming: if the swarm went on without us further than its "
                                           "contributions can be recomputed, take the W most lease holders hold, unverified"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every round"),
) -> None:
    """Start (or resume) a run as its coordinator: bootstrap peer and state donor; it follows every
    merge, evaluates and checkpoints W, and prints the line volunteers paste (Ctrl+C stops)."""
    from peers.shipped import shipped_config

    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    with user_errors():
        path = config or shipped_config()
        cfg = load_config(path)
        quiet_dependencies()
        from peers.coordinator import serve  # hivemind and torch: only once the config is good

        directory = run_dir or Path("runs") / path.stem

        def announce(rid: str, maddrs: list[str], round_: int, resumed: bool) -> None:
            state = f"resumed at round {round_}" if resumed else "created"
            print(f"run {rid} {state}; {cfg.rounds} rounds; checkpoints in {directory}", flush=True)
            print("volunteers join with:", flush=True)
            print(f"  lte-swarm join --run-id {rid} --initial-peers {' '.join(maddrs)}", flush=True)
            if cfg.swarm.closed:
                print(f"closed run: admit each volunteer with lte-swarm invite --run-dir {directory} --out FILE, "
                      "and add --invite FILE to their join line", flush=True)

        serve(cfg, directory, initial_peers=initial_peers, host_maddrs=host_maddrs,
              identity_path=str(identity) if identity else None, run_id=run_id, config_name=path.stem,
              events_path=events, announce=announce, adopt_swarm_state=adopt_swarm_state)


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
    announce_maddrs: List[str] = typer.Option([], help="multiaddrs others should dial to reach this peer (e.g. its public "
                                                      "address and forwarded port: /ip4/203.0.113.7/tcp/31337)"),
    client_mode: bool = typer.Option(False, "--client-mode", help="this peer cannot accept connections (behind NAT): it "
                                                                  "pushes its contributions to peers that can and never "
                                                                  "reduces part of W or hands out W"),
    throttle: float = typer.Option(0.0, min=0.0, help="pause this many seconds after every step (to share a busy machine)"),
    sync_timeout: float = typer.Option(60.0, min=1.0, help="give up if no peer hands out W within this many seconds "
                                                           "(raise it on a slow link)"),
    invite: Optional[Path] = typer.Option(None, help="invite file from the coordinator (closed runs admit only invited keys)"),
    signing_key: Optional[Path] = typer.Option(None, help="this peer's signing key, created if missing (default: the invite's key, else a new one per start)"),
    events: Optional[str] = typer.Option(None, help="append one JSON line per event to this file"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every round"),
) -> None:
    """Join a run as a volunteer: claim heads, train them on your data, merge with the swarm.
    Ctrl+C leaves cleanly (the heads are released for others)."""
    from peers.node import find_run, open_runtime
    from peers.trainer import TrainerOptions, serve_trainer

    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    with user_errors():
        if data is not None:
            from swarm.config import check_data_spec

            try:
                check_data_spec(data)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        admission, signer, run_id = member_key(invite, signing_key, run_id)
        with open_runtime([*initial_peers, *(more_peers or [])], host_maddrs, str(identity) if identity else None,
                          events, identity=signer, client_mode=client_mode, announce_maddrs=announce_maddrs) as rt:
            keys, record, cfg = find_run(rt.dht, run_id, clock=rt.clock)
            err.print(f"joined run {keys.run_id}: {cfg.model.name}, N={cfg.lte.heads} r={cfg.lte.rank} "
                      f"T={cfg.lte.merge_every}, {cfg.rounds} rounds; peer {rt.peer}", highlight=False)
            serve_trainer(cfg, keys, rt, TrainerOptions(heads=heads, data=data, device=device, throttle=throttle,
                                                        invite=admission, sync_timeout=sync_timeout))
        err.print("left the swarm")


@app.command()
def key(
    path: Path = typer.Argument(..., help="the signing key file (created, readable by you only, if missing)"),
) -> None:
    """Print the fingerprint of a signing key, creating the key if needed: what a closed run's
    coordinator needs to invite you (`lte-swarm invite --member FINGERPRINT`)."""
    from swarm.identity import Identity

    with user_errors():
        print(Identity.load_or_create(path).fingerprint)


def member_key(invite: Optional[Path], signing_key: Optional[Path], run_id: Optional[str]):
    """(invite, signing identity, run id) from `--invite` and `--signing-key`: the key is the
    invite's own (a bearer invite), else the one at `--signing-key`, else None (a new one)."""
    from swarm.identity import Identity

    admission, signer = None, None
    if invite is not None:
        from peers.invites import read_invite

        admission, signer = read_invite(invite)
        if run_id is not None and run_id != admission.run_id:
            raise ConfigError(f"{invite} is an invite to run {admission.run_id}, not to --run-id {run_id}")
        run_id = admission.run_id
    if signing_key is not None:
        signer = Identity.load_or_create(signing_key)
    return admission, signer, run_id


@app.command()
def invite(
    out: Path = typer.Option(..., "--out", help="the invite file to write (hand it to the volunteer)"),
    run_dir: Path = typer.Option(..., help="the coordinator's run dir (it holds the run's signing key)"),
    member: Optional[str] = typer.Option(None, help="fingerprint of the volunteer's key (`lte-swarm key FILE`); "
                                                    "without it the file carries a new key and must be kept secret"),
    days: float = typer.Option(30.0, min=0.0, help="how long the invite is valid"),
) -> None:
    """Admit a volunteer to a closed run (swarm.closed: true): sign an invite for its key."""
    from peers.invites import make_invite

    with user_errors():
        signed, with_key = make_invite(run_dir, member, days, out)
        secret = " (it holds the member's private key: hand it over privately)" if with_key else ""
        err.print(f"wrote {out}{secret}: member {signed.member} of run {signed.run_id}, valid for {days:g} days; "
                  f"they join with: lte-swarm join --invite {out.name} --initial-peers ...", highlight=False)


@app.command()
def revoke(
    run_dir: Path = typer.Option(..., help="the coordinator's run dir (it holds the run's signing key)"),
    member: str = typer.Option(..., help="fingerprint of the member's key (as its invite names it)"),
) -> None:
    """Take a member out of a closed run, whatever its invite says: the running coordinator
    publishes the revocation within a lease, and every node stops counting the key's claims."""
    from peers.invites import revoke as revoke_member

    with user_errors():
        revoked = revoke_member(run_dir, member)
        err.print(f"revoked {member} ({len(revoked)} revoked in all); the coordinator of {run_dir} publishes it "
                  "while it runs", highlight=False)


@app.command()
def status(
    initial_peers: List[str] = typer.Option(..., "--initial-peers", help="multiaddr(s) of peers in the swarm"),
    more_peers: List[str] = typer.Argument(None, metavar="[MADDR]...", show_default=False, help="more initial peers"),
    run_id: Optional[str] = typer.Option(None, help="the run to show (default: the newest run in the DHT)"),
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and exit"),
    interval: float = typer.Option(2.0, min=0.2, help="seconds between redraws"),
) -> None:
    """A live view of a run: heads, peers, loss and traffic (joins the DHT as a client)."""
    from rich.live import Live

    from peers.monitor import snapshot
    from peers.node import find_run, install_run_validators, open_runtime
    from peers.status_view import render

    with user_errors():
        with open_runtime([*initial_peers, *(more_peers or [])], client_mode=True) as rt:
            dht = rt.dht
            keys, _, cfg = find_run(dht, run_id, timeout=15.0, clock=rt.clock)
            install_run_validators(dht, keys.run_id)
            if as_json:
                print(json.dumps(snapshot(dht, keys, cfg)))
                return
            out = Console()
            if once:
                out.print(render(snapshot(dht, keys, cfg), out.width))
                return
            with Live(render(snapshot(dht, keys, cfg), out.width), console=out, refresh_per_second=4) as live:
                try:
                    while True:
                        rt.clock.sleep(interval)
                        live.update(render(snapshot(dht, keys, cfg), out.width))
                except Stopped:
                    pass


@app.command()
def demo(
    peers: int = typer.Option(2, min=1, help="volunteer peers to start (one head each)"),
    rounds: int = typer.Option(20, min=1, help="merge rounds to run"),
    run_dir: Optional[Path] = typer.Option(None, help="where the demo writes its run (default: runs/demo-<time>)"),
    config: Optional[Path] = typer.Option(None, help="base config (default: the shipped digits-vit-tiny.yaml)"),
    as_json: bool = typer.Option(False, "--json", help="no live view; print one JSON summary as the last line"),
) -> None:
    """A whole swarm on this machine: a coordinator and K peers train on the embedded digits over
    loopback, shown live, then compared round by round with the one-process simulation (bit for
    bit) and with full-rank training on the same samples."""
    from rich.live import Live
    from rich.table import Table

    from peers.demo import run_demo
    from peers.shipped import shipped_config
    from peers.status_view import render

    with user_errors():
        workdir = run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
        out = Console()
        if not as_json:
            out.print(f"starting a coordinator and {peers} peers on 127.0.0.1 for {rounds} rounds (Ctrl+C stops) ...")
        live = None if as_json else Live(console=out, refresh_per_second=4)
        try:
            if live is not None:
                live.start()
            on_snapshot = None if live is None else (lambda snap: live.update(render(snap, out.width)))
            summary = run_demo(workdir, peers, rounds, config or shipped_config(), on_snapshot=on_snapshot)
        finally:
            if live is not None:
                live.stop()
        if as_json:
            print(json.dumps(summary))
            return
        table = Table(title="test accuracy per round: the swarm, its one-process simulation, full-rank training")
        for col in ("round", "samples", "swarm (LTE)", "simulation", "W bit for bit", "full-rank", "swarm loss",
                    "full-rank loss"):
            table.add_column(col, justify="right")
        for r in summary["history"]:
            fmt = lambda v, pct: "-" if v is None else (f"{v:.1%}" if pct else f"{v:.3f}")  # noqa: E731
            table.add_row(str(r["round"]), str(r["samples"]), fmt(r["swarm_accuracy"], True),
                          fmt(r["simulate_accuracy"], True), "yes" if r["identical"] else "NO",
                          fmt(r["full_accuracy"], True), fmt(r["swarm_loss"], False), fmt(r["full_loss"], False))
        out.print(table)
        same = "bit for bit every round" if summary["bit_identical"] else "NOT bit for bit (see the table)"
        out.print(f"LTE in the swarm: {summary['accuracy']:.1%}, full-rank on the same {summary['samples']} samples: "
                  f"{summary['full_accuracy']:.1%}; the swarm's W is the simulation's {same}; peers agree on W: "
                  f"{summary['peers_agree']}", highlight=False)
        out.print(f"swarm {summary['seconds']:.0f}s, all {summary['total_seconds']:.0f}s; plot: {summary['plot']}; "
                  f"run dir: {summary['run_dir']}", highlight=False)
        out.print(f"export the model with: lte-swarm export --run-dir {summary['run_dir']} --out model.safetensors",
                  highlight=False)


@app.command()
def export(
    out: Path = typer.Option(..., "--out", help="the safetensors file to write"),
    run_dir: Optional[Path] = typer.Option(None, help="export from this run dir's checkpoint"),
    initial_peers: List[str] = typer.Option([], "--initial-peers", help="or download W from a live swarm"),
    run_id: Optional[str] = typer.Option(None, help="with --initial-peers: the run (default: the newest)"),
    weights: str = typer.Option("forward", help="forward: the (de)quantized W the swarm evaluates with; master: the fp32 master"),
    invite: Optional[Path] = typer.Option(None, help="with --initial-peers: an invite of its own (a closed run serves its "
                                                     "W to members only)"),
    signing_key: Optional[Path] = typer.Option(None, help="with --invite FILE made for a key (--member): that key"),
) -> None:
    """Write the merged model as a plain timm state dict (timm.create_model(name, **args) loads it)."""
    from peers.export import fetch_live, load_run_dir, write_export

    with user_errors():
        if weights not in ("forward", "master"):
            raise ConfigError(f"--weights must be forward or master, not {weights!r}")
        if (run_dir is None) == (not initial_peers):
            raise ConfigError("give either --run-dir or --initial-peers")
        if run_dir is not None:
            cfg, model, round_ = load_run_dir(run_dir)
        else:
            from peers.node import open_runtime

            admission, signer, run_id = member_key(invite, signing_key, run_id)
            with open_runtime(initial_peers, client_mode=True, identity=signer) as rt:
                cfg, model, round_ = fetch_live(rt, run_id, admission)
        info = write_export(cfg, model, out, weights, round_)
        args = ", ".join(f"{k}={v!r}" for k, v in info["args"].items())
        err.print(f"wrote {out} (round {round_}); load it with:\n"
                  f"  m = timm.create_model({info['model']!r}, {args}); "
                  f"m.load_state_dict(safetensors.torch.load_file({str(out)!r}))", highlight=False)


def quiet_dependencies() -> None:
    """hivemind 1.1.12 uses torch.jit.script at import, which torch now warns about on every start."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)


def main(args: Optional[List[str]] = None) -> None:
    """The `lte-swarm` entry point; `args` replaces the command line (scripts/start_run.py passes
    `start` and its own arguments)."""
    quiet_dependencies()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app(args=args, prog_name="lte-swarm")


if __name__ == "__main__":
    sys.exit(main())
