"""The verdict on an incident, the evidence that made it, and recommendations with numbers.

Pure: it reads a Tally (what the correlator summed while the incident lasted) and the
thresholds, so the rules are tested on golden replays without a kernel. docs/incidents.md "Verdicts"
documents the same rules; keep the two in step.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synwatch.config import Thresholds
from synwatch.detect import rules
from synwatch.detect.bantargets import TargetPlan, plan_targets
from synwatch.detect.stats import chao1, wilson
from synwatch.detect.tally import Tally
from synwatch.records import NOT_ACCEPTING, NOT_ACCEPTING_AFTER, Verdict, endpoint

if TYPE_CHECKING:
    pass



@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reasons: tuple[str, ...]  # the evidence that made the verdict, in words and numbers
    recommendations: tuple[str, ...]
    top_prefixes: tuple[tuple[str, int, float, int], ...]  # prefix, count, share, completed
    targets: TargetPlan | None = None  # what to ban and rate limit (concentrated only)


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def completion(t: Tally) -> float | None:
    """Share of the SYNs that found a full queue and still completed a handshake."""
    if t.cookies_sent > 0:
        return min(1.0, t.cookies_recv / t.cookies_sent)
    if t.syns_dropped > 0:  # no cookies: real clients retry and get in as passive opens
        return t.passive_opens / (t.passive_opens + t.syns_dropped)
    if t.half_open:  # requests that stayed half-open against handshakes that completed
        stuck = max(t.peak_syn_recv, t.sampled_syns)
        return t.passive_opens / (t.passive_opens + stuck) if stuck else None
    return None


@dataclass(frozen=True, slots=True)
class Basis:
    """Where the source shares come from, and how much they can be trusted."""

    name: str  # "accounting set" | "packet sample" | "request sockets"
    counts: dict[str, int]
    total: int
    n: int  # independent samples behind the shares
    seen: int  # distinct prefixes seen
    spread: int  # distinct prefixes, with those never sampled estimated
    detail: str


def basis(t: Tally) -> Basis | None:
    """The best evidence of who sends the SYNs: the nftables set counts every SYN, the packet
    sampler samples every SYN, the socket table keeps only the sources of live requests."""
    if t.accounted:
        total = sum(t.accounted.values())
        return Basis("accounting set", t.accounted, total, total, len(t.accounted),
                     len(t.accounted), f"every SYN counted: {total}")
    if t.sampled_n:
        seen = max(len(t.sampled_seen), t.sampled_distinct)
        f1 = sum(1 for n in t.sampled_seen.values() if n == 1)
        f2 = sum(1 for n in t.sampled_seen.values() if n == 2)
        rate = f", 1 in {t.one_in}" if t.one_in > 1 else ""
        return Basis("packet sample", t.sampled, t.sampled_syns or 1, t.sampled_n, seen,
                     max(seen, chao1(len(t.sampled_seen), f1, f2)),
                     f"{t.sampled_n} SYNs sampled{rate}, ~{t.sampled_syns} SYNs")
    if t.syn_recv_sum:
        n = t.socket_n or t.peak_syn_recv
        seen = max(t.prefix_count, t.socket_distinct)
        return Basis("request sockets", t.prefixes, t.syn_recv_sum, n, seen,
                     max(seen, chao1(t.socket_distinct, t.socket_singletons,
                                     t.socket_doubletons)),
                     f"{n} request sockets")
    return None


def completed_in(t: Tally, prefixes: list[str]) -> dict[str, int]:
    """Per prefix: sources inside it seen completing handshakes, ACK packets sampled
    (estimated) and their connections' peak in the socket table. One pass over the evidence (a
    verdict is taken at every probe)."""
    nets = {p: ipaddress.ip_network(p, strict=False) for p in prefixes}
    lengths = {(n.version, n.prefixlen) for n in nets.values()}
    sums: dict[str, int] = {}
    for network, k in (*t.completed.items(), *t.connected.items()):
        for version, length in lengths:
            key = _within(network, version, length)
            if key is not None:
                sums[key] = sums.get(key, 0) + k
    return {p: sums.get(str(n), 0) for p, n in nets.items()}


@functools.lru_cache(maxsize=1 << 15)
def _within(network: str, version: int, length: int) -> str | None:
    """The /``length`` block of IP ``version`` holding ``network``, if it is that narrow."""
    seen = ipaddress.ip_network(network, strict=False)
    if seen.version != version or seen.prefixlen < length:
        return None
    return str(seen.supernet(new_prefix=length))


def shares(t: Tally, limit: int = 10) -> tuple[tuple[str, int, float, int], ...]:
    """Prefixes by SYNs counted in the accounting set, else sampled from packets, else by
    request sockets; with the handshakes seen completing from each."""
    b = basis(t)
    if b is None or not b.total:
        return ()
    counts, total = b.counts, b.total
    ranked = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:limit]
    done = completed_in(t, [p for p, _ in ranked]) if t.completed or t.connected else {}
    return tuple((p, n, round(n / total, 3), done.get(p, 0)) for p, n in ranked)


def targets(t: Tally, th: Thresholds) -> TargetPlan:
    """What a ban takes and what is rate limited: per address where the sampler saw them (the
    width of a ban needs addresses), else per prefix of the best evidence."""
    b = basis(t)
    if t.sampler_on and (not t.sampled_n or t.sampled_syns * 4 < t.overflow_watched):
        # the queue overflowed with SYNs the sampler never saw (request sockets and the
        # counters count what comes in on lo, the sampler does not): they never crossed an
        # interface from outside, and a local user can forge their sources (IPV6_FREEBIND)
        # while real clients from outside are all the sample holds: never a ban
        return TargetPlan((), (), ("the SYNs came from this host itself (none crossed an "
                                   "interface from outside): nothing to ban",), 0.0)
    if t.sampled_addr:  # the accounting set counts exactly, but per prefix only
        flood, total = t.sampled_addr, t.sampled_syns or sum(t.sampled_addr.values())
    elif b is not None:
        flood, total = b.counts, b.total
    else:
        flood, total = {}, 0
    completing = dict(t.completed)
    for network, n in t.connected.items():
        completing[network] = completing.get(network, 0) + n
    return plan_targets(flood, total, completing, v4_len=th.ipv4_prefix,
                        v6_len=th.ipv6_prefix, widest_v4=th.widest_v4, widest_v6=th.widest_v6,
                        floor=th.ban_floor, coverage=th.ban_coverage)


def suggested_backlog(t: Tally) -> int:
    """A power of two above the backlog, the queue's peak and one second of the overflow."""
    return rules.suggested_backlog(t.backlog, t.peak_syn_recv, t.peak_overflow_rate,
                                   t.peak_accept_queue, t.peak_listen_overflow_rate)


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
    clamp = rules.somaxconn(somaxconn, want)
    if clamp is not None:
        out.append(clamp.sentence)
    return out


