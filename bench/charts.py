"""Charts of a run: matplotlib PNGs drawn from `results.json`, one per workload that has rows.

`python -m bench` draws them after each run (into OUT/charts/); `python -m bench.charts
[RESULTS.json] [OUT_DIR]` draws them again from a results file. docs/benchmarks.md shows
them. Each chart is one measure of one workload, a bar per server, tidewire's bars in one
colour and the others' in grey, so the comparison reads at a glance.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHARTS", "Chart", "draw"]


@dataclass(frozen=True)
class Chart:
    workload: str
    file: str
    title: str
    value: str  # the row's key
    unit: str
    lower_is_better: bool = False
    #: A log scale, for measures that span orders of magnitude (a server that falls behind).
    log: bool = False
    #: Which rows: all by default.
    keep: Callable[[dict[str, Any]], bool] = lambda row: True
    #: A row's label.
    label: Callable[[dict[str, Any]], str] = lambda row: str(row.get("server", "?"))


def _w3_label(row: dict[str, Any]) -> str:
    return f"{row.get('server', '?')} · {row.get('subscribers', '?'):,} subs"


def _w7_label(row: dict[str, Any]) -> str:
    return f"{row.get('test', '?')}: {row.get('server', '?')}"


CHARTS = (
    Chart("w1", "w1-throughput.png", "W1: one stream, events/s", "events_per_s", "events/s"),
    Chart(
        "w1",
        "w1-cpu.png",
        "W1: server CPU per event (pinned core)",
        "server_us_per_event",
        "µs/event",
        lower_is_better=True,
    ),
    Chart(
        "w3",
        "w3-p99.png",
        "W3: fan-out, delivery latency p99",
        "p99_ms",
        "ms",
        lower_is_better=True,
        log=True,
        label=_w3_label,
    ),
    Chart(
        "w4",
        "w4-idle.png",
        "W4: memory per idle SSE connection",
        "kb_per_conn",
        "KB",
        lower_is_better=True,
    ),
    Chart("w6", "w6-upload.png", "W6: upload 1 GiB", "mb_per_s", "MB/s"),
    Chart("w5", "w5-download.png", "W5: download 1 GiB", "mb_per_s", "MB/s"),
    Chart(
        "w7", "w7-client.png", "W7: the Python client vs plain tools", "rate", "", label=_w7_label
    ),
)


def _is_tidewire(label: str) -> bool:
    return "tidewire" in label.lower()


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw every chart whose workload is in `results`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for chart in CHARTS:
        rows = [
            r
            for r in results.get("workloads", {}).get(chart.workload, {}).get("rows", [])
            if isinstance(r.get(chart.value), int | float) and chart.keep(r)
        ]
        if not rows:
            continue
        labels = [chart.label(r) for r in rows]
        values = [float(r[chart.value]) for r in rows]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4), dpi=110)
        colours = ["#1f6feb" if _is_tidewire(label) else "#9aa4ae" for label in labels]
        bars = ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()  # the table's order, top down
        better = "lower is better" if chart.lower_is_better else "higher is better"
        ax.set_xlabel(f"{chart.unit} ({better})" if chart.unit else better, fontsize=8)
        ax.set_title(chart.title, fontsize=10)
        ax.bar_label(bars, [f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
        if chart.log:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        path = out / chart.file
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path(__file__).parent / "results.json"
    out = Path(args[1]) if len(args) > 1 else source.parent / "charts"
    for path in draw(json.loads(source.read_text()), out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
