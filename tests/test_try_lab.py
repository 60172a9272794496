"""`synwatch try`: three floods in throwaway namespaces, judged by the real service with the
admin's own configuration in a dry run; nothing left behind and nothing done outside the lab,
even when the configuration is live and notifies, and even when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.lab import lab_namespaces
from tests.support.receivers import http_receiver
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


def _lab_namespaces() -> list[str]:
    return lab_namespaces(("swtry-",))


def _work_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("synwatch-try-*")}


def _live_config(tmp_path: Path, extra: str = "", http_port: int = 9) -> Path:
    """A live configuration that would notify, run a hook and ban for real, with its history in
    tmp_path: what `try` must not let happen."""
    config = tmp_path / "synwatch.toml"
    config.write_text(textwrap.dedent(f"""
        [storage]
        url = "sqlite:///{tmp_path}/mine.db"
        [actions]
        dry_run = false
        [actions.notify]
        enabled = true
        urls = ["json://127.0.0.1:{http_port}/hook"]
        [actions.exec]
        enabled = true
        argv = ["/bin/sh", "-c", "touch {tmp_path}/hook-ran"]
        """) + extra)
    return config


def _try(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "synwatch", "try", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TZ": "UTC"})


def test_try_judges_three_floods_with_the_configuration_and_changes_nothing(
        tmp_path: Path) -> None:
    dirs = _work_dirs()
    with http_receiver() as (http_port, posts):
        proc = _try("--config", str(_live_config(tmp_path, http_port=http_port)),
                    "--format", "json")
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (out, err)
        floods = json.loads(out)["floods"]
        # the service has stopped: nothing can be sent any more, and nothing was
        assert posts == []
    assert [(f["flood"], [i["verdict"] for i in f["incidents"]]) for f in floods] == [
        ("spoofed", ["spoofed"]), ("concentrated", ["concentrated"]),
        ("real clients", ["capacity"])]
    assert all(f["as_expected"] for f in floods)
    spoofed, concentrated, clients = (f["incidents"][0] for f in floods)
    assert spoofed["trigger"] == concentrated["trigger"] == "log"
    assert clients["trigger"] == "counters"
    bans = {(a["target"], a["status"]) for a in concentrated["actions"] if a["action"] == "ban"}
    assert bans == {("10.232.1.0/24", "dry-run"), ("10.232.2.0/24", "dry-run")}
    assert not any(a["action"] == "ban" for a in spoofed["actions"] + clients["actions"])
    assert any("forged" in r for r in spoofed["recommendations"])
    assert any("accept()" in r for r in clients["recommendations"])
    assert all(a["status"] in ("dry-run", "skipped") for f in floods
               for i in f["incidents"] for a in i["actions"])
    # the configuration's own history, hook and namespaces: untouched; the lab: gone
    assert not (tmp_path / "mine.db").exists()
    assert not (tmp_path / "hook-ran").exists()
    assert _lab_namespaces() == []
    assert _work_dirs() == dirs


def test_try_interrupted_removes_its_lab_and_judges_with_the_configurations_settings(
        tmp_path: Path) -> None:
    """A configuration that calls a flood spoofed only past 65,536 prefixes: the spoofed flood
    is judged otherwise, and `try` says so; Ctrl-C after that judgement leaves nothing."""
    dirs = _work_dirs()
    config = _live_config(tmp_path, "[verdict]\nspoofed_min_prefixes = 65536\n")
    proc = _try("--config", str(config))
    assert proc.stdout is not None
    seen = []
    def judged_one() -> bool:
        assert proc.stdout is not None
        seen.append(proc.stdout.readline())  # blocks until a line: no sleep needed
        return any(line.startswith("   judged ") for line in seen)

    eventually(judged_one, "first judgement", 90, every=0, alive=proc, seen=lambda: seen)
    assert _lab_namespaces(), "the lab is there while it runs"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen, out, err)
    judged = next(line for line in seen if line.startswith("   judged "))
    assert "NOT as expected (spoofed)" in judged, judged
    assert seen[0].startswith("synwatch try: 3 short floods") and str(config) in seen[0]
    assert _lab_namespaces() == []
    assert _work_dirs() == dirs
    assert not (tmp_path / "mine.db").exists()


def test_try_needs_root_and_says_so(tmp_path: Path) -> None:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "synwatch", "try", "--config",
                        str(_live_config(tmp_path))],
                       capture_output=True, text=True, timeout=30, check=False,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 1
    assert "needs root" in r.stderr and "CAP_NET_ADMIN" in r.stderr, r.stderr
    assert _lab_namespaces() == []
