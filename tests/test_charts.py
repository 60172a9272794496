"""The incident's picture off the kernel: its series and markers from recorded history records,
the PNG read back, the terminal's text, a notification's attachment through real local
endpoints (apprise `json://` takes attachments, `gotify://` takes none), and what happens
without the charts extra. The lab's own incidents are drawn and read back in
tests/test_verdicts_lab.py and tests/test_actions_lab.py."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from synwatch.actions.notify import send
from synwatch.actions.picture import Picture as Attached
from synwatch.charts.png import MARKER_COLOURS, SERIES_COLOURS, draw_png
from synwatch.charts.series import picture
from synwatch.charts.terminal import draw_text
from synwatch.records import ActionRun, Ban, Incident, StoredPoint
from synwatch.store import History
from tests.support.pictures import has_colour
from tests.support.receivers import http_receiver

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)


def _incident(**changed: object) -> Incident:
    fields: dict[str, object] = dict(
        id=7, host="web01", netns="", address="0.0.0.0", port=443, family=4,
        status="closed", verdict="concentrated", trigger="log", opened_at=T0,
        closed_at=T0 + timedelta(seconds=40), first_evidence_at=T0 - timedelta(seconds=3),
        detected_at=T0, peak_syn_recv=128,
        top_prefixes=({"prefix": "198.51.100.0/24", "count": 900, "share": 0.6,
                       "completed": 0},),
        recommendations=("Ban 198.51.100.0/24: 60% of the SYNs, none completes.",),
        state={"phases": [{"at": T0.isoformat(), "verdict": "spoofed"},
                          {"at": (T0 + timedelta(seconds=20)).isoformat(),
                           "verdict": "concentrated"}, {"at": "not a time"}]})
    fields.update(changed)
    return Incident(**fields)  # type: ignore[arg-type]


def _points() -> list[StoredPoint]:
    """Its build-up (three probes before the opening), then a flood until 25 s."""
    before = [StoredPoint(id=100 + n, incident_id=7, at=T0 - timedelta(seconds=n),
                          syn_recv=10 * n, accept_queue=0, backlog=128,
                          rates={"syns_sampled": 100.0}, top_prefixes=()) for n in (3, 2, 1)]
    return before + [StoredPoint(id=i, incident_id=7, at=T0 + timedelta(seconds=i),
                        syn_recv=128 if 5 <= i < 25 else 3, accept_queue=0, backlog=128,
                        rates={"syns_overflowed": 1500.0 if i == 12 else 900.0,
                               "syns_sampled": 2000.0, "cookies_sent": 900.0 if i < 25 else 0,
                               "cookies_recv": 2.0}, top_prefixes=())
            for i in range(40)]


def _runs() -> list[ActionRun]:
    return [ActionRun(7, "syncookies", "net.ipv4.tcp_syncookies", "done",
                      T0 + timedelta(seconds=1),
                      rendered="sysctl -w net.ipv4.tcp_syncookies=1  # in this host, was 0"),
            ActionRun(7, "syncookies", "net.ipv4.tcp_syncookies", "done",
                      T0 + timedelta(seconds=40),
                      rendered="sysctl -w net.ipv4.tcp_syncookies=0  # in this host"),
            ActionRun(7, "notify", "opened", "done", T0 + timedelta(seconds=2))]


def _bans() -> list[Ban]:
    return [Ban("198.51.100.0/24", "nftables", "", 7, T0 + timedelta(seconds=22),
                T0 + timedelta(hours=1)),
            Ban("203.0.113.0/24", "nftables", "", 7, T0 + timedelta(seconds=22),
                T0 + timedelta(hours=1), removed_at=T0 + timedelta(seconds=30)),
            Ban("192.0.2.0/24", "nftables", "", 8, T0, T0 + timedelta(hours=1))]  # another's


def test_the_series_and_markers_come_from_the_history_records() -> None:
    p = picture(_incident(), _points(), _runs(), _bans(), T0 + timedelta(minutes=5))
    assert p.syn_recv.t[:4] == (-3.0, -2.0, -1.0, 0.0), "the build-up first"
    assert p.syns_full.peak == (12.0, 1500.0)
    assert p.syn_recv.peak == (5.0, 128.0)
    assert p.syns_all.peak == (0.0, 2000.0)  # the first of equal highs
    assert [(m.t, m.kind, m.label) for m in p.markers] == [
        (0.0, "phase", "spoofed"), (1.0, "cookies", "cookies raised"),
        (20.0, "phase", "concentrated"), (22.0, "ban", "ban 198.51.100.0/24"),
        (22.0, "ban", "ban 203.0.113.0/24"), (30.0, "ban-end", "203.0.113.0/24 lifted"),
        (40.0, "cookies", "cookies restored"), (40.0, "closed", "closed")]
    assert p.span == (-3.0, 40.0)
    assert p.title == "concentrated: incident 7, 0.0.0.0:443 on web01"
    assert p.prefixes == (("198.51.100.0/24", 0.6),)
    # drawn after its ban expired: named, and the incident's time is not stretched to it
    later = picture(_incident(), _points(), _runs(), _bans(), T0 + timedelta(hours=2))
    assert (3600.0, "ban-end", "198.51.100.0/24 expired") in [
        (m.t, m.kind, m.label) for m in later.markers]
    assert later.span == (-3.0, 40.0)


def test_the_png_has_each_series_where_it_peaked_and_the_bans_where_they_landed() -> None:
    from PIL import Image

    p = picture(_incident(), _points(), _runs(), _bans(), T0 + timedelta(minutes=5))
    drawn = draw_png(p)
    image = Image.open(io.BytesIO(drawn.png)).convert("RGB")
    assert image.size == (640, 800) and len(drawn.png) < 200_000
    for field, panel in (("syns_full", "rate"), ("syn_recv", "queue"),
                         ("cookies_sent", "cookies")):
        peak = getattr(p, field).peak
        x, y = drawn.to_pixel[panel](*peak)
        assert has_colour(image, x, y, SERIES_COLOURS[field]), field
        # and not the panel's other series: the wrong one there would fail
        other = {"syns_full": "cookies_sent", "syn_recv": "cookies_recv",
                 "cookies_sent": "syn_recv"}[field]
        assert not has_colour(image, x, y, SERIES_COLOURS[other], near=1), field
    x, _ = drawn.to_pixel["queue"](22.0, 0)
    _, top, _, bottom = drawn.boxes["queue"]
    assert has_colour(image, x, (top + bottom) // 2, MARKER_COLOURS["ban"], near=2)
    x, _ = drawn.to_pixel["queue"](15.0, 0)  # no marker there
    assert not has_colour(image, x, (top + bottom) // 2, MARKER_COLOURS["ban"], near=2)


def test_the_terminal_picture_in_colour_and_plain() -> None:
    p = picture(_incident(), _points(), _runs(), _bans(), T0 + timedelta(minutes=5))
    plain = draw_text(p, colour=False)
    assert "\x1b[" not in plain
    for text in ("SYNs/s", "found the queue full", "all SYNs (sampled)", "backlog (effective)",
                 "cookies validated", "+22.0 s  ban 198.51.100.0/24", "198.51.100.0/24",
                 "concentrated: incident 7, 0.0.0.0:443 on web01"):
        assert text in plain, text
    assert "\x1b[" in draw_text(p, colour=True)
    empty = picture(_incident(state={}, top_prefixes=({"share": "x"}, "junk")), [], [], [],
                    T0 + timedelta(minutes=5))
    assert empty.prefixes == (("?", 0.0),), "rows anyone may write are drawn, never fatal"
    assert "SYNs/s: nothing recorded" in draw_text(empty, colour=False)


def test_a_notification_carries_the_picture_where_the_service_takes_one(
        tmp_path: Path) -> None:
    png = tmp_path / "pic" / "synwatch-incident-7.png"
    png.parent.mkdir()
    png.write_bytes(draw_png(picture(_incident(), _points(), _runs(), _bans(),
                                     T0 + timedelta(minutes=5))).png)
    with http_receiver() as (port, posts):
        said = send((f"json://127.0.0.1:{port}/hook", f"gotify://127.0.0.1:{port}/tok"),
                    "synwatch: SYN flood", "the text", 10, picture=lambda: Attached(png),
                    hint="synwatch incidents show 7 --plot")
    assert said == "sent to 2 URLs with its picture"
    [json_post] = [p for p in posts if "attachments" in p]
    [attached] = json_post["attachments"]
    assert base64.b64decode(attached["base64"]).startswith(b"\x89PNG")
    assert json_post["message"] == "the text"
    [gotify] = [p for p in posts if "attachments" not in p]
    assert gotify["message"] == "the text\n\nIts picture: synwatch incidents show 7 --plot"
    assert not png.exists(), "the drawing is removed once sent"
    with http_receiver() as (port, posts):  # without the charts extra: text, as it was
        send((f"json://127.0.0.1:{port}/hook",), "synwatch: SYN flood", "the text", 10)
    assert [p.get("attachments") for p in posts] in ([None], [[]])
    assert posts[0]["message"] == "the text"
    with http_receiver() as (port, posts):  # only services that take none: the line, always
        said = send((f"gotify://127.0.0.1:{port}/tok",), "synwatch: SYN flood", "the text", 10,
                    picture=lambda: Attached(png), hint="synwatch incidents show 7 --plot")
    assert said == "sent to 1 URL"
    assert posts[0]["message"] == "the text\n\nIts picture: synwatch incidents show 7 --plot"


def test_a_picture_drawn_for_a_message_by_a_child_process(tmp_path: Path) -> None:
    """What the notify worker does: the child draws from the history, the PNG is handed over
    in a folder of its own; an incident the history does not have is no picture, and a
    warning, never a failed message."""
    from dataclasses import asdict

    from synwatch.actions.picture import draw_picture
    from synwatch.records import IncidentChange, TimelinePoint
    from synwatch.store.spool import change_of, from_json, to_json

    def point(at: datetime, syn_recv: int) -> TimelinePoint:
        return TimelinePoint(at=at, syn_recv=syn_recv, accept_queue=0, backlog=64,
                             rates={"syns_overflowed": float(syn_recv)}, top_prefixes=())

    change = IncidentChange(
        change="opened", serial=1, incident_id=None, host="web01", netns="",
        address="0.0.0.0", port=443, family=4, status="open", verdict="spoofed",
        trigger="log", opened_at=T0, closed_at=None, first_evidence_at=T0, detected_at=T0,
        peak_syn_recv=64, top_prefixes=(), recommendations=(), reasons=(), state={},
        sample=point(T0, 64), earlier=(point(T0 - timedelta(seconds=2), 5),
                                       point(T0 - timedelta(seconds=1), 30)))
    assert change_of(from_json(to_json(asdict(change)))) == change, "spooled as it is"
    url = f"sqlite:///{tmp_path}/h.db"
    store = History.open(url)
    incident_id = store.save_incident(change)
    assert [s.syn_recv for s in store.samples(incident_id)] == [5, 30, 64], "the build-up kept"
    store.close()
    before = set(Path(tempfile.gettempdir()).glob("synwatch-picture-*"))
    drawn = draw_picture(url, incident_id, tmp_path)
    assert drawn is not None and drawn.path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "matplotlib").is_dir(), "its font cache in the state directory"
    drawn.remove()
    assert draw_picture(url, incident_id + 1, tmp_path) is None  # no such incident
    assert set(Path(tempfile.gettempdir()).glob("synwatch-picture-*")) == before


def _without(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI with ``module`` missing, as on a machine without the charts extra."""
    code = (f"import sys; sys.modules[{module!r}] = None; from synwatch.cli import main; "
            f"sys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_without_the_charts_extra_plot_says_which_package_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    History.open(f"sqlite:///{tmp_path}/h.db").close()
    png = _without("matplotlib", "incidents", "show", "1", "--plot", str(tmp_path / "x.png"),
                   "--config", str(config))
    assert png.returncode == 2, png
    assert "matplotlib is not installed" in png.stderr and "synwatch[charts]" in png.stderr
    text = _without("uniplot", "incidents", "show", "1", "--plot", "--config", str(config))
    assert text.returncode == 2 and "uniplot is not installed" in text.stderr, text
    assert not (tmp_path / "x.png").exists()
    drawn = subprocess.run([sys.executable, "-c",
                            "import sys; sys.modules['matplotlib'] = None; "
                            "from synwatch.charts.draw import main; sys.exit(main())", "1",
                            str(tmp_path / "y.png")], input=f"sqlite:///{tmp_path}/h.db\n",
                           capture_output=True, text=True, timeout=60, check=False)
    assert drawn.returncode == 2 and "matplotlib is not installed" in drawn.stderr, drawn


def test_the_service_never_loads_a_plotting_library() -> None:
    """The notify worker draws in a child (synwatch.charts.draw): the service's own process,
    with every action it may run, imports neither matplotlib nor uniplot nor numpy."""
    code = ("import sys; import synwatch.daemon.service, synwatch.actions.notify, "
            "synwatch.actions.picture, synwatch.actions.registry as r; r.registered(); "
            "print(sorted(m for m in ('matplotlib', 'uniplot', 'numpy', 'PIL') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_top_sparklines_cover_the_last_minute_whatever_the_interval() -> None:
    """Each listener's SYN-RECV and overflow rate in 20 slices of the last minute: a flood
    30 s ago sits in the middle whether probes came every 0.5 s or every 5 s; the overflow is
    the namespace's while this listener's queue is full, else its own drops."""
    from synwatch.cli.topview import Trends, sparkline
    from synwatch.probes.snapshot import ListenerState, Snapshot
    from synwatch.probes.sockdiag import Listener

    def snap(syn_recv: int, full: int) -> Snapshot:
        li = ListenerState(Listener(4, "0.0.0.0", 80, 64, 0), syn_recv, (), 0)
        return Snapshot("", (li,), {"TcpExt.TCPReqQFullDoCookies": full}, {})

    assert sparkline([0.0, 0.0]) == "▁▁" and sparkline([0.0, 4.0, 8.0]) == "▁▅█"
    for every in (0.5, 5.0):
        trends, prev, full = Trends(), None, 0
        for n in range(int(60 / every) + 1):
            at = n * every
            flooding = 28 <= at < 33
            full += 500 if flooding else 0
            now = snap(64 if flooding else 0, full)
            trends.add(now, prev, every, at)
            prev = now
        syn_recv, overflow = str(trends.lines((4, "0.0.0.0", 80))).split("\n")
        line = syn_recv.split(" ")[0]
        assert len(line) == 20 and "█" in line[9:11] and set(line[:9] + line[11:]) == {"▁"}, line
        assert "█" in overflow.split(" ")[0], overflow