def _cookies(t: Tally) -> list[str]:
    found = rules.syncookies(t.sysctls.get("net.ipv4.tcp_syncookies"), t.syns_dropped)
    return [found.sentence] if found else []


def _half_open_facts(t: Tally, where: str) -> list[str]:
    if not t.half_open:
        return []
    held = f"{t.peak_syn_recv} request sockets stayed half-open on {where}"
    if t.backlog:
        held += (f" ({_pct(t.peak_syn_recv / t.backlog)} of its SYN queue, backlog "
                 f"{t.backlog}); the kernel logs nothing and no overflow counter moves until "
                 "the queue is full")
    return [held]


@dataclass(frozen=True, slots=True)
class _Sources:
    """Where the SYNs came from, as far as the best evidence tells: the top prefixes, the share
    of the top ``k`` and its 95% bounds from the sample size."""

    top: tuple[tuple[str, int, float, int], ...]
    k: int
    share: float
    low: float
    high: float
    basis: Basis | None


def _sources(t: Tally, th: Thresholds) -> _Sources:
    top, k, b = shares(t), th.concentrated_prefixes, basis(t)
    share = sum(s for _, _, s, _ in top[:k])
    low, high = wilson(share, b.n) if b else (0.0, 1.0)
    return _Sources(top, k, share, low, high, b)


