"""The verdict on an incident, the evidence that made it, and recommendations with numbers.

Pure: it reads a Tally (what the correlator summed while the incident lasted) and the
thresholds, so the rules are tested on golden replays without a kernel. README "Verdicts"
documents the same rules; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from synwatch.config import Thresholds
from synwatch.records import endpoint

Verdict = Literal["capacity", "concentrated", "spoofed", "unknown"]
MAX_BACKLOG = 65535  # sk_max_ack_backlog was 16 bits before 4.4; also a sane ceiling


@dataclass
class Tally:
    """What one incident's kernel evidence adds up to. Owned and updated by the correlator."""

    family: int | None = None
    address: str | None = None
    port: int | None = None
    samples: int = 0
    syns_overflowed: int = 0  # TCPReqQFullDoCookies + TCPReqQFullDrop
    syns_dropped: int = 0  # TCPReqQFullDrop alone (no cookies)
    cookies_sent: int = 0
    cookies_recv: int = 0  # handshakes completed with a cookie
    passive_opens: int = 0
    listen_overflows: int = 0
    backlog: int | None = None
    peak_syn_recv: int = 0
    peak_accept_queue: int = 0
    peak_overflow_rate: float = 0.0  # SYNs/s finding a full SYN queue
    peak_listen_overflow_rate: float = 0.0
    syn_recv_sum: int = 0  # request sockets summed over samples: the denominator of shares
    prefixes: dict[str, int] = field(default_factory=dict)  # from SYN-RECV samples
    prefix_count: int = 0  # distinct prefixes seen (at least)
    accounted: dict[str, int] = field(default_factory=dict)  # SYNs per prefix (nft set)
    sysctls: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Tally:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reasons: tuple[str, ...]  # the evidence that made the verdict, in words and numbers
    recommendations: tuple[str, ...]
    top_prefixes: tuple[tuple[str, int, float], ...]  # prefix, count, share


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def completion(t: Tally) -> float | None:
    """Share of the SYNs that found a full queue and still completed a handshake."""
    if t.cookies_sent > 0:
        return min(1.0, t.cookies_recv / t.cookies_sent)
    if t.syns_dropped > 0:  # no cookies: real clients retry and get in as passive opens
        return t.passive_opens / (t.passive_opens + t.syns_dropped)
    return None


def shares(t: Tally, limit: int = 10) -> tuple[tuple[str, int, float], ...]:
    """Prefixes by SYNs counted in the accounting set, else by request sockets sampled."""
    counts, total = ((t.accounted, sum(t.accounted.values())) if t.accounted
                     else (t.prefixes, t.syn_recv_sum))
    if not total:
        return ()
    ranked = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:limit]
    return tuple((p, n, round(n / total, 3)) for p, n in ranked)


def suggested_backlog(t: Tally) -> int:
    """A power of two above the backlog, the queue's peak and one second of the overflow."""
    backlog = t.backlog or 0
    need = max(128, 2 * backlog, t.peak_syn_recv + int(t.peak_overflow_rate),
               t.peak_accept_queue + int(t.peak_listen_overflow_rate))
    return min(MAX_BACKLOG, 1 << (need - 1).bit_length())


def _tuning(t: Tally) -> list[str]:
    """Backlog, somaxconn and application settings, with numbers."""
    out: list[str] = []
    where = endpoint(t.address, t.port)
    want = suggested_backlog(t)
    somaxconn = t.sysctls.get("net.core.somaxconn")
    if t.backlog == 0:
        out.append(f"{where} listens with backlog 0 (listen(fd, 0)): on kernels 4.4 to 6.12 its "
                   f"SYN queue is full from the first SYN; give listen() a backlog of {want}")
    elif t.backlog is not None:
        out.append(f"raise the listen backlog of {where} from {t.backlog} to {want} "
                   f"(nginx: `listen {t.port} backlog={want};`, Apache: `ListenBacklog {want}`, "
                   f"or the application's own listen() argument)")
    if somaxconn is not None and somaxconn < want:
        out.append(f"net.core.somaxconn is {somaxconn} and clamps every listen() backlog: "
                   f"`sysctl -w net.core.somaxconn={want}` (and in /etc/sysctl.d/)")
    return out


def _cookies(t: Tally) -> list[str]:
    mode = t.sysctls.get("net.ipv4.tcp_syncookies")
    if mode == 0:
        lost = f" ({t.syns_dropped} SYNs were dropped)" if t.syns_dropped else ""
        return [f"net.ipv4.tcp_syncookies is 0: a full SYN queue drops new clients{lost}; "
                "`sysctl -w net.ipv4.tcp_syncookies=1`"]
    if mode == 2:
        return ["net.ipv4.tcp_syncookies is 2: every SYN gets a cookie (TCP options such as "
                "window scaling are reduced) and the kernel never logs a flood; 1 is the usual "
                "setting"]
    return []


