"""Actions end to end: `synwatch run` against real floods in namespaces the tests make, with real
nftables in the namespace, a real SMTP server and HTTP endpoint for notifications.

The issue's "done when": a flood from two /24s plus an allowlisted /24 bans the two (in the
namespace's nftables, with timeouts, in `synwatch bans list`) and not the third; a spread flood
bans nothing; tcp_syncookies goes 0 -> 1 -> 0; one notification per incident opening and one
per closing, not a storm. Also: a restart after a crash restores lost bans and the syncookies
value, and a dead mail server does not delay a ban.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from synwatch.actions.presets import load_presets
from synwatch.actions.ratelimit import ratelimit_context
from synwatch.config import parse_config
from synwatch.system.runner import execute
from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import (
    CLIENT_IP,
    SERVER_IP,
    SPOOF_NET,
    Lab,
    banned_in_nft,
    flood_from,
    lab,
    lab_port,
)
from tests.support.pictures import check_picture
from tests.support.receivers import blackhole, http_receiver, smtp_receiver
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root
ONE, TWO, ALLOWED = (f"{SPOOF_NET}.{n}.0/24" for n in (1, 2, 9))


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        made.sysctl("net.ipv4.tcp_syncookies", 0)  # synwatch turns them on, then back off
        yield made


def syncookies(the_lab: Lab) -> int:
    return int(the_lab.in_server("sysctl", "-n", "net.ipv4.tcp_syncookies").stdout)


def ban_drops(the_lab: Lab) -> int:
    chain = the_lab.in_server("nft", "-j", "list", "chain", "inet", "synwatch", "ban").stdout
    return sum(x["counter"]["packets"] for item in json.loads(chain)["nftables"]
               for x in item.get("rule", {}).get("expr", []) if "counter" in x)


def bans(service: Service) -> list[dict[str, Any]]:
    r = synwatch("bans", "list", "--format", "json", "--config", str(service.config))
    assert r.code == 0, r.err
    found: list[dict[str, Any]] = json.loads(r.out)
    return found


def syncookies_runs(service: Service) -> list[str]:
    """The syncookies outcomes over all the service's incidents (kmsg is read from the start of
    its ring: earlier tests' lines, from other namespaces, must not have opened any here)."""
    r = synwatch("incidents", "list", "--format", "json", "--config", str(service.config))
    return [f"{a['status']} {a['target']}" for i in json.loads(r.out) for a in i["actions"]
            if a["action"] == "syncookies"]