def _facts(t: Tally, where: str, done: float | None, src: _Sources) -> list[str]:
    """What the kernel's evidence says, in numbers: the incident's evidence lines."""
    facts: list[str] = _half_open_facts(t, where)
    if t.syns_overflowed and t.sysctls.get("net.ipv4.tcp_syncookies") == 2:
        facts.append(f"{t.syns_overflowed} SYN cookies were sent and never came back "
                     f"(peak {t.peak_overflow_rate:.0f}/s; tcp_syncookies=2 answers every SYN "
                     "with a cookie, so no queue fills and the kernel logs nothing)")
    elif t.syns_overflowed:
        facts.append(f"{t.syns_overflowed} SYNs found the SYN queue of {where} full "
                     f"(peak {t.peak_overflow_rate:.0f}/s; backlog {t.backlog}, "
                     f"SYN-RECV peak {t.peak_syn_recv})")
    if t.listen_overflows:
        facts.append(f"the accept queue overflowed {t.listen_overflows} times (peak "
                     f"{t.peak_listen_overflow_rate:.0f}/s; accept queue peak "
                     f"{t.peak_accept_queue} of {t.backlog})")
    if done is not None:
        basis_text = (f"{t.cookies_recv} of {t.cookies_sent} SYN cookies came back"
                      if t.cookies_sent else
                      f"{t.passive_opens} handshakes completed, {t.syns_dropped} SYNs dropped"
                      if t.syns_dropped else
                      f"{t.passive_opens} handshakes completed in the namespace while "
                      f"{max(t.peak_syn_recv, t.sampled_syns)} requests stayed half-open")
        facts.append(f"handshakes completed: {_pct(done)} ({basis_text})")
    if t.conntrack_max and (t.conntrack_filled() or t.conntrack_peak * 2 >= t.conntrack_max):
        facts.append(f"connection tracking: the table held up to {t.conntrack_peak} of "
                     f"{t.conntrack_max} entries ({_pct(t.conntrack_peak / t.conntrack_max)}), "
                     f"{t.conntrack_dropped} new flows dropped")
    b, top, k = src.basis, src.top, src.k
    if top and b:
        facts.append(f"the top {min(k, len(top))} of {b.seen} source prefixes carry "
                     f"{_pct(src.share)} (95% bound {_pct(src.low)}-{_pct(src.high)}; "
                     f"{b.name}: {b.detail}): "
                     + ", ".join(f"{p} ({_pct(s)})" for p, _, s, _ in top[:k]))
        if b.spread > b.seen:
            facts.append(f"about {b.spread} source prefixes in all: {b.seen} seen, most of "
                         "them once, so many more were not sampled (Chao1 estimate)")
    return facts


def _concentrated(t: Tally, th: Thresholds, src: _Sources, n: int,
                  plan: TargetPlan) -> list[str]:
    top, k = src.top, src.k
    few = (f"{top[0][0]} carries" if len(top) == 1 or k == 1
           else f"{min(k, len(top))} prefixes carry")
    head = (f"{few} {_pct(src.share)} of the SYNs (at least {_pct(src.low)} at 95% "
            f"confidence from {n} samples; threshold {_pct(th.concentrated_share)})")
    recs = []
    if plan.ban:
        recs.append(f"{head}: block {', '.join(x.prefix for x in plan.ban)} ([actions.ban] "
                    f"does it with a timeout; together {_pct(plan.covered)} of the SYNs from "
                    "sources that never completed a handshake)")
    if plan.limit:
        they = "it floods and completes" if len(plan.limit) == 1 else "they flood and complete"
        recs.append(f"rate limit {', '.join(x.prefix for x in plan.limit)}: {they} "
                    "handshakes (many users behind one address), so a ban would lock the real "
                    "users out (`ratelimit` in [actions.policy], the default: its SYNs over "
                    "[actions.ratelimit]'s rate are dropped)")
    if not plan.ban and not plan.limit:
        recs.append(f"{head}, but no block holds them without sources that complete "
                    "handshakes: nothing to ban")
    recs += [f"why: {x.why}" for x in (*plan.ban, *plan.limit)]
    recs += [f"not banned: {why}" for why in plan.spared[:5]]
    if t.half_open and not t.syns_overflowed and t.backlog:
        recs.append(f"harmless at this rate so far: {t.peak_syn_recv} request sockets, "
                    f"{_pct(t.peak_syn_recv / t.backlog)} of the queue; with "
                    "tcp_syncookies=1 new clients still get in when it fills")
    return recs


