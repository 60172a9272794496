"""Every ban right, on the real kernel: real clients beside a flood, inside the flood's own
network, a one-address flood with real neighbours, their IPv6 equivalents, and one address that
both floods and completes handshakes (many users behind one NAT address).

The flood's sources are forged and routed through the client namespace (docs/kernel.md §11.1);
the real clients are addresses of the same ranges given to the client namespace's veth, so they
complete real handshakes from inside the flood's networks. In each case the ban takes the
flood's sources at the width that holds them and nothing else: its rule drops the flood's SYNs,
and the real clients' connections still succeed."""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import (
    CLIENT_IP6,
    SERVER_IP6,
    SPOOF_NET,
    SPOOF_NET6,
    Lab,
    client_outcomes,
    lab,
    lab_port,
    sh,
)
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        yield made


@dataclass(frozen=True)
class Case:
    name: str
    flood: list[str]  # forged source addresses, cycled
    clients: list[str]  # real clients' addresses (given to the client namespace)
    banned: set[str]  # exactly these, and nothing else


def _v4(third: int, hosts: range) -> list[str]:
    return [f"{SPOOF_NET}.{third}.{h}" for h in hosts]


def _v6(group: int, hosts: range) -> list[str]:
    return [f"{SPOOF_NET6}:{group:x}::{h:x}" for h in hosts]


CASES = [
    # another /24 floods while 20 real clients of their own /24 are served
    Case("beside", _v4(7, range(1, 255)), _v4(30, range(1, 21)), {f"{SPOOF_NET}.7.0/24"}),
    # a few addresses of a /24 whose other addresses are real clients (a hosting provider)
    Case("inside", _v4(9, range(1, 7)), _v4(9, range(100, 120)), {f"{SPOOF_NET}.9.0/29"}),
    # one address, with real neighbours in its /24
    Case("one-address", _v4(5, range(5, 6)), _v4(5, range(40, 50)), {f"{SPOOF_NET}.5.5/32"}),
    # IPv6: a few addresses of a /64 with real clients in it, and one address
    Case("inside-v6", _v6(9, range(1, 7)), _v6(9, range(0x100, 0x110)), {f"{SPOOF_NET6}:9::/125"}),
    Case("one-address-v6", _v6(5, range(5, 6)), _v6(5, range(0x40, 0x48)),
         {f"{SPOOF_NET6}:5::5/128"}),
]


def active_bans(service: Service) -> list[dict[str, Any]]:
    r = synwatch("bans", "list", "--format", "json", "--config", str(service.config))
    assert r.code == 0, r.err
    return [b for b in json.loads(r.out) if b["active"]]


def ban_drops(the_lab: Lab) -> int:
    chain = the_lab.in_server("nft", "-j", "list", "chain", "inet", "synwatch", "ban").stdout
    return sum(x["counter"]["packets"] for item in json.loads(chain)["nftables"]
               for x in item.get("rule", {}).get("expr", []) if "counter" in x)


def in_nft(the_lab: Lab, family: int) -> set[str]:
    listed = the_lab.in_server("nft", "-j", "list", "set", "inet", "synwatch",
                               f"bannet{family}").stdout
    found = set()
    for item in json.loads(listed)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            val = e["elem"]["val"]
            found.add(f"{val['prefix']['addr']}/{val['prefix']['len']}" if isinstance(val, dict)
                      else f"{val}/{32 if family == 4 else 128}")
    return found


