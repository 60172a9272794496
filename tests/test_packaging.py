"""The wheel carries its data (filters, default config, migrations) and installs without the
journald extra; the systemd unit matches what `synwatch run` speaks."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO, cli_commands


def test_wheel_ships_the_data_and_runs_without_the_journald_extra(tmp_path: Path) -> None:
    """The venv is made without pip and the wheel installed into it by the test's own pip
    (`pip --python`), without byte-compiling: ensurepip and compileall took seconds and are
    not what is tested (pip's compileall never fails an install). What the venv gets is the
    wheel and the dependencies it declares, and nothing else (not even setuptools)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("synwatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for toml in (REPO / "filters").glob("*.toml"):
        assert f"synwatch/filters/{toml.name}" in names
    assert "synwatch/default.toml" in names
    assert "synwatch/store/migrations/env.py" in names
    assert "synwatch/store/migrations/versions/0001_initial.py" in names
    assert "synwatch/actions_presets/README.md" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--disable-pip-version-check", "--no-compile",
                    str(wheel)], check=True, timeout=600)
    log = tmp_path / "kern.log"
    log.write_text("Jul 28 18:57:32 PC kernel: [538538.407269] TCP: request_sock_TCP: Possible "
                   "SYN flooding on port 8000. Sending cookies.  Check SNMP counters.\n")
    out = subprocess.run([venv / "bin" / "synwatch", "scan", "--count", str(log)],
                         capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60)
    assert out.stdout == "1\n"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    res = subprocess.run([venv / "bin" / "synwatch", "incidents", "list", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    assert res.returncode == 0, res.stderr  # migrations found inside the installed package


def test_unit_is_type_notify_and_checks_the_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "packaging" / "synwatch.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].endswith("synwatch run")
    assert service["ExecStartPre"].endswith("synwatch check-config")
    assert "WatchdogSec" in service and service["StateDirectory"] == "synwatch"


def test_the_unit_opens_exactly_the_lock_files_tmpfiles_creates() -> None:
    """ReadWritePaths= of a file that is missing at the start is skipped (the `-`), so every
    lock file the unit opens must come from synwatch.tmpfiles, and the other way round."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "packaging" / "synwatch.service")
    opened = {p.lstrip("-") for p in unit["Service"]["ReadWritePaths"].split()
              if p.lstrip("-").startswith("/run/")}
    created = {line.split()[1] for line
               in (REPO / "packaging" / "synwatch.tmpfiles").read_text().splitlines()
               if line.startswith("f ")}
    assert opened == created == {"/run/ufw.lock", "/run/xtables.lock"}


def test_the_unit_keeps_its_measured_hardening() -> None:
    """`systemd-analyze security` of the shipped unit (offline: CI has no systemd as PID 1).
    7.2 before #12's hardening, 4.1 after; a change that loosens the unit fails here."""
    res = subprocess.run(["systemd-analyze", "security", "--offline=true",
                          str(REPO / "packaging" / "synwatch.service")],
                         capture_output=True, text=True, check=False)
    score = float(res.stdout.rsplit("exposure level for synwatch.service: ", 1)[1].split()[0])
    assert score <= 4.1, res.stdout[-2000:]


def test_the_man_page_has_every_command() -> None:
    from synwatch.cli import build_parser

    page = subprocess.run([sys.executable, str(REPO / "scripts" / "manpage.py")],
                          capture_output=True, text=True, check=True).stdout
    for command in cli_commands(build_parser()):
        assert f"synwatch {command}".replace("-", "\\-") in page, command


def test_the_package_installs_the_configuration_for_root_alone(tmp_path: Path) -> None:
    """storage.url may hold the history's password (issue 26): the .deb gives
    /etc/synwatch/synwatch.toml 0640 root:root, as a conffile (scripts/deb-check checks the
    installed file)."""
    built = subprocess.run([str(REPO / "scripts" / "build-deb"), "--skeleton", str(tmp_path)],
                           capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHON": sys.executable}).stdout.strip()
    listing = subprocess.run(["dpkg-deb", "-c", built], capture_output=True, text=True,
                             check=True).stdout
    [entry] = [x.split() for x in listing.splitlines()
               if x.endswith(" ./etc/synwatch/synwatch.toml")]
    assert entry[:2] == ["-rw-r-----", "root/root"], entry
    conffiles = subprocess.run(["dpkg-deb", "-I", built, "conffiles"], capture_output=True,
                               text=True, check=True).stdout
    assert conffiles.split() == ["/etc/synwatch/synwatch.toml"]