def _spoofed(t: Tally, th: Thresholds, src: _Sources, done: float, where: str) -> list[str]:
    b = src.basis
    assert b is not None
    retries = t.sysctls.get("net.ipv4.tcp_synack_retries")
    recs = [f"the sources are forged: about {b.spread} prefixes (threshold "
            f"{th.spoofed_min_prefixes}; {b.seen} seen in {b.n} samples), the top "
            f"{src.k} carry {_pct(src.share)} (at most {_pct(src.high)} at 95% confidence), "
            f"and {_pct(done)} of the handshakes completed; bans would not help"]
    rate = (f"the flood peaked at {t.peak_overflow_rate:.0f} SYNs/s over the queue"
            if t.syns_overflowed else
            f"{max(t.peak_syn_recv, t.sampled_syns)} SYNs never completed")
    recs.append(f"ask the upstream provider to filter SYNs to {where} (BCP 38, scrubbing): "
                + rate)
    if retries is not None and retries > 2:
        recs.append(f"`sysctl -w net.ipv4.tcp_synack_retries=2` (now {retries}) frees "
                    "request sockets sooner during the flood")
    return recs




def _decide(t: Tally, th: Thresholds, where: str, done: float | None,
            src: _Sources) -> tuple[Verdict, list[str], TargetPlan | None]:
    """The verdict, first rule that holds, with what to do about it."""
    b = src.basis
    accept_overflowed = (t.listen_overflows > 0 and t.backlog is not None
                         and t.peak_accept_queue >= max(t.backlog, 1))
    flooded = t.syns_overflowed > 0 or t.half_open
    if accept_overflowed and t.accept_full_for >= NOT_ACCEPTING_AFTER:
        # a backlog absorbs bursts; a queue full probe after probe for this long is an
        # application that stopped calling accept() (or cannot keep up at all), and a larger
        # backlog would only keep more clients waiting
        return "capacity", [
            f"{where} {NOT_ACCEPTING}: its accept queue has been full "
            f"({t.peak_accept_queue} of {t.backlog}) for {t.accept_full_for:.0f} s, and "
            f"{t.listen_overflows} connections were refused meanwhile: check that its "
            "application is alive and what blocks its accept loop (restart it, add workers); "
            "a larger backlog would not help"], None
    if accept_overflowed:
        return "capacity", [
            f"the application behind {where} does not accept() fast enough (accept queue "
            f"peaked at {t.peak_accept_queue} of {t.backlog}): add workers or find what "
            "blocks its accept loop", *_tuning(t)], None
    if done is not None and t.syns_overflowed and done >= th.capacity_completion:
        return "capacity", [
            f"real clients: {_pct(done)} of the overflowing SYNs completed a handshake "
            f"(threshold {_pct(th.capacity_completion)}); do not block them", *_tuning(t)], None
    if not flooded or not src.top or b is None:
        return "unknown", [
            "not enough kernel-side evidence for a verdict: "
            + ("no SYN overflowed a queue while synwatch watched" if not flooded else
               "no source prefix was sampled (no packet sample, SYN-RECV empty and no "
               "accounting set)"),
            *(_tuning(t) if t.syns_overflowed else [])], None
    if src.low >= th.concentrated_share:
        plan = targets(t, th)
        return "concentrated", _concentrated(t, th, src, b.n, plan), plan
    if (done is not None and done <= th.spoofed_completion
            and src.high < th.concentrated_share and b.spread >= th.spoofed_min_prefixes):
        return "spoofed", _spoofed(t, th, src, done, where), None
    return "unknown", [
        f"neither concentrated (top {src.k} prefixes carry {_pct(src.share)}, at least "
        f"{_pct(src.low)} at 95% confidence from {b.n} samples; threshold "
        f"{_pct(th.concentrated_share)}) nor spread enough to be spoofed (about "
        f"{b.spread} prefixes, threshold {th.spoofed_min_prefixes}"
        + (f"; {_pct(done)} of the handshakes completed" if done is not None else "") + ")"], None


def judge(t: Tally, th: Thresholds) -> Judgement:
    done = completion(t)
    where = endpoint(t.address, t.port)
    src = _sources(t, th)
    verdict, recs, plan = _decide(t, th, where, done, src)
    if t.syns_overflowed or t.sysctls.get("net.ipv4.tcp_syncookies") == 0:
        recs += _cookies(t)
    if t.conntrack_filled():
        recs.append(f"the connection-tracking table filled ({t.conntrack_peak} of "
                    f"{t.conntrack_max} entries, {t.conntrack_dropped} new flows dropped: "
                    "every new connection, real clients' and outgoing ones included): keep "
                    f"the SYNs to {where} out of it (nftables `notrack` and `synproxy`) or raise "
                    "net.netfilter.nf_conntrack_max")
    return Judgement(verdict, tuple(_facts(t, where, done, src)), tuple(recs), src.top, plan)
