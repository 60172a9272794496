"""The picture of an incident as a PNG, with matplotlib (the ``charts`` extra; Debian's
python3-matplotlib). Imported only where a picture is drawn, never by the service's own process:
matplotlib costs ~650 ms and ~57 MiB to import (docs/benchmarks.md).

Made for a phone and for any mail client: 640 px wide, an opaque white background (dark mail
clients show it as a card), colours that keep apart in both, each series named in its panel.
The colours are fixed (SERIES_COLOURS, MARKER_COLOURS): the tests find the series by them.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synwatch.charts.series import Picture, Series

SERIES_COLOURS = {"syns_full": "#d62728", "syns_all": "#1f77b4", "syn_recv": "#ff7f0e",
                  "accept_queue": "#bcbd22",
                  "backlog": "#555555", "cookies_sent": "#9467bd", "cookies_recv": "#2ca02c",
                  "prefixes": "#8c564b"}
MARKER_COLOURS = {"phase": "#000000", "cookies": "#17becf", "ban": "#e377c2",
                  "ban-end": "#e377c2", "closed": "#7f7f7f"}
WIDTH, HEIGHT, DPI = 6.4, 8.0, 100  # inches at DPI: 640 x 800 px
MAX_BYTES = 200_000


@dataclass(frozen=True, slots=True)
class Drawn:
    """The PNG, and where each panel's data lands in it (for the tests that read it back)."""

    png: bytes
    to_pixel: dict[str, Callable[[float, float], tuple[int, int]]]
    boxes: dict[str, tuple[int, int, int, int]]  # each panel's left, top, right, bottom


def _plot(ax: Any, s: Series, colour: str, label: str, *, dashed: bool = False) -> None:
    xs = [t for t, v in zip(s.t, s.v, strict=True) if v is not None]
    ys = [v for v in s.v if v is not None]
    if xs:
        ax.plot(xs, ys, color=colour, linewidth=2.2, linestyle="--" if dashed else "-",
                label=label, drawstyle="steps-post" if dashed else "default")


def _labels(p: Picture) -> list[tuple[float, str, str]]:
    """The markers' names, those of one kind at one moment said once ("ban 198.51.100.0/24
    +1": a ban of two blocks)."""
    out: list[tuple[float, str, str]] = []
    for m in p.markers:
        if out and abs(out[-1][0] - m.t) < 1.0:  # one moment: one label
            t, kind, label = out[-1]
            if m.label.split(" ")[0] == label.split(" ")[0] and kind == m.kind:
                head, _, more = label.partition(" +")
                out[-1] = (t, kind, f"{head} +{int(more or 0) + 1}")
            else:
                out[-1] = (t, kind, f"{label}, {m.label}")
        else:
            out.append((m.t, m.kind, m.label))
    return out


def draw_png(p: Picture) -> Drawn:
    import matplotlib  # noqa: PLC0415 - only where a picture is drawn

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global state

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, facecolor="white")
    grid = fig.add_gridspec(4, 1, height_ratios=[3, 3, 3, 2], hspace=0.62,
                            left=0.13, right=0.97, top=0.78, bottom=0.05)
    rate, queue, cookies = (fig.add_subplot(grid[i]) for i in range(3))
    shares = fig.add_subplot(grid[3])
    # text from the history is shown as it is: never read as mathtext ("$...$")
    fig.text(0.02, 0.99, p.title, ha="left", va="top", fontsize=12, fontweight="bold",
             parse_math=False)
    if p.subtitle:
        fig.text(0.02, 0.925, p.subtitle, ha="left", va="top", fontsize=8, color="#111111",
                 parse_math=False)
    _plot(rate, p.syns_all, SERIES_COLOURS["syns_all"], "all SYNs (sampled)")
    _plot(rate, p.syns_full, SERIES_COLOURS["syns_full"], "found the queue full")
    rate.set_ylabel("SYNs/s")
    _plot(queue, p.syn_recv, SERIES_COLOURS["syn_recv"], "SYN-RECV")
    if p.accept_queue.peak is not None:  # (an application that does not accept fast enough)
        _plot(queue, p.accept_queue, SERIES_COLOURS["accept_queue"], "accept queue")
    _plot(queue, p.backlog, SERIES_COLOURS["backlog"], "backlog (effective)", dashed=True)
    queue.set_ylabel("requests")
    _plot(cookies, p.cookies_sent, SERIES_COLOURS["cookies_sent"], "cookies sent")
    _plot(cookies, p.cookies_recv, SERIES_COLOURS["cookies_recv"], "cookies validated")
    cookies.set_ylabel("cookies/s")
    cookies.set_xlabel("seconds from the opening")
    for ax in (rate, queue, cookies):
        ax.set_xlim(*p.span)
        ax.set_ylim(bottom=0)
        ax.set_ylim(top=max(ax.get_ylim()[1] * 1.15, 1.0))  # a line at its peak stays inside
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.set_facecolor("white")
        for m in p.markers:
            ax.axvline(m.t, color=MARKER_COLOURS[m.kind], linewidth=1.4,
                       linestyle=":" if m.kind in ("ban-end", "closed") else "-")
    kinds = {m.kind for m in p.markers}
    for kind, name in (("phase", "phase"), ("cookies", "cookies"), ("ban", "ban"),
                       ("closed", "closed")):
        if kind in kinds:  # the marker lines' key, beside the series'
            rate.plot([], [], color=MARKER_COLOURS[kind], linewidth=1.4,
                      linestyle=":" if kind == "closed" else "-", label=name)
    for ax in (rate, queue, cookies):  # above its panel: never over the data
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, ncol=6,
                      frameon=False, borderaxespad=0.2, handlelength=1.6, columnspacing=1.0)
    said = "; ".join(f"{label} {t:+.1f} s" for t, _, label in _labels(p))
    if said:
        lines = textwrap.wrap(said, 120)
        fig.text(0.02, 0.875, "\n".join(lines[:2]) + (" …" if len(lines) > 2 else ""),
                 ha="left", va="top", fontsize=7, color="#333333", parse_math=False)
    names = [n for n, _ in p.prefixes][::-1]
    values = [v * 100 for _, v in p.prefixes][::-1]
    if names:
        bars = shares.barh(range(len(names)), values, color=SERIES_COLOURS["prefixes"])
        for bar, name, value in zip(bars, names, values, strict=True):
            shares.text(1, bar.get_y() + bar.get_height() / 2, f"{name}  {value:.0f}%",
                        va="center", ha="left", fontsize=8, color="white"
                        if value > 45 else "#222222", parse_math=False)
        shares.set_xlim(0, 100)
        shares.set_yticks([])
    else:
        shares.text(0.5, 0.5, "no source prefixes (spoofed, or not sampled)",
                    ha="center", va="center", fontsize=8, transform=shares.transAxes)
        shares.set_yticks([])
    shares.set_xlabel("share of the flood's SYNs (%)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white",
                metadata={"Software": "synwatch"})
    height = fig.bbox.height
    axes = {"rate": rate, "queue": queue, "cookies": cookies, "shares": shares}

    def mapper(ax: Any) -> Callable[[float, float], tuple[int, int]]:
        def to_pixel(x: float, y: float) -> tuple[int, int]:
            px, py = ax.transData.transform((x, y))
            return round(px), round(height - py)  # PNG rows count from the top
        return to_pixel

    def box(ax: Any) -> tuple[int, int, int, int]:
        b = ax.get_window_extent()
        return round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0)

    return Drawn(buffer.getvalue(), {name: mapper(ax) for name, ax in axes.items()},
                 {name: box(ax) for name, ax in axes.items()})