def test_concentrated_flood_bans_two_slash24s_not_the_allowlisted_one(
        the_lab: Lab, tmp_path: Path) -> None:
    with http_receiver() as (http_port, posts), smtp_receiver() as (smtp_port, mails):
        service = Service(the_lab, tmp_path, dry_run=False, extra=textwrap.dedent(f"""
            [allowlist]
            networks = ["{ALLOWED}"]
            [actions.notify]
            enabled = true
            urls = ["json://127.0.0.1:{http_port}/hook",
                    "mailto://127.0.0.1:{smtp_port}?from=synwatch@example.org&to=ops@example.org"]
            [actions.exec]
            enabled = true
            argv = ["/bin/sh", "-c",
                    "env | grep ^SYNWATCH_ > {tmp_path}/$SYNWATCH_INCIDENT_ID-$SYNWATCH_CHANGE"]
            """))
        try:
            port = lab_port()
            the_lab.listen(port, backlog=64)
            flood_from(the_lab, port, [ONE, TWO, ALLOWED], each=1000)
            active = eventually(lambda: [b for b in bans(service) if b["active"]]
                                if len([b for b in bans(service) if b["active"]]) >= 2 else None,
                                "two bans")
            assert syncookies(the_lab) == 1, "cookies are on while the incident is open"
            assert {b["prefix"] for b in active} == {ONE, TWO}
            assert all(b["backend"] == "nftables" for b in active)
            inc_id = active[0]["incident_id"]
            in_kernel = banned_in_nft(the_lab)
            assert set(in_kernel) == {ONE, TWO}, "the allowlisted /24 is never banned"
            assert all(e["timeout"] == 3600 and 3500 < e["expires"] <= 3600
                       for e in in_kernel.values())
            # each element names its incident: `nft list set` says why it is there
            assert {e["comment"] for e in in_kernel.values()} == {f"synwatch incident {inc_id}"}
            # the ban drops the banned /24s' SYNs in the kernel; the allowlisted one still comes
            # in, and finds the queue full: cookies sent while the incident is open (the first
            # flood may be over before they are raised), which its picture shows
            before = ban_drops(the_lab)
            flood_from(the_lab, port, [ONE, TWO, ALLOWED], each=200)
            assert ban_drops(the_lab) - before == 400

            [inc] = service.wait_incidents(port, 1, "closed")
            assert inc["id"] == inc_id and inc["verdict"] == "concentrated"
            # the value before the incident is back (right after the close is stored)
            eventually(lambda: syncookies(the_lab) == 0, "tcp_syncookies back to 0", 5)
            # this listener's only (the receivers are the test's own, but a message is cheap to
            # misaddress)
            def mine(titles: list[str]) -> list[str]:
                return [t for t in titles if f":{port}: " in t]

            eventually(lambda: len(mine([p["title"] for p in posts])) >= 2
                     and len(mine([m["subject"] for m in mails])) >= 2, "the closing messages")
            service.wait_probes(3)  # a storm would show by now
            [inc] = service.incidents(port)  # with every outcome recorded
            did = {(a["action"], a["target"], a["status"]) for a in inc["actions"]}
            assert {("ban", ONE, "done"), ("ban", TWO, "done"),
                    ("ban", ALLOWED, "skipped"), ("notify", "opened", "done"),
                    ("notify", "closed", "done")} <= did
            assert syncookies_runs(service) == ["done net.ipv4.tcp_syncookies"] * 2
            everything = synwatch("incidents", "list", "--format", "json", "--config",
                                  str(service.config)).out
            assert [i["port"] for i in json.loads(everything)] == [port], \
                "earlier tests' kernel lines (other namespaces) opened nothing here"
            titles = mine([p["title"] for p in posts])
            assert len(titles) == 2, titles
            assert titles[0].startswith("synwatch: SYN flood on ") and "concentrated" in titles[0]
            assert titles[1].startswith("synwatch: over on ")
            [opened] = [p for p in posts if p["title"] == titles[0]]
            assert f"ban {ONE}: done (banned for 1h; {ONE}: " in opened["message"]
            assert mine([m["subject"] for m in mails]) == titles
            # each message carries the incident's picture, the closing one the whole of it
            for post in (p for p in posts if p["title"] in titles):
                [png] = post["attachments"]
                assert png["mimetype"] == "image/png", png
                assert base64.b64decode(png["base64"]).startswith(b"\x89PNG\r\n\x1a\n")
            for mail in (m for m in mails if m["subject"] in titles):
                assert [(t, f) for t, f, _ in mail["attachments"]] == [
                    ("image/png", f"synwatch-incident-{inc_id}.png")], mail["attachments"]
            check_picture(service.config, inc_id, "concentrated-banned",
                          series=("syns_full", "syns_all", "syn_recv", "cookies_sent"), bans=2)
            assert {m["to"] for m in mails} == {"ops@example.org"}
            opened = (tmp_path / f"{inc_id}-opened").read_text()
            assert f"SYNWATCH_INCIDENT_ID={inc_id}\n" in opened
            assert f"SYNWATCH_PORT={port}\n" in opened
            closed = (tmp_path / f"{inc_id}-closed").read_text()
            assert "SYNWATCH_VERDICT=concentrated" in closed
        finally:
            service.stop()

    r = synwatch("unban", ONE, "--config", str(service.config))
    assert (r.code, r.out) == (0, f"unbanned {ONE} (nftables, incident {inc_id})\n"), r.err
    assert set(banned_in_nft(the_lab)) == {TWO}
    assert {b["prefix"]: b["active"] for b in bans(service)} == {ONE: False, TWO: True}
    again = synwatch("unban", ONE, "--config", str(service.config))
    assert again.code == 1 and "no active ban covers it" in again.err