def judge(t: Tally, th: Thresholds) -> Judgement:
    top = shares(t)
    done = completion(t)
    where = endpoint(t.address, t.port)
    facts: list[str] = []
    if t.syns_overflowed:
        facts.append(f"{t.syns_overflowed} SYNs found the SYN queue of {where} full "
                     f"(peak {t.peak_overflow_rate:.0f}/s; backlog {t.backlog}, "
                     f"SYN-RECV peak {t.peak_syn_recv})")
    if t.listen_overflows:
        facts.append(f"the accept queue overflowed {t.listen_overflows} times (peak "
                     f"{t.peak_listen_overflow_rate:.0f}/s; accept queue peak "
                     f"{t.peak_accept_queue} of {t.backlog})")
    if done is not None:
        basis = (f"{t.cookies_recv} of {t.cookies_sent} SYN cookies came back" if t.cookies_sent
                 else f"{t.passive_opens} handshakes completed, {t.syns_dropped} SYNs dropped")
        facts.append(f"handshakes completed: {_pct(done)} ({basis})")
    k = th.concentrated_prefixes
    top_share = sum(s for _, _, s in top[:k])
    if top:
        facts.append(f"the top {min(k, len(top))} of {max(t.prefix_count, len(top))} source "
                     f"prefixes carry {_pct(top_share)}: "
                     + ", ".join(f"{p} ({_pct(s)})" for p, _, s in top[:k]))

    accept_overflowed = (t.listen_overflows > 0 and t.backlog is not None
                         and t.peak_accept_queue >= max(t.backlog, 1))
    verdict: Verdict
    recs: list[str] = []
    if accept_overflowed:
        verdict = "capacity"
        recs.append(f"the application behind {where} does not accept() fast enough (accept "
                    f"queue peaked at {t.peak_accept_queue} of {t.backlog}): add workers or "
                    "find what blocks its accept loop")
        recs += _tuning(t)
    elif done is not None and t.syns_overflowed and done >= th.capacity_completion:
        verdict = "capacity"
        recs.append(f"real clients: {_pct(done)} of the overflowing SYNs completed a handshake "
                    f"(threshold {_pct(th.capacity_completion)}); do not block them")
        recs += _tuning(t)
    elif not t.syns_overflowed or not top:
        verdict = "unknown"
        recs.append("not enough kernel-side evidence for a verdict: "
                    + ("no SYN overflowed a queue while synwatch watched"
                       if not t.syns_overflowed else "no source prefix was sampled "
                       "(SYN-RECV empty and no accounting set)"))
        recs += _tuning(t) if t.syns_overflowed else []
    elif top_share >= th.concentrated_share:
        verdict = "concentrated"
        few = (f"{top[0][0]} carries" if len(top) == 1 or k == 1
               else f"{min(k, len(top))} prefixes carry")
        recs.append(f"{few} {_pct(top_share)} of the SYNs "
                    f"(threshold {_pct(th.concentrated_share)}): block "
                    + ", ".join(p for p, _, _ in top[:k])
                    + " ([actions.ban] does it with a timeout)")
    elif (done is not None and done <= th.spoofed_completion
          and t.prefix_count >= th.spoofed_min_prefixes):
        verdict = "spoofed"
        retries = t.sysctls.get("net.ipv4.tcp_synack_retries")
        recs.append(f"the sources are forged: {t.prefix_count} prefixes (threshold "
                    f"{th.spoofed_min_prefixes}), the top {k} carry {_pct(top_share)}, and "
                    f"{_pct(done)} of the handshakes completed; bans would not help")
        recs.append(f"ask the upstream provider to filter SYNs to {where} (BCP 38, scrubbing): "
                    f"the flood peaked at {t.peak_overflow_rate:.0f} SYNs/s over the queue")
        if retries is not None and retries > 2:
            recs.append(f"`sysctl -w net.ipv4.tcp_synack_retries=2` (now {retries}) frees "
                        "request sockets sooner during the flood")
    else:
        verdict = "unknown"
        recs.append(f"neither concentrated (top {k} prefixes carry {_pct(top_share)}, "
                    f"threshold {_pct(th.concentrated_share)}) nor spread enough to be spoofed "
                    f"({t.prefix_count} prefixes, threshold {th.spoofed_min_prefixes})")
    if t.syns_overflowed or t.sysctls.get("net.ipv4.tcp_syncookies") == 0:
        recs += _cookies(t)
    return Judgement(verdict, tuple(facts), tuple(recs), top)
