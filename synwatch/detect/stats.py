"""Small statistics for verdicts drawn from samples: share bounds, unseen prefixes, aggregates.

Pure functions, no I/O. A verdict is decided on a confidence bound, not on a point estimate,
so a handful of request sockets can already say "spoofed" when they all come from different
networks, and "unknown" means the sample really cannot tell.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

Z95 = 1.96  # two-sided 95 %


def wilson(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share observed in ``n`` independent samples.

    E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
    JASA 22 (1927); it stays inside [0, 1] and is honest for small n, unlike the normal one.
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, share))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def chao1(distinct: int, singletons: int, doubletons: int) -> int:
    """Distinct prefixes estimated from those seen once and twice (bias-corrected Chao1:
    A. Chao, "Nonparametric estimation of the number of classes in a population", Scand. J.
    Statist. 11 (1984)). Many prefixes seen once mean many more never seen."""
    if singletons <= 0:
        return distinct
    unseen = singletons * (singletons - 1) / (2 * (doubletons + 1))
    return distinct + math.ceil(unseen)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def aggregate(prefixes: Iterable[str], widest_v4: int = 16, widest_v6: int = 48) -> list[str]:
    """Prefixes that together fill a larger block, as that block: four /24s of one /22 are the
    /22. Never wider than ``widest_v4`` / ``widest_v6``; never covers an address outside the
    prefixes given (it only joins blocks that are complete)."""
    nets: dict[int, list[Network]] = {4: [], 6: []}
    for text in prefixes:
        net = ipaddress.ip_network(text, strict=False)
        nets[net.version].append(net)
    out: list[str] = []
    for version, widest in ((4, widest_v4), (6, widest_v6)):
        for block in ipaddress.collapse_addresses(nets[version]):  # type: ignore[type-var]
            if block.prefixlen < widest:
                out.extend(str(b) for b in block.subnets(new_prefix=widest))
            else:
                out.append(str(block))
    return out
