"""What `synwatch top` draws (rich): every listener with its queues as bars, drop rates and top
source prefixes, the namespace's overflow rates, and the open incidents with their verdicts.
Pure: it gets two snapshots and the incidents, so it is tested without a terminal."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from datetime import datetime

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from synwatch.detect.delta import ListenerId, listener_id
from synwatch.probes.snapshot import Snapshot
from synwatch.records import Incident, endpoint

BAR = 14  # the bars' widest: the prefixes get the rest; the numbers are never cut


def _bar(value: int, limit: int) -> Group | Text:
    """The numbers first (whole at any width: the column is as wide as they are), then the
    bar in the alarm colour when full (rich draws a finished bar green unless told)."""
    if limit <= 0:
        return Text(str(value))
    full = value >= limit
    colour = "red" if full else "yellow" if value * 2 >= limit else "green"
    return Group(Text(f"{value}/{limit}", style="bold red" if full else "", no_wrap=True),
                 ProgressBar(total=limit, completed=min(value, limit), width=None,
                             complete_style=colour, finished_style=colour))


def _numbers_width(snap: Snapshot) -> int:
    """The widest "value/limit" of the listeners' bars: their column is never narrower."""
    return max([len(f"{max(st.listener.accept_queue, st.syn_recv)}/{st.listener.backlog}")
                for st in snap.listeners] + [5])


def _rate(now: int, before: int | None, seconds: float) -> str:
    if before is None or seconds <= 0:
        return "-"
    return f"{max(0, now - before) / seconds:.0f}/s"


BLOCKS = "▁▂▃▄▅▆▇█"
TREND = 60.0  # seconds a sparkline covers
OVERFLOW = ("TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop")


def sparkline(values: Sequence[float], width: int = 20) -> str:
    """The last ``width`` values as eighth blocks, scaled to their own peak (zero is the
    lowest block: a flat line says nothing happened, not that nothing was drawn). Eight
    characters need no library: rich has none, and a plotting one is not loaded by `top`."""
    shown = list(values)[-width:]
    top = max(shown, default=0.0)
    if top <= 0:
        return BLOCKS[0] * len(shown)
    return "".join(BLOCKS[min(7, round(v / top * 7))] for v in shown)


class Trends:
    """Each listener's SYN-RECV and overflow rate over the last TREND seconds, for its
    sparklines. The overflow rate is the namespace's (SYNs that found a queue full, cookies
    or drops) while this listener's SYN queue is full, else its own drops: the counters are
    the namespace's, and a full queue is what makes them a listener's."""

    def __init__(self) -> None:
        self.points: dict[ListenerId, deque[tuple[float, int, float]]] = {}

    def add(self, snap: Snapshot, prev: Snapshot | None, seconds: float, at: float) -> None:
        full = (sum(snap.counters.get(n, 0) for n in OVERFLOW)
                - sum(prev.counters.get(n, 0) for n in OVERFLOW)) if prev else 0
        drops = {listener_id(st): st.listener.drops for st in prev.listeners} if prev else {}
        for st in snap.listeners:
            key = listener_id(st)
            queue_full = st.listener.backlog > 0 and st.syn_recv >= st.listener.backlog
            own = st.listener.drops - drops.get(key, st.listener.drops)
            rate = max(0, full if queue_full else own) / seconds if seconds > 0 else 0.0
            kept = self.points.setdefault(key, deque(maxlen=600))
            kept.append((at, st.syn_recv, rate))
            while kept and kept[0][0] < at - TREND:
                kept.popleft()
        live = {listener_id(st) for st in snap.listeners}
        for key in [k for k in self.points if k not in live]:
            del self.points[key]

    def lines(self, key: ListenerId, width: int = 20) -> Text:
        """The last TREND seconds in ``width`` equal slices, each its highest value (a probe
        every 0.5 s or every 5 s, the line covers the same minute)."""
        kept = self.points.get(key, deque())
        end = kept[-1][0] if kept else 0.0

        def slices(index: int) -> list[float]:
            out = [0.0] * width
            for point in kept:
                at = min(width - 1, int((point[0] - (end - TREND)) / TREND * width))
                if at >= 0:
                    out[at] = max(out[at], float(point[index]))
            return out

        return Text(f"{sparkline(slices(1), width)} SYN-RECV\n"
                    f"{sparkline(slices(2), width)} overflow/s", no_wrap=True)


def listeners_table(snap: Snapshot, prev: Snapshot | None, seconds: float,
                    trends: Trends | None = None) -> Table:
    table = Table(title=f"listeners in {snap.netns or 'the host namespace'}", expand=True)
    numbers = _numbers_width(snap)
    table.add_column("listener", no_wrap=True)
    for name in ("accept queue", "SYN-RECV"):
        table.add_column(name, no_wrap=True, min_width=numbers, max_width=max(numbers, BAR))
    table.add_column("drops", no_wrap=True)
    if trends is not None:
        table.add_column("last minute", no_wrap=True)
    table.add_column("top source prefixes", ratio=1, overflow="fold")
    before = {listener_id(st): st.listener.drops for st in prev.listeners} if prev else {}
    busiest = sorted(snap.listeners, key=lambda st: (-st.syn_recv, -st.listener.accept_queue,
                                                     st.listener.port))
    for st in busiest:
        li = st.listener
        table.add_row(endpoint(li.address, li.port), _bar(li.accept_queue, li.backlog),
                      _bar(st.syn_recv, li.backlog),
                      _rate(li.drops, before.get(listener_id(st)), seconds),
                      *([trends.lines(listener_id(st))] if trends is not None else []),
                      ", ".join(f"{p} ({n})" for p, n in st.top_prefixes) or "-")
    return table


COUNTERS = (("SYN queue full", ("TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop")),
            ("dropped", ("TcpExt.TCPReqQFullDrop",)),
            ("accept queue overflow", ("TcpExt.ListenOverflows",)),
            ("cookies sent", ("TcpExt.SyncookiesSent",)),
            ("cookies back", ("TcpExt.SyncookiesRecv",)))


def counters_line(snap: Snapshot, prev: Snapshot | None, seconds: float) -> Text:
    parts = []
    for label, names in COUNTERS:
        now = sum(snap.counters.get(n, 0) for n in names)
        then = sum(prev.counters.get(n, 0) for n in names) if prev else None
        parts.append(f"{label} {_rate(now, then, seconds)}")
    cookies = snap.sysctls.get("net.ipv4.tcp_syncookies")
    return Text("  ".join(parts) + f"   tcp_syncookies={cookies}")


def incidents_table(incidents: Sequence[Incident] | None) -> Table | Text:
    if incidents is None:
        return Text("incidents: no history here (synwatch status tells why)", style="dim")
    if not incidents:
        return Text("no open incident", style="green")
    table = Table(title="open incidents", expand=True)
    for name in ("id", "listener", "verdict", "since", "top prefixes"):
        table.add_column(name)
    for i in incidents:
        table.add_row(str(i.id), endpoint(i.address, i.port),
                      Text(i.verdict, style="bold red" if i.verdict != "capacity" else "yellow"),
                      i.opened_at.strftime("%H:%M:%S"),
                      ", ".join(p["prefix"] for p in i.top_prefixes[:3]) or "-")
    return table


def view(snap: Snapshot, prev: Snapshot | None, seconds: float,
         incidents: Sequence[Incident] | None, now: datetime, *,
         trends: Trends | None = None) -> Group:
    return Group(Text(f"synwatch top   {now:%H:%M:%S}   q quits", style="bold"),
                 listeners_table(snap, prev, seconds, trends),
                 counters_line(snap, prev, seconds), incidents_table(incidents))
