"""Which networks a ban takes: the flood's own sources at the narrowest width that holds them,
never a source that completes handshakes.

Pure: it reads SYNs per source (addresses from the packet sampler, or prefixes where only
prefixes are known) and the networks seen completing handshakes (ACKs without SYN from the
sampler), and returns blocks with the numbers that chose each width. The rules:

- a source that completes handshakes is never inside a block; a source that completes and also
  carries a real share of the flood (one NAT address for many users) is rate limited instead;
- within each ban prefix (/24, /64 by default) the flood's addresses are held by their narrowest
  common block; where that block would hold a completing source it is split, down to /32 (/128);
- whole prefixes that together fill a wider block (four /24s of a /22) are that block, up to
  ``widest_v4``/``widest_v6``, unless it holds a completing source;
- a block must carry ``floor`` of the flood on its own (never a target for being among the top
  k), and the busiest blocks are taken until they hold ``coverage`` of the flood's
  non-completing SYNs.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from synwatch.config.types import Network
from synwatch.detect.stats import aggregate
from synwatch.records import BanTarget as Target

MAX_UNITS = 1024  # flooding sources weighed per verdict (the busiest), to bound its work
NETS_CACHED = 8192  # parsed networks kept: a flood's busiest sources and its completing ones


@dataclass(frozen=True, slots=True)
class TargetPlan:
    ban: tuple[Target, ...]
    limit: tuple[Target, ...]  # addresses that flood and complete handshakes: rate limit
    spared: tuple[str, ...]  # what was not banned and why, in words
    covered: float  # share of the flood's non-completing SYNs the bans hold


@functools.lru_cache(maxsize=NETS_CACHED)
def _net(text: str) -> Network:
    """Parsed once: a verdict is taken at every probe of an open incident over the same
    sources (parsing them again was half of the service's CPU at 250k SYN/s)."""
    return ipaddress.ip_network(text, strict=False)


@functools.lru_cache(maxsize=NETS_CACHED)
def _supernet(net: Network, length: int) -> Network:
    """``net``'s block of prefix length ``length`` (at most its own), computed once."""
    return net.supernet(new_prefix=length)


def _common(nets: list[Network]) -> Network:
    """The narrowest block holding every network given (all of one family)."""
    bits = nets[0].max_prefixlen
    lo = min(int(n.network_address) for n in nets)
    hi = max(int(n.broadcast_address) for n in nets)
    length = min(bits - (lo ^ hi).bit_length(), *(n.prefixlen for n in nets))
    return type(nets[0])((lo >> (bits - length) << (bits - length), length))


class _Completing:
    """The networks seen completing handshakes, indexed by their /24 (/64), and the wider ones
    by prefix length: a verdict is taken at every probe, over up to MAX_UNITS flooding
    addresses and thousands of completing ones."""

    def __init__(self, nets: Iterable[tuple[Network, int]], v4_len: int, v6_len: int) -> None:
        self.lengths = {4: v4_len, 6: v6_len}
        self.buckets: dict[Network, list[tuple[Network, int]]] = {}
        # per bucket, sorted by start: (starts, ends, nets), and its widest entry's size, so an
        # overlap test is a bisection, not a scan (a split walks a bucket once per level)
        self.ranges: dict[Network, tuple[list[int], list[int], list[tuple[Network, int]],
                                         int]] = {}
        self.wide: dict[tuple[int, int], dict[Network, int]] = {}  # (version, length) -> nets
        for net, k in nets:
            length = self.lengths[net.version]
            if net.prefixlen < length:
                by = self.wide.setdefault((net.version, net.prefixlen), {})
                by[net] = by.get(net, 0) + k
            else:
                self.buckets.setdefault(_supernet(net, length), []).append((net, k))
        for key, entries in self.buckets.items():
            entries.sort(key=lambda e: int(e[0].network_address))
            starts = [int(n.network_address) for n, _ in entries]
            ends = [int(n.broadcast_address) for n, _ in entries]
            self.ranges[key] = (starts, ends, entries,
                                max(e - b for b, e in zip(starts, ends, strict=True)))

    def inside(self, block: Network) -> list[tuple[Network, int]]:
        """The completing networks that overlap ``block``."""
        length = self.lengths[block.version]
        found: list[tuple[Network, int]] = []
        for (version, wide_len), nets in self.wide.items():
            if version != block.version:
                continue
            if wide_len <= block.prefixlen:  # one candidate: the block's own supernet
                key = _supernet(block, wide_len)
                if key in nets:
                    found.append((key, nets[key]))
            else:  # wider than the block's length but inside it
                found += [(n, k) for n, k in nets.items()
                          if n.subnet_of(block)]  # type: ignore[arg-type]
        if block.prefixlen >= length:
            keys: Iterable[Network] = (_supernet(block, length),)
        elif len(self.buckets) >= 1 << (length - block.prefixlen):
            keys = block.subnets(new_prefix=length)
        else:
            keys = [key for key in self.buckets if key.version == block.version
                    and key.subnet_of(block)]  # type: ignore[arg-type]
        lo, hi = int(block.network_address), int(block.broadcast_address)
        for key in keys:
            got = self.ranges.get(key)
            if got is None:
                continue
            starts, ends, entries, widest = got
            for i in range(bisect.bisect_left(starts, lo - widest),
                           bisect.bisect_right(starts, hi)):
                if ends[i] >= lo:
                    found.append(entries[i])
        return found


def _split(units: list[tuple[Network, int]], completing: _Completing) -> list[
        tuple[Network, list[tuple[Network, int]]]]:
    """The widest blocks, each the narrowest common block of the units it holds, that hold no
    completing source: the common block of all of them, else each half's, recursively."""
    block = _common([n for n, _ in units])
    if not completing.inside(block) or len(units) == 1:
        return [(block, units)]
    bit = block.max_prefixlen - block.prefixlen - 1
    low = [u for u in units if not (int(u[0].network_address) >> bit) & 1]
    high = [u for u in units if (int(u[0].network_address) >> bit) & 1]
    if not low or not high:  # a unit wider than the split: cannot separate
        return [(block, units)]
    return _split(low, completing) + _split(high, completing)


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def plan_targets(flood: Mapping[str, int], total: int, completed: Mapping[str, int], *,
                 v4_len: int, v6_len: int, widest_v4: int, widest_v6: int, floor: float,
                 coverage: float) -> TargetPlan:
    """``flood``: SYNs per source (an address, or a prefix where no address is known);
    ``total``: all the SYNs the evidence counted (the shares' denominator); ``completed``:
    networks seen completing handshakes, with how often."""
    completing = _Completing(((_net(n), k) for n, k in completed.items() if k > 0),
                             v4_len, v6_len)
    if len(flood) > MAX_UNITS:  # the busiest: a block below the floor is never banned anyway
        flood = dict(sorted(flood.items(), key=lambda x: -x[1])[:MAX_UNITS])
    mixed: list[Target] = []
    spared: list[str] = []
    by_prefix: dict[Network, list[tuple[Network, int]]] = {}
    for text, syns in flood.items():
        net = _net(text)
        if syns <= 0:
            continue
        done = completing.inside(net)
        if done and net.prefixlen == net.max_prefixlen:
            n = sum(k for _, k in done)
            if total and syns / total >= floor:
                mixed.append(Target(str(net), syns, round(syns / total, 3), (str(net),),
                                    f"{net}: {_pct(syns / total)} of the SYNs, and it also "
                                    f"completed handshakes ({n} ACKs and connections seen): "
                                    "one address for flood and real users (NAT), so rate "
                                    "limited, not banned"))
            continue
        length = v4_len if net.version == 4 else v6_len
        key = _supernet(net, length) if net.prefixlen > length else net
        by_prefix.setdefault(key, []).append((net, syns))
    blocks: list[tuple[Network, list[tuple[Network, int]], Network]] = []
    for prefix, units in by_prefix.items():
        for block, held in _split(units, completing):
            if completing.inside(block):  # one unit that is itself a completing prefix
                spared.append(f"{block}: sources there complete handshakes; not banned")
                continue
            blocks.append((block, held, prefix))
    # whole ban prefixes that fill a wider block are that block, if nothing in it completes
    whole = [b for b, _, p in blocks if b == p]
    merged = {_net(m) for m in aggregate([str(b) for b in whole], widest_v4, widest_v6)}
    joined: dict[Network, list[tuple[Network, list[tuple[Network, int]], Network]]] = {}
    merged_lengths = sorted({(m.version, m.prefixlen) for m in merged})
    for entry in blocks:
        block = entry[0]
        wider = next((m for version, length in merged_lengths
                      if version == block.version and length < block.prefixlen
                      and (m := _supernet(block, length)) in merged), None)
        if wider is not None and not completing.inside(wider):
            joined.setdefault(wider, []).append(entry)
        else:
            joined.setdefault(block, []).append(entry)
    flood_total = sum(s for units in by_prefix.values() for _, s in units) or 1
    candidates: list[Target] = []
    for block, entries in joined.items():
        units = [u for _, held, _ in entries for u in held]
        syns = sum(s for _, s in units)
        share = syns / total if total else 0.0
        addresses = sum(1 for n, _ in units if n.prefixlen == n.max_prefixlen)
        parts = tuple(str(b) for b, _, _ in entries)
        if len(entries) > 1:
            why = (f"{block}: {len(entries)} flooding /{entries[0][2].prefixlen}s fill it, "
                   f"{_pct(share)} of the SYNs, no handshake completed")
        else:
            _, _, prefix = entries[0]
            what = (_count(addresses, "address", "addresses") if addresses == len(units)
                    else "counted per prefix (no addresses in the evidence)")
            why = f"{block}: {what}, {_pct(share)} of the SYNs, no handshake completed"
            done = completing.inside(prefix)
            if done and block != prefix:
                why += (f"; the rest of {prefix} completed {sum(k for _, k in done)} "
                        "(ACKs and connections seen): not banned")
        candidates.append(Target(str(block), syns, round(share, 3), parts, why))
    candidates.sort(key=lambda t: (-t.syns, t.prefix))
    ban: list[Target] = []
    held_syns = 0
    for t in candidates:
        if held_syns / flood_total >= coverage:
            spared.append(f"{t.prefix}: {_pct(t.share)} of the SYNs; the bans before it "
                          f"already hold {_pct(held_syns / flood_total)} of the flood")
        elif t.share < floor:
            spared.append(f"{t.prefix}: {_pct(t.share)} of the SYNs, under the "
                          f"{_pct(floor)} a ban needs on its own")
        else:
            ban.append(t)
            held_syns += t.syns
    return TargetPlan(tuple(ban), tuple(mixed), tuple(spared), held_syns / flood_total)
