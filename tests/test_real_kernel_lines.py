"""The catalogue against the running kernel: a real SYN flood in a lab namespace makes the
kernel print its line; synwatch must recognise it, trusted, with the listener's port."""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from synwatch.lines.match import match_record
from synwatch.lines.sinks import parse_line
from tests.support.cli import synwatch
from tests.support.lab import Kmsg, lab, lab_port

pytestmark = pytest.mark.needs_root


def _is_flood_line(port: int) -> object:
    return lambda rec: "SYN flooding on port" in rec and f":{port}." in rec


def test_real_syn_flood_line_is_matched_and_trusted(catalogue: object, tmp_path: Path) -> None:
    kmsg = Kmsg()
    try:
        with lab() as the_lab:
            port = lab_port()
            the_lab.listen(port, backlog=8)
            the_lab.flood(port, 300)
            records = kmsg.records_until(_is_flood_line(port), timeout=15)
    finally:
        kmsg.close()
    flood = [r for r in records if _is_flood_line(port)(r)]
    assert flood, f"the kernel printed no SYN-flood line; saw {records[-5:]}"
    record = parse_line(flood[0], catalogue, datetime.now(timezone.utc), timezone.utc)  # type: ignore[arg-type]
    assert record is not None and record.sink == "kmsg" and record.trusted
    event = match_record(record, catalogue)  # type: ignore[arg-type]
    assert event is not None
    assert (event.kind, event.port, event.family, event.mode) == ("syn_flood", port, 4, "cookies")
    # 6.2+ prints the listener's address; older kernels do not
    if event.pattern == "form-f":
        assert event.address == "0.0.0.0"
    # the same record through the CLI, as a saved kmsg dump
    dump = tmp_path / "kmsg.txt"
    dump.write_text("\n".join(records) + "\n")
    hits = [json.loads(x) for x in synwatch("scan", "--format", "json", str(dump)).out.split("\n")
            if x]
    assert [(h["port"], h["trusted"]) for h in hits] == [(port, True)]


def test_root_writing_to_dev_kmsg_is_not_a_kernel_line(catalogue: object) -> None:
    marker = random.randint(1, 65535)
    text = (f"TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:{marker}. "
            "Sending cookies.")
    kmsg = Kmsg()
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY)
        try:
            os.write(fd, f"<6>{text}\n".encode())  # asks for kern.info; the kernel makes it user
        finally:
            os.close(fd)
        records = kmsg.records_until(lambda r: text in r, timeout=5)
    finally:
        kmsg.close()
    forged = [r for r in records if text in r]
    assert forged, "our own write did not come back from /dev/kmsg"
    prefix = int(forged[0].split(",", 1)[0])
    assert prefix >> 3 == 1, "the kernel should force facility user on /dev/kmsg writes"
    assert parse_line(forged[0], catalogue, datetime.now(timezone.utc), timezone.utc) is None  # type: ignore[arg-type]