def outcomes_until(clients: subprocess.Popen[str],
                   enough: Callable[[list[tuple[float, bool]]], bool]) -> list[tuple[float, bool]]:
    """What ``Lab.real_clients`` saw, (start time, connected) per attempt, read as the attempts
    end until ``enough`` of them are in (or the clients' run is over); then the clients stop."""
    seen: list[tuple[float, bool]] = []
    assert clients.stdout is not None
    for line in clients.stdout:
        started, outcome = line.split()[:2]
        seen.append((float(started), outcome == "ok"))
        if enough(seen):
            break
    clients.kill()
    clients.wait()
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_ban_takes_the_flood_and_spares_the_real_clients(the_lab: Lab, tmp_path: Path,
                                                           case: Case) -> None:
    """The real clients run until 40 of their attempts (two seconds of them) came after the
    ban, not for a fixed 7 s: what is asserted about them is those attempts. "Nothing else
    later" is asserted after three whole rounds of the service with the ban in place."""
    v6 = ":" in case.flood[0]
    port = lab_port()
    the_lab.serve(port, 16, "::" if v6 else "0.0.0.0")
    service = Service(the_lab, tmp_path, dry_run=False, quiet="5s")
    try:
        clients = the_lab.real_clients(port, case.clients, seconds=30)  # stopped sooner
        sources = [random.choice(case.flood) for _ in range(8_000)]
        the_lab.start_flood(port, len(sources), sources, rate=1000)
        bans = eventually(lambda: active_bans(service), "a ban", timeout=30)
        banned_at = time.time()
        assert {b["prefix"] for b in bans} == case.banned, service.log.read_text()
        assert in_nft(the_lab, 6 if v6 else 4) == case.banned
        # the ban's rule drops the flood's SYNs from then on
        before = ban_drops(the_lab)
        eventually(lambda: ban_drops(the_lab) > before + 100, "the ban rule to drop the flood",
                 timeout=30)
        service.wait_probes(3)  # a later ban (the clients' own prefix...) had its chance
        results = outcomes_until(clients, lambda seen: sum(at > banned_at
                                                           for at, _ in seen) >= 40)
        after = [ok for at, ok in results if at > banned_at]
        assert len(after) >= 20, results
        assert sum(after) / len(after) >= 0.95, (after, service.log.read_text())
        # `incidents show` says why each width was chosen, in numbers
        inc_id = bans[0]["incident_id"]
        shown = synwatch("incidents", "show", str(inc_id), "--config", str(service.config)).out
        for p in case.banned:
            assert f"{p}: banned for 1h; {p}: " in shown and "no handshake completed" in shown, \
                shown
        # the clients' own prefix is seen completing handshakes
        home = str(ipaddress.ip_network(f"{case.clients[0]}/{64 if v6 else 24}", strict=False))
        inc = json.loads(synwatch("incidents", "show", str(inc_id), "--format", "json",
                                  "--config", str(service.config)).out)
        completed = {p["prefix"]: p["completed"] for p in inc["top_prefixes"]}
        assert completed.get(home, 0) > 0, inc["top_prefixes"]
        assert {b["prefix"] for b in active_bans(service)} == case.banned, "nothing else later"
    finally:
        service.stop()


def limit_drops(the_lab: Lab) -> int:
    chain = the_lab.in_server("nft", "-j", "list", "chain", "inet", "synwatch", "srclimit").stdout
    return sum(x["counter"]["packets"] for item in json.loads(chain)["nftables"]
               for x in item.get("rule", {}).get("expr", []) if "counter" in x)


def limited(the_lab: Lab) -> dict[str, int]:
    """Addresses in the per-source rate limit set -> their timeout."""
    listed = sh("ip", "netns", "exec", the_lab.server_ns, "nft", "-j", "list", "set", "inet",
                "synwatch", "limited4", check=False)
    if listed.returncode:
        return {}
    return {e["elem"]["val"]: e["elem"]["timeout"] for item in json.loads(listed.stdout)["nftables"]
            for e in item.get("set", {}).get("elem", [])}


def test_one_address_that_floods_and_completes_is_rate_limited_not_banned(
        the_lab: Lab, tmp_path: Path) -> None:
    """Many users behind one NAT address: it floods and completes handshakes, so a ban would
    lock the real users out. It is rate limited instead (the default policy for a
    concentrated flood), in the kernel, and nothing is banned."""
    port = lab_port()
    the_lab.serve(port, 16)
    nat = f"{SPOOF_NET}.11.7"
    # a NAT box drops SYN-ACKs it has no mapping for: the flood's requests stay half-open
    # (without this the client namespace would answer them with RSTs)
    for rule in (("add", "table", "inet", "labnat"),
                 ("add", "chain", "inet", "labnat", "out",
                  "{ type filter hook output priority 0; }"),
                 ("add", "rule", "inet", "labnat", "out", "tcp", "flags", "rst", "drop")):
        the_lab.in_client("nft", *rule)
    # a limit lasts a ban's duration, here 4 s, and is renewed at half of it while the flood
    # goes on (12 s): its kernel timeout never ends it under the flood
    service = Service(the_lab, tmp_path, dry_run=False, quiet="5s",
                      extra='[actions.ban]\nduration = "4s"\n')
    try:
        clients = the_lab.real_clients(port, [nat], seconds=5)
        # the NAT's users are connected before the flood comes, as in the case this models
        # (on a loaded machine the flood could otherwise open the incident first, when the
        # address has completed nothing yet: then it is a flood's alone, and banned)
        assert clients.stdout is not None
        first = clients.stdout.readline().split()
        assert first[1:2] == ["ok"], first
        the_lab.start_flood(port, 12_000, [nat] * 12_000, rate=1000)
        held = eventually(lambda: limited(the_lab), "the rate limit", timeout=30)
        assert held == {nat: 4}, held
        eventually(lambda: limit_drops(the_lab) > 100, "the rate limit to drop the flood",
                 timeout=30)

        def renewals() -> int:
            [inc] = service.incidents(port)
            return sum(1 for a in inc["actions"]
                       if (a["action"], a["target"], a["status"]) == ("ratelimit", f"{nat}/32",
                                                                      "done"))
        eventually(lambda: renewals() >= 2, "the limit renewed", timeout=15)
        assert nat in limited(the_lab)
        client_outcomes(clients)
        service.wait_probes()
        assert active_bans(service) == [], "a NAT address that completes is never banned"
        assert not any(a["action"] == "ban" and a["status"] == "done"
                       for i in service.incidents(port) for a in i["actions"])
    finally:
        service.stop()


