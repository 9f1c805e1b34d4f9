"""Start a new LTE run (or resume one) from a config: the run's coordinator, bootstrap peer and
state donor. Prints the line volunteers paste to join.

    python scripts/start_run.py --config configs/digits-vit-tiny.yaml --run-dir runs/digits
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from peers.cli import quiet_dependencies, user_errors
from peers.coordinator import serve
from swarm.config import load_config


def main(
    config: Path = typer.Option(..., "--config", "-c", help="run config (YAML)"),
    run_dir: Optional[Path] = typer.Option(None, help="where W and the round are checkpointed; resumed if it holds a run (default: runs/<config name>)"),
    host_maddrs: List[str] = typer.Option(["/ip4/127.0.0.1/tcp/0"], help="multiaddrs to listen on; for the internet e.g. /ip4/0.0.0.0/tcp/31337"),
    initial_peers: List[str] = typer.Option([], help="join an existing DHT instead of starting a new one"),
    identity: Optional[Path] = typer.Option(None, help="file with this peer's private key (a stable peer id across restarts)"),
    run_id: Optional[str] = typer.Option(None, help="run id (default: config name plus a random suffix)"),
    events: Optional[str] = typer.Option(None, help="append one JSON line per event to this file"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every round"),
) -> None:
    """Create or resume a run, publish it in the DHT and coordinate it until it ends (Ctrl+C stops)."""
    quiet_dependencies()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        cfg = load_config(config)
        directory = run_dir or Path("runs") / config.stem

        def announce(rid: str, maddrs: list[str], round_: int, resumed: bool) -> None:
            state = f"resumed at round {round_}" if resumed else "created"
            print(f"run {rid} {state}; {cfg.rounds} rounds; checkpoints in {directory}", flush=True)
            print("volunteers join with:", flush=True)
            print(f"  lte-swarm join --run-id {rid} --initial-peers {' '.join(maddrs)}", flush=True)

        serve(cfg, directory, initial_peers=initial_peers, host_maddrs=host_maddrs,
              identity_path=str(identity) if identity else None, run_id=run_id, config_name=config.stem,
              events_path=events, announce=announce)


if __name__ == "__main__":
    sys.exit(typer.run(main))
