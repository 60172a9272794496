"""Reading an incident's picture back: drawn from a lab service's history (synwatch.charts),
decoded with Pillow (matplotlib's own dependency), and looked at where its timeline says the
series peaked and where its markers fall. A chart that plots nothing, or the wrong series in a
panel, has none of the series' colour there.

``SYNWATCH_KEEP_PICTURES=DIR`` keeps each picture checked as DIR/NAME.png (the README's
pictures are the lab's own: docs/pictures/README.md says how they were made)."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

from synwatch.config import load_config

Colour = tuple[int, int, int]
NEAR = 4  # pixels around a point where its line may be drawn (line width, antialiasing)


def _rgb(hex_colour: str) -> Colour:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def _close(a: Colour, b: Colour) -> bool:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) <= 60


def has_colour(image: object, x: int, y: int, colour: str, near: int = NEAR) -> bool:
    want = _rgb(colour)
    width, height = image.size  # type: ignore[attr-defined]
    return any(_close(image.getpixel((i, j)), want)  # type: ignore[attr-defined]
               for i in range(max(0, x - near), min(width, x + near + 1))
               for j in range(max(0, y - near), min(height, y + near + 1)))


def check_picture(config: Path, incident_id: int, name: str, *,
                  series: tuple[str, ...] = ("syns_full", "syn_recv"),
                  some_of: tuple[str, ...] = (), bans: int = 0) -> dict[str, object]:
    """The incident's PNG, checked: its size, each of ``series`` in its colour where it
    peaked, the backlog line, and ``bans`` ban markers where the bans landed. Returns what
    the tests may look at further (the picture's series and markers)."""
    from PIL import Image

    from synwatch.charts.draw import picture_of
    from synwatch.charts.png import MARKER_COLOURS, MAX_BYTES, SERIES_COLOURS, draw_png
    from synwatch.store import History

    c = load_config(str(config))
    store = History.open(c.storage_url, write=False)
    try:
        pic = picture_of(store, incident_id, datetime.now(timezone.utc))
    finally:
        store.close()
    drawn = draw_png(pic)
    assert len(drawn.png) < MAX_BYTES, len(drawn.png)
    image = Image.open(io.BytesIO(drawn.png)).convert("RGB")
    assert image.size == (640, 800)
    keep = os.environ.get("SYNWATCH_KEEP_PICTURES")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{name}.png").write_bytes(drawn.png)
    panel = {"syns_full": "rate", "syns_all": "rate", "syn_recv": "queue",
             "accept_queue": "queue", "backlog": "queue", "cookies_sent": "cookies",
             "cookies_recv": "cookies"}
    if some_of:  # a short burst: which of these its probes caught is chance, one of them is not
        series = (*series, *[f for f in some_of if getattr(pic, f).peak is not None][:1])
        assert len(series) > 0, f"none of {some_of} recorded"
    for field in series:
        peak = getattr(pic, field).peak
        assert peak is not None, f"{field}: nothing recorded ({getattr(pic, field)})"
        x, y = drawn.to_pixel[panel[field]](*peak)
        assert has_colour(image, x, y, SERIES_COLOURS[field]), (field, peak, (x, y))
    # the backlog line where no series covers it: SYN-RECV reaches it while the queue is full,
    # and is drawn over it there
    line = [drawn.to_pixel["queue"](t, v) for t, v in zip(pic.backlog.t, pic.backlog.v,
                                                         strict=True) if v is not None]
    assert line, "no backlog line"
    assert any(has_colour(image, x, y, SERIES_COLOURS["backlog"]) for x, y in line), \
        ("backlog", pic.backlog)
    marks = [m for m in pic.markers if m.kind == "ban"]
    assert len(marks) == bans, pic.markers
    for m in marks:  # the marker's line crosses the middle of every time panel
        for ax in ("rate", "queue", "cookies"):
            x, _ = drawn.to_pixel[ax](m.t, 0)
            _, top, _, bottom = drawn.boxes[ax]
            assert has_colour(image, x, (top + bottom) // 2, MARKER_COLOURS["ban"], near=2), \
                (m, ax)
    return {"picture": pic, "drawn": drawn, "image": image}
