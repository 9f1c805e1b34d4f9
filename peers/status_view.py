"""The terminal view of a run snapshot (rich renderables; no I/O here)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

COLORS = {"free": "dim", "leased": "yellow", "training": "green", "merging": "cyan", "merged": "bold green",
          "orphaned": "bold red"}
BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    values = [v for v in values if v is not None][-width:]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / span * (len(BARS) - 1) + 0.5))] for v in values)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


COLUMNS = ("peer", "state", "heads", "round", "step", "loss", "samples/s", "sent", "recv", "device", "W")
NARROW = ("peer", "state", "heads", "round", "step", "loss", "samples/s", "W")


def render(snap: dict[str, Any], width: int = 120) -> Group:
    """The whole frame; below 110 columns the peer table keeps only its essential columns."""
    eta = snap["eta_next_merge"]
    agree = {True: Text("all peers agree on W", style="green"), False: Text("peers DISAGREE on W", style="bold red"),
             None: Text("no peer at this round yet", style="dim")}[snap["agree"]]
    header = Text.assemble(
        (f"run {snap['run_id']}", "bold"), f"  {snap['model']}  N={snap['heads_total']} r={snap['rank']} "
        f"T={snap['merge_every']} W:{snap['storage']}\n",
        f"round {snap['round']}/{snap['rounds_total']}  samples {snap['samples']:,}  ",
        f"next merge {'in ~%.0fs' % eta if eta is not None else '-'}  ", agree)

    cells = Text()
    for h in snap["heads"]:
        cells.append(f" {h['head']:>2} ", style=f"reverse {COLORS[h['state']]}" if h["state"] != "free" else "dim")
        cells.append(" ")
    legend = Text("  ".join(f"{name}" for name in COLORS), style="dim")
    for name, style in COLORS.items():
        legend.highlight_words([name], style)
    head_map = Panel(Group(cells, legend), title="heads", title_align="left")

    columns = COLUMNS if width >= 110 else NARROW
    peers = Table(title=None, expand=False, show_edge=False, pad_edge=False)
    for col in columns:
        peers.add_column(col, justify="right" if col in ("round", "step", "loss", "samples/s", "sent", "recv") else "left",
                         no_wrap=True)
    for s in snap["peers"]:
        cells = {"peer": s["peer"][-8:], "state": s["state"], "heads": ",".join(map(str, s["heads"])) or "-",
                 "round": str(s["round"]), "step": str(s["step"]),
                 "loss": "-" if s["loss"] is None else f"{s['loss']:.3f}", "samples/s": f"{s['samples_per_second']:.0f}",
                 "sent": _bytes(s["bytes_sent"]), "recv": _bytes(s["bytes_received"]), "device": s["device"],
                 "W": s["digest"][:8]}
        peers.add_row(*(cells[c] for c in columns))
    if not snap["peers"]:
        peers.add_row("(no peer reported yet)", *[""] * (len(columns) - 1))

    history = snap["history"]
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    accs = [h["accuracy"] for h in history if h.get("accuracy") is not None]
    curve = Text.assemble(("eval loss ", "bold"), sparkline(losses), f" {losses[-1]:.3f}" if losses else "",
                          ("   accuracy ", "bold"), f"{accs[-1]:.1%}" if accs else "-",
                          ("   traffic ", "bold"), f"sent {_bytes(snap['bytes_sent'])}, received {_bytes(snap['bytes_received'])}")
    return Group(Panel(header, title="lte-swarm", title_align="left"), head_map,
                 Panel(peers, title=f"peers ({len(snap['peers'])})", title_align="left"), curve)