def test_a_spread_flood_bans_nothing(the_lab: Lab, tmp_path: Path) -> None:
    service = Service(the_lab, tmp_path, dry_run=False)
    try:
        port = lab_port()
        the_lab.listen(port, backlog=128)
        the_lab.flood(port, 4000)  # random sources all over 10.232.0.0/16
        eventually(lambda: syncookies(the_lab) == 1, "cookies on")
        [inc] = service.wait_incidents(port, 1, "closed")
        assert inc["verdict"] == "spoofed"
        eventually(lambda: syncookies(the_lab) == 0, "tcp_syncookies back to 0", 5)
        assert bans(service) == [] and banned_in_nft(the_lab) == {}
        assert not [a for a in inc["actions"] if a["action"] == "ban"]
    finally:
        service.stop()


def test_a_restart_after_a_crash_restores_lost_bans_and_the_syncookies_value(
        the_lab: Lab, tmp_path: Path) -> None:
    service = Service(the_lab, tmp_path, dry_run=False, quiet="6s")
    port = lab_port()
    the_lab.listen(port, backlog=64)
    flood_from(the_lab, port, [ONE, TWO], each=1500)
    eventually(lambda: len(banned_in_nft(the_lab)) == 2, "two bans")
    assert syncookies(the_lab) == 1
    service.proc.send_signal(signal.SIGKILL)  # a crash: nothing is cleaned up
    service.proc.wait(10)
    the_lab.in_server("nft", "flush", "set", "inet", "synwatch", "bannet4")  # and the bans are lost
    assert banned_in_nft(the_lab) == {}
    time.sleep(1)
    service.start()
    try:
        restored = eventually(lambda: banned_in_nft(the_lab) or None, "the bans back", 10)
        assert set(restored) == {ONE, TWO}
        assert all(e["expires"] < 3600 for e in restored.values()), "only the time left"
        assert syncookies(the_lab) == 1, "the incident is still open after the restart"
        service.wait_incidents(port, 1, "closed")
        # restored from the value kept in the store
        eventually(lambda: syncookies(the_lab) == 0, "tcp_syncookies back to 0", 5)
        service.wait_probes(2)
        assert syncookies_runs(service) == ["done net.ipv4.tcp_syncookies"] * 2
    finally:
        service.stop()


def test_bans_are_back_at_once_after_a_flushed_ruleset_and_a_restart(
        the_lab: Lab, tmp_path: Path) -> None:
    """A reboot or `nft flush ruleset` takes synwatch's table with it. The start puts the bans
    back, not the reconciliation a minute later (the listing of a table that is not there yet
    used to fail, and the next try was 60 s away)."""
    service = Service(the_lab, tmp_path, dry_run=False, quiet="30s")
    port = lab_port()
    the_lab.listen(port, backlog=64)
    flood_from(the_lab, port, [ONE, TWO], each=1500)
    eventually(lambda: len(banned_in_nft(the_lab)) == 2, "two bans")
    service.stop()
    the_lab.in_server("nft", "flush", "ruleset")
    logged = len(service.log.read_text())
    service.start()
    try:
        started = time.monotonic()  # start() returns once the log says "synwatch running"
        restored = eventually(lambda: banned_in_nft(the_lab) or None, "the bans back", 10)
        assert time.monotonic() - started < 1.0, "restored at the start"
        assert set(restored) == {ONE, TWO}
        assert "cannot list" not in service.log.read_text()[logged:]
    finally:
        service.stop()


