"""A password in storage.url is for root only: `check-config` warns, and `run` logs once at its
start, when the file holding it is readable by other users (issue 26)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import synwatch
from tests.harness import NotifySocket, start_service, stop_service

# a server that refuses at once: check-config warns about it, `run` starts on its spool
REFUSED = "postgresql+psycopg://synwatch:s3cret@127.0.0.1:1/synwatch"


def _config(tmp_path: Path, url: str, mode: int) -> Path:
    path = tmp_path / "synwatch.toml"
    path.write_text(f'[storage]\nurl = "{url}"\nstate_dir = "{tmp_path}"\n'
                    f'[sources]\njournald = false\nkmsg = false\nfiles = ["{tmp_path}/kern.log"]\n'
                    "[actions]\ndry_run = true\n")
    path.chmod(mode)
    return path


def _warning(path: Path, mode: str, readers: str) -> str:
    return (f"storage.url: holds a password, and {path} (mode {mode}) is readable by "
            f"{readers}: ")


@pytest.mark.parametrize("url", [REFUSED, "postgresql+psycopg://synwatch@127.0.0.1:1/synwatch"
                                          "?password=s3cret"])
def test_check_config_warns_when_others_can_read_the_password(tmp_path: Path,
                                                               url: str) -> None:
    path = _config(tmp_path, url, 0o644)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0, r.err  # a warning, not a failure
    [line] = [x for x in r.out.splitlines() if "holds a password" in x]
    assert line.startswith("warn  " + _warning(path, "0644", "every user")), line
    fix = "chmod 640" if path.stat().st_gid == 0 else "chmod 600"
    assert f"`{fix} {path}`" in line
    assert "s3cret" not in r.out + r.err


def test_no_warning_for_a_file_only_root_reads_or_a_url_without_a_password(
        tmp_path: Path) -> None:
    path = _config(tmp_path, REFUSED, 0o600)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0 and "holds a password" not in r.out, r.out
    if os.geteuid() == 0:  # what the package installs: 0640 root:root
        os.chown(path, 0, 0)
        path.chmod(0o640)
        r = synwatch("check-config", "--config", str(path))
        assert r.code == 0 and "holds a password" not in r.out, r.out
    no_password = _config(tmp_path, f"sqlite:///{tmp_path}/h.db", 0o644)
    r = synwatch("check-config", "--config", str(no_password))
    assert r.code == 0 and "holds a password" not in r.out, r.out


@pytest.mark.skipif(os.geteuid() != 0, reason="a group other than root's needs chown")
def test_a_group_other_than_roots_is_a_reader_too(tmp_path: Path) -> None:
    path = _config(tmp_path, REFUSED, 0o640)
    os.chown(path, 0, 65534)  # nogroup
    r = synwatch("check-config", "--config", str(path))
    [line] = [x for x in r.out.splitlines() if "holds a password" in x]
    assert "(mode 0640) is readable by group " in line and f"`chmod 600 {path}`" in line


def test_run_logs_the_warning_once_at_its_start(tmp_path: Path) -> None:
    path = _config(tmp_path, REFUSED, 0o644)
    notify = NotifySocket(tmp_path / "notify")
    proc = start_service(path, notify)
    try:
        notify.wait_for("READY=1", timeout=60)
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    assert log.count("holds a password") == 1, log
    assert f"WARNING synwatch: {_warning(path, '0644', 'every user')}" in log, log
    assert "s3cret" not in log