def test_a_restart_between_a_flood_and_its_verdict_keeps_the_incident_and_its_evidence(
        the_lab: Lab, tmp_path: Path) -> None:
    """synwatch stopped as soon as a flood's incident opened, and the flood (now from another
    /24, which the first ban does not drop) went on while it was down and after it started
    again: the incident is still the same one, the SYNs that overflowed while it was down are
    its evidence (the counters of its last probe were saved with it), and it goes on to the
    new /24's ban.

    The quiet period (15 s) only has to outlast the downtime: the test ends at the new /24's
    ban, not at the close a quiet period later (every change of the incident, its evidence
    included, is stored as it happens, so what is asserted is already there)."""
    port = lab_port()
    the_lab.listen(port, backlog=16)
    first, second = f"{SPOOF_NET}.23", f"{SPOOF_NET}.24"
    service = Service(the_lab, tmp_path, dry_run=False, quiet="15s")

    def banned_second() -> list[dict[str, Any]]:
        return [i for i in service.incidents(port) if any(
            (a["action"], a["target"], a["status"]) == ("ban", f"{second}.0/24", "done")
            for a in i["actions"])]

    try:
        the_lab.start_flood(port, 2000, [f"{first}.{random.randint(1, 254)}"
                                         for _ in range(2000)], rate=1000)
        [opened] = eventually(lambda: service.incidents(port), "the incident", timeout=20)
        service.stop()
        down = the_lab.start_flood(port, 3000, [f"{second}.{random.randint(1, 254)}"
                                                for _ in range(3000)], rate=1500)
        assert down.wait(timeout=60) == 0  # all of it while synwatch is down
        service.start()
        service.wait_log("still open from before the restart")
        # and a little more after the restart, which the sampler sees
        the_lab.start_flood(port, 3000, [f"{second}.{random.randint(1, 254)}"
                                         for _ in range(3000)], rate=1000)
        eventually(banned_second, "the new /24's ban", timeout=60)
    finally:
        service.stop()
    # read after the stop: nothing can change it any more
    [inc] = service.incidents(port)
    assert inc["id"] == opened["id"], "the same incident, not a new one"
    assert inc["verdict"] == "concentrated", inc
    bans = {a["target"] for a in inc["actions"] if a["action"] == "ban" and a["status"] == "done"}
    assert f"{second}.0/24" in bans, inc["actions"]
    shown = json.loads(synwatch("incidents", "show", str(inc["id"]), "--format", "json",
                                "--evidence", "--config", str(service.config)).out)
    [overflowed] = [r for r in shown["evidence"] if "SYNs found the SYN queue" in r]
    assert int(overflowed.split()[0]) >= 2900, "the SYNs of the downtime are its evidence"


def test_a_local_user_cannot_aim_a_ban_with_forged_local_sources(the_lab: Lab,
                                                                  tmp_path: Path) -> None:
    """Any user of the server can bind sources of a remote /64 with IPV6_FREEBIND and connect
    to a local listener: kernel-side evidence, but forged from inside the host. It never
    crossed an interface from outside (the sampler skips lo), so nothing is banned or rate
    limited, while a flood from outside still is."""
    port = lab_port()
    the_lab.listen(port, backlog=16, address="::")
    service = Service(the_lab, tmp_path, dry_run=False, quiet="3s")
    try:
        forger = textwrap.dedent(f"""
            import random, socket
            held = []
            for i in range(3000):
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
                s.bind((f"fd98:77::{{random.randint(1, 65535):x}}", 0))
                s.setblocking(False)
                s.connect_ex(("{SERVER_IP6}", {port}))
                held.append(s)
        """)
        # the SYN-ACKs to the forged sources leave by the route to them (a default route on a
        # real server), and nothing answers: the requests stay half-open, as a flood's do
        the_lab.in_server("ip", "-6", "route", "add", "fd98:77::/64", "via", CLIENT_IP6)
        the_lab.in_server(sys.executable, "-c", forger)
        [inc] = eventually(lambda: [
            i for i in service.incidents(port) if i["status"] == "closed"], "its incident",
            timeout=40)
        service.wait_probes()
        assert active_bans(service) == [], inc
        assert not any(a["action"] in ("ban", "ratelimit") and a["status"] == "done"
                       for a in inc["actions"]), inc["actions"]
    finally:
        service.stop()