def test_a_dead_mail_server_does_not_delay_a_ban(the_lab: Lab, tmp_path: Path) -> None:
    """The test ends at the "opened" message's failure: it does not wait for the incident to
    close (a quiet period, then a "closed" message hanging 4 s more on the dead server, which
    the stop would wait for); quiet 30 s keeps the incident open until then."""
    with blackhole() as dead:
        service = Service(the_lab, tmp_path, dry_run=False, quiet="30s",
                          extra=textwrap.dedent(f"""
            [actions.notify]
            enabled = true
            urls = ["mailto://127.0.0.1:{dead}?from=synwatch@example.org&to=ops@example.org"]
            timeout = "4s"
            retry = "1m"
            """))
        try:
            port = lab_port()
            the_lab.listen(port, backlog=64)
            flood_from(the_lab, port, [ONE, TWO], each=1500)

            def runs_with_notify() -> dict[tuple[str, str], Any] | None:
                found = service.incidents(port)
                if not found:
                    return None
                [inc] = found
                runs = {(a["action"], a["target"]): a for a in inc["actions"]}
                return runs if ("notify", "opened") in runs else None

            runs = eventually(runs_with_notify, "the notification's outcome")
            [inc] = service.incidents(port)
            banned = datetime.fromisoformat(runs[("ban", ONE)]["at"])
            detected = datetime.fromisoformat(inc["detected_at"])
            assert (banned - detected).total_seconds() < 2, (detected, banned)
            failed = runs[("notify", "opened")]
            assert failed["status"] == "failed"
            # the message was still hanging on the dead server well after the ban was in
            assert (datetime.fromisoformat(failed["at"]) - banned).total_seconds() > 3
            assert "retrying in 60 s" in service.log.read_text()
        finally:
            service.stop()


def test_messages_a_down_endpoint_missed_are_sent_once_after_a_restart(
        the_lab: Lab, tmp_path: Path) -> None:
    up = threading.Event()
    with http_receiver(up) as (http_port, posts):
        service = Service(the_lab, tmp_path, dry_run=False, extra=textwrap.dedent(f"""
            [actions.notify]
            enabled = true
            urls = ["json://127.0.0.1:{http_port}/hook"]
            retry = "10m"
            """))
        try:
            port = lab_port()
            the_lab.listen(port, backlog=64)
            flood_from(the_lab, port, [ONE, TWO], each=1500)
            [inc] = service.wait_incidents(port, 1, "closed")

            def notify_runs() -> dict[str, dict[str, Any]] | None:
                [inc] = service.incidents(port)
                runs = {a["target"]: a for a in inc["actions"] if a["action"] == "notify"}
                return runs if len(runs) == 2 else None

            failed = eventually(notify_runs, "both messages refused")
            assert {r["status"] for r in failed.values()} == {"failed"}
            assert posts == []
            service.stop()  # their retries are ten minutes away
            up.set()
            service.start()
            eventually(lambda: len(posts) >= 2, "the missed messages")
            service.wait_probes(3)
            assert [p["title"].split(" on ")[0] for p in posts] == [
                "synwatch: SYN flood", "synwatch: over"]
            assert all(f"(incident {inc['id']})" in p["title"] for p in posts)
            [inc] = service.incidents(port)
            assert [(a["target"], a["status"]) for a in inc["actions"]
                    if a["action"] == "notify"] == [
                ("opened", "failed"), ("closed", "failed"), ("opened", "done"),
                ("closed", "done")]
            service.stop()
            service.start()  # nothing left to send
            service.wait_probes(3)
            assert len(posts) == 2
        finally:
            service.stop()


def test_the_rate_limit_holds_a_source_over_the_rate(the_lab: Lab) -> None:
    config = parse_config("[actions.ratelimit]\nenabled = true\nrate = 10\nburst = 5\n"
                          'hold = "1m"\n', "test")
    preset = load_presets()["ratelimit-nftables"]
    for _ in range(2):
        execute(preset.render("setup", ratelimit_context(config)), the_lab.server_ns)
    port = lab_port()
    the_lab.listen(port, backlog=128)
    code = textwrap.dedent(f"""
        import socket
        ok = 0
        for _ in range(30):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect(({SERVER_IP!r}, {port}))
                ok += 1
            except OSError:
                pass
            s.close()
        print(ok)
    """)
    out = subprocess.run(["ip", "netns", "exec", the_lab.client_ns, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert 4 <= int(out) <= 8, out  # the burst of 5 (and a token or two), then held
    held = the_lab.in_server("nft", "list", "set", "inet", "synwatch", "held4").stdout
    assert CLIENT_IP in held
    execute(preset.render("teardown", {}), the_lab.server_ns)
    assert "ratelimit" not in the_lab.in_server("nft", "list", "table", "inet",
                                                "synwatch").stdout
