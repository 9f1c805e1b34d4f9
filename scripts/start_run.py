"""Start a new LTE run (or resume one) from a config: the run's coordinator, bootstrap peer and
state donor. Prints the line volunteers paste to join. The same as `lte-swarm start`.

    python scripts/start_run.py --config configs/digits-vit-tiny.yaml --run-dir runs/digits
"""

from __future__ import annotations

import sys

from peers.cli import main

if __name__ == "__main__":
    main(["start", *sys.argv[1:]])
