"""Every `synwatch` command shown in a console block of the README and docs/ runs here, against a
service on a lab namespace that has seen a flood and an accept-queue overflow, and what it prints
has the shape the doc shows: the same kinds of lines, in the same order (numbers, addresses,
times and paths differ from machine to machine; what a line is does not)."""

from __future__ import annotations

import gzip
import random
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import synwatch
from tests.support.doctext import console_examples, in_order
from tests.support.harness import Service
from tests.support.lab import SPOOF_NET, Lab, lab, lab_port
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root

# run by their own lab tests (tests/test_try_lab.py: 20 s of floods), not again here
RUN_ELSEWHERE = {"try"}
# the commands whose examples were taken on the host: run on the lab's namespace instead
ON_THE_LAB = {"snapshot", "doctor"}
# the commands that read the history: the lab service's
WITH_HISTORY = {"status", "incidents", "bans", "unban", "events", "doctor"}
KERN_LOG = ("Mar  7 09:17:14 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on "
            "port 0.0.0.0:80. Sending cookies.  Check SNMP counters.\n")
# files the doc's commands name, as the doc means them
FILES = {"/etc/synwatch/synwatch.toml": '[incident]\nquiet_period = "soon"\n',
         "live.toml": "[actions]\ndry_run = false\n",
         "/var/log/kern.log": KERN_LOG}


@pytest.fixture(scope="module")
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        yield made


def test_every_console_example_runs_and_prints_what_the_doc_shows(
        the_lab: Lab, tmp_path: Path) -> None:
    examples = console_examples()
    assert {e.command.split("synwatch ", 1)[1].split()[0] for e in examples} >= {
        "check-config", "status", "snapshot", "doctor", "replay", "incidents", "bans", "unban",
        "scan", "test-filter", "try"}
    files = {}
    for name, content in FILES.items():
        files[name] = tmp_path / Path(name).name
        files[name].write_text(content)
    with (tmp_path / "kern.log.2.gz").open("wb") as raw, gzip.open(raw, "wt") as gz:
        gz.write(KERN_LOG)
    files["/var/log/kern.log.2.gz"] = tmp_path / "kern.log.2.gz"

    service = Service(the_lab, tmp_path / "svc", dry_run=False)  # a ban to list and lift
    try:
        # a concentrated flood (an incident, its bans) and an application that
        # does not accept (accept-queue overflows for snapshot and doctor)
        port = lab_port()
        the_lab.listen(port, backlog=64)
        sources = [f"{SPOOF_NET}.{n}.{random.randint(1, 254)}" for n in (1, 2)
                   for _ in range(1500)]
        the_lab.flood(port, len(sources), sources)
        [incident] = service.wait_incidents(port, 1, "closed")
        slow = lab_port()
        the_lab.listen(slow, backlog=4)
        the_lab.connect_burst(slow, established=5, attempts=50, hold=0.5)
        eventually(lambda: "watching" in synwatch(
            "status", "--config", str(service.config)).out, "the status file")
        ran = []
        for example in examples:
            argv_text = example.command.split("synwatch ", 1)[1].split(" #")[0]
            argv = shlex.split(argv_text)
            if argv[0] in RUN_ELSEWHERE:
                continue
            argv = [str(files.get(a, a)) for a in argv]
            # a file an example writes (`--plot incident-12.png`) goes to the test's own folder
            argv = [str(tmp_path / a) if a.endswith(".png") and "/" not in a else a
                    for a in argv]
            if argv[0] in ON_THE_LAB:
                argv += ["--netns", the_lab.server_ns]
            if argv[0] in WITH_HISTORY and "--config" not in argv:
                argv += ["--config", str(service.config)]
            if argv[:2] == ["incidents", "show"]:
                argv[2] = str(incident["id"])
            if argv[0] == "doctor" and "--seconds" in argv:  # time, not shape
                argv[argv.index("--seconds") + 1] = "1"
            env = {"PATH": "/nonexistent"} if example.command.startswith("PATH=/nonexistent") \
                else None
            stdin = None
            if example.command.startswith("journalctl "):  # the doc's own pipe
                stdin = subprocess.run(shlex.split(example.command.split(" | ")[0]),
                                       capture_output=True, text=True, check=True,
                                       timeout=60).stdout
            r = synwatch(*argv, env=env, stdin=stdin)
            printed = (r.out + r.err).splitlines()
            if argv[0] == "status":  # the doc's service watched the host, this one the lab
                printed = [x.replace(f"watching {the_lab.server_ns}:", "watching the host:")
                           for x in printed]
            assert r.code == example.code, (example, r)
            assert in_order(example.shown, printed), (
                f"{example.where}: $ {example.command}\n  shows:\n" + "\n".join(example.shown)
                + "\n  prints:\n" + "\n".join(printed))
            ran.append(argv[0])
        assert len(ran) >= 15, ran
    finally:
        service.stop()
