"""SYN accounting: nftables sets in synwatch's own table that count SYNs per source prefix and
listener port, with per-element counters and kernel-side timeouts.

Under SYN cookies the socket table keeps only the first ``backlog`` sources of a flood; the
set sees every SYN, so sources are attributed for as long as the flood lasts. The rules are
rendered as an `nft -f -` batch (idempotent: `add` everywhere and a flushed chain), so the
render is what the tests check and what dry-run would log.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from synwatch.errors import CommandError, ProbeError
from synwatch.system.runner import run

TABLE = "synwatch"
CHAIN = "account"
SETS = {4: "syn4", 6: "syn6"}
ELEMENT_TIMEOUT = "2m"  # refreshed by every SYN; a quiet prefix leaves after two minutes
MAX_ELEMENTS = 8192  # a bounded set: a flood from everywhere cannot grow it further, and
# reading it stays cheap (65,536 IPv6 elements took 110 MiB and 8 s of JSON at every probe)


def mask(family: int, length: int) -> str:
    bits = 32 if family == 4 else 128
    value = ((1 << length) - 1) << (bits - length)
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


@dataclass(frozen=True, slots=True)
class SynAccounting:
    netns: str = ""
    v4_len: int = 24
    v6_len: int = 64

    def render_setup(self) -> str:
        t = f"inet {TABLE}"
        lines = [f"add table {t}"]
        for family, name in SETS.items():
            kind = "ipv4_addr" if family == 4 else "ipv6_addr"
            lines.append(f"add set {t} {name} {{ type {kind} . inet_service; flags dynamic, "
                         f"timeout; timeout {ELEMENT_TIMEOUT}; size {MAX_ELEMENTS}; counter; }}")
        lines += [
            f"add chain {t} {CHAIN} {{ type filter hook prerouting priority -290; "
            "policy accept; }",
            f"flush chain {t} {CHAIN}",
            f"add rule {t} {CHAIN} tcp flags & (syn | ack) == syn update @{SETS[4]} "
            f"{{ ip saddr and {mask(4, self.v4_len)} . tcp dport }}",
            f"add rule {t} {CHAIN} tcp flags & (syn | ack) == syn update @{SETS[6]} "
            f"{{ ip6 saddr and {mask(6, self.v6_len)} . tcp dport }}",
        ]
        return "\n".join(lines) + "\n"

    def render_teardown(self) -> str:
        t = f"inet {TABLE}"
        return (f"delete chain {t} {CHAIN}\n"
                + "".join(f"delete set {t} {name}\n" for name in SETS.values()))

    def setup(self) -> None:
        run(["nft", "-f", "-"], stdin=self.render_setup(), netns=self.netns)

    def teardown(self) -> None:
        """Remove the chain and sets (the table stays: bans live in it)."""
        try:
            run(["nft", "-f", "-"], stdin=self.render_teardown(), netns=self.netns)
        except CommandError as exc:
            if "No such file or directory" not in exc.why:
                raise

    def read(self) -> dict[tuple[int, str], int]:
        """SYNs counted per (port, source prefix) since each element appeared."""
        out: dict[tuple[int, str], int] = {}
        for family, name in SETS.items():
            length = self.v4_len if family == 4 else self.v6_len
            try:
                text = run(["nft", "-j", "list", "set", "inet", TABLE, name], netns=self.netns)
            except CommandError as exc:
                raise ProbeError("SYN accounting", exc.why) from exc
            out.update(parse_set(text, length))
        return out


def parse_set(text: str, length: int) -> dict[tuple[int, str], int]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ProbeError("SYN accounting", f"nft printed no JSON: {exc}") from exc
    out: dict[tuple[int, str], int] = {}
    for item in doc.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            e = elem.get("elem", elem)
            val = e.get("val", {})
            if not isinstance(val, dict) or "concat" not in val:
                continue
            addr, port = val["concat"]
            packets = int(e.get("counter", {}).get("packets", 0))
            try:
                prefix = str(ipaddress.ip_network(f"{addr}/{length}", strict=False))
            except ValueError:
                continue
            out[(int(port), prefix)] = packets
    return out
