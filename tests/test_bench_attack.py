"""`scripts/bench_attack.py`: it loads (its attacks come from the swarm tests' volley), names every
attack it runs, and counts an honest process's descriptors with those of the processes it started.
The runs themselves take minutes: see docs/benchmarks.md for their figures."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, load_script


def test_the_benchmark_names_its_attacks_and_counts_descriptors_of_a_process_family(tmp_path):
    bench = load_script("bench_attack")
    assert set(bench.ATTACKS) == {"records", "big-records", "junk-subkeys", "push-flood", "stalled-pushes"}
    for attack in bench.ATTACKS:
        assert f"`{attack}`" in bench.__doc__
    alone = bench.tree_fds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; fs = [open(sys.argv[1]) for _ in range(20)]; "
                              "print('ok', flush=True); time.sleep(60)", str(ROOT / "README.md")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        assert bench.tree_fds(os.getpid()) - alone >= 20
    finally:
        child.kill()
        child.wait()
