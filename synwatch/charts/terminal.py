"""The picture of an incident in a terminal, with uniplot (the ``charts`` extra): the same
series as the PNG, one panel each, the markers as vertical lines (named under the panels), in
colour on a terminal and plain in a pipe."""

from __future__ import annotations

from synwatch.charts.series import Picture, Series

PANELS = (("SYNs/s", (("all SYNs (sampled)", "syns_all"), ("found the queue full", "syns_full"))),
          ("SYN-RECV", (("SYN-RECV", "syn_recv"), ("accept queue", "accept_queue"),
                        ("backlog (effective)", "backlog"))),
          ("cookies/s", (("cookies sent", "cookies_sent"), ("cookies validated", "cookies_recv"))))


def _points(s: Series) -> tuple[list[float], list[float]]:
    pairs = [(t, v) for t, v in zip(s.t, s.v, strict=True) if v is not None]
    return [t for t, _ in pairs], [v for _, v in pairs]


def draw_text(p: Picture, *, colour: bool, width: int = 64, height: int = 9) -> str:
    from uniplot import plot_to_string  # noqa: PLC0415 - only where a picture is drawn

    out = [p.title, *([p.subtitle] if p.subtitle else []), ""]
    marks = sorted({m.t for m in p.markers if p.span[0] <= m.t <= p.span[1]})
    for unit, series in PANELS:
        drawn = [(name, _points(getattr(p, field))) for name, field in series]
        drawn = [(name, xy) for name, xy in drawn if xy[0]]
        if not drawn:
            out += [f"{unit}: nothing recorded", ""]
            continue
        top = max(max(ys) for _, (_, ys) in drawn)
        out.append(plot_to_string(
            [ys for _, (_, ys) in drawn], [xs for _, (xs, _) in drawn],
            title=unit, legend_labels=[name for name, _ in drawn], color=colour,
            lines=True, width=width, height=height, x_min=p.span[0], x_max=p.span[1],
            y_min=0, y_max=max(top * 1.1, 1.0), x_gridlines=marks or [0.0], x_unit=" s"))
    if p.markers:
        out.append("markers (the vertical lines, seconds from the opening):")
        out += [f"  {m.t:+8.1f} s  {m.label}" for m in p.markers]
    if p.prefixes:
        out.append("top source prefixes, share of the flood's SYNs:")
        out += [f"  {name:<43} {share * 100:5.1f}% {'█' * round(share * 30)}"
                for name, share in p.prefixes]
    return "\n".join(out) + "\n"
