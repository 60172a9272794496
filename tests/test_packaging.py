"""The wheel carries its data (filters, default config, migrations) and installs without the
journald extra; the systemd unit matches what `synwatch run` speaks; the package's removal
lifts, only on `remove`, everything synwatch holds in a real kernel and says so, and its purge
deletes the tables of the watched namespaces."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.probes.accounting import SynAccounting
from synwatch.records import Ban
from synwatch.store import History
from synwatch.system.runner import execute
from synwatch.system.sysctl import write_sysctl
from tests.support import REPO
from tests.support.cli import cli_commands


@pytest.mark.needs_network  # the wheel's dependencies from the package index (or its mirror)
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


# -- removal and purge: the maintainer scripts, and what the removal lifts in a real kernel ----

LOCKS = (Path("/run/ufw.lock"), Path("/run/xtables.lock"))  # ufw's, iptables-legacy's
RECORDER = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"{log}\"\n"


def _control_scripts(tmp_path: Path) -> Path:
    """The skeleton package's maintainer scripts, extracted."""
    built = subprocess.run([str(REPO / "scripts" / "build-deb"), "--skeleton", str(tmp_path)],
                           capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHON": sys.executable}).stdout.strip()
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", built, str(control)], check=True, timeout=60)
    return control


def _recorders(folder: Path, log: Path, *names: str) -> None:
    """Programs that only write their name and arguments to ``log``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(RECORDER.format(log=log))
        (folder / name).chmod(0o755)


def test_prerm_lifts_what_synwatch_holds_on_remove_only(tmp_path: Path) -> None:
    """Debian policy §6.5: `prerm remove` (also `remove in-favour`, a conflicting package
    replacing it) is a removal; `upgrade`, `failed-upgrade` and `deconfigure` leave synwatch
    installed, and its bans must stay. The prerm runs with its venv's python and the systemd
    helpers replaced by recorders (what runs in the kernel is the next test's)."""
    control = _control_scripts(tmp_path)
    log, fakes = tmp_path / "ran.log", tmp_path / "bin"
    _recorders(fakes / "venv" / "bin", log, "python")
    _recorders(fakes, log, "deb-systemd-invoke")
    prerm = tmp_path / "prerm"
    prerm.write_text((control / "prerm").read_text().replace("/opt/synwatch/venv",
                                                             str(fakes / "venv")))
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}"}
    for args, lifts in ((["upgrade", "0.2.0"], False),
                        (["failed-upgrade", "0.1.0", "0.2.0"], False),
                        (["deconfigure", "in-favour", "other", "1.0"], False),
                        (["remove"], True),
                        (["remove", "in-favour", "other", "1.0"], True)):
        log.unlink(missing_ok=True)
        subprocess.run(["sh", str(prerm), *args], env=env, check=True, timeout=30)
        ran = log.read_text() if log.exists() else ""
        expect = "python -m synwatch.cli.uninstall --note /var/lib/synwatch/namespaces\n"
        assert (expect in ran) == lifts, (args, ran)
        assert ("deb-systemd-invoke stop synwatch.service" in ran) == (
            lifts and Path("/run/systemd/system").is_dir()), (args, ran)


@pytest.fixture
def watched() -> Iterator[str]:
    """A network namespace of the test's own, removed with everything in it (the lock files
    ufw and iptables open on the host's /run too) even when the test fails."""
    name = f"swt-{uuid.uuid4().hex[:6]}-w"
    made_locks = [lock for lock in LOCKS if not lock.exists()]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
        for lock in made_locks:
            lock.unlink(missing_ok=True)


def in_ns(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=True, timeout=30).stdout


@pytest.mark.needs_root
def test_the_removal_lifts_every_ban_and_puts_back_what_it_raised(tmp_path: Path,
                                                                  watched: str) -> None:
    """What a running synwatch leaves in the watched namespace, made by its own presets and
    recorded as its actions record it: nftables bans (IPv4 and IPv6), an ipset/iptables ban,
    the accounting chain, both rate-limit chains, tcp_syncookies raised from 0. `python -m
    synwatch.cli.uninstall` (run in a fresh network namespace of its own, so that "the host's"
    is one the test owns too) lifts all of it, says each on a line, marks the bans removed in
    the history and notes the namespace for the purge; run again, it has nothing to do."""
    ns, now = watched, datetime.now(timezone.utc)
    history = f"sqlite:///{tmp_path}/history.db"
    cfg = tmp_path / "synwatch.toml"
    cfg.write_text(f'[storage]\nurl = "{history}"\n[watch]\nnetns = "{ns}"\n')
    presets = load_presets()
    nft, ipset = Firewall(presets["nftables"], ns), Firewall(presets["iptables-ipset"], ns)
    store = History.open(history)
    try:
        bans = {"nftables": ["192.0.2.0/24", "2001:db8:7::/64"],
                "iptables-ipset": ["198.51.100.0/24"]}
        store.add_bans([Ban(prefix=p, backend=b, netns=ns, incident_id=None, created_at=now,
                            expires_at=now + timedelta(days=7))
                        for b, prefixes in bans.items() for p in prefixes])
        for fw in (nft, ipset):
            fw.apply(fw.render_setup() + fw.render_ban(
                [BanItem(p, 7 * 86400, "synwatch incident 1") for p in bans[fw.name]]))
        SynAccounting(ns).setup()
        execute(presets["ratelimit-nftables"].render(
            "setup", {"rate": 100, "burst": 50, "hold": 300, "dports": ""}), ns)
        limit = Firewall(presets["ratelimit-sources-nftables"], ns)
        execute(limit.preset.render("setup", {"rate": 100, "burst": 50})
                + limit.render_ban([BanItem("203.0.113.7/32", 600, "synwatch incident 1")]), ns)
        write_sysctl(ns, "net.ipv4.tcp_syncookies", 0)  # the admin's value, raised by synwatch
        store.save_setting(ns, "net.ipv4.tcp_syncookies", "0", now)
        write_sysctl(ns, "net.ipv4.tcp_syncookies", 1)
    finally:
        store.close()
    assert "192.0.2.0/24" in in_ns(ns, "nft", "list", "set", "inet", "synwatch", "bannet4")

    note = tmp_path / "state" / "namespaces"
    env = {**os.environ, "SYNWATCH_CONFIG": str(cfg)}

    def uninstall() -> list[str]:
        res = subprocess.run(["unshare", "--net", "--", sys.executable, "-m",
                              "synwatch.cli.uninstall", "--note", str(note)], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        assert res.stderr == "", res.stderr  # no warning: everything went
        return res.stdout.splitlines()

    said = uninstall()
    assert said == [
        f"synwatch: put back net.ipv4.tcp_syncookies=0 in netns {ns}",
        f"synwatch: lifted the ban of 192.0.2.0/24 (nftables) in netns {ns}",
        f"synwatch: lifted the ban of 2001:db8:7::/64 (nftables) in netns {ns}",
        f"synwatch: lifted the ban of 198.51.100.0/24 (iptables-ipset) in netns {ns}",
        f"synwatch: removed the iptables-ipset rules and sets in netns {ns}",
        f"synwatch: removed the rate-limit chain srclimit in netns {ns}",
        f"synwatch: removed the rate-limit chain ratelimit in netns {ns}",
        f"synwatch: removed the SYN accounting chain account and its sets "
        f"(table inet synwatch) in netns {ns}"]
    for name in ("bannet4", "bannet6"):
        assert "elements" not in in_ns(ns, "nft", "list", "set", "inet", "synwatch", name)
    table = in_ns(ns, "nft", "list", "table", "inet", "synwatch")
    assert {c for c in ("account", "ratelimit", "srclimit") if f"chain {c} " in table} == set()
    assert "synwatch" not in in_ns(ns, "ipset", "list", "-n")
    assert "match-set" not in in_ns(ns, "iptables", "-S", "INPUT")
    assert "match-set" not in in_ns(ns, "ip6tables", "-S", "INPUT")
    assert in_ns(ns, "cat", "/proc/sys/net/ipv4/tcp_syncookies").strip() == "0"
    assert note.read_text() == f"{ns}\n"
    store = History.open(history)
    try:
        assert store.active_bans(ns, datetime.now(timezone.utc)) == []
        assert store.saved_settings() == []
    finally:
        store.close()
    assert uninstall() == ["synwatch: held no ban, rate limit or changed setting: "
                           "nothing to lift"]


@pytest.mark.needs_root
def test_the_purge_deletes_the_table_in_every_noted_namespace(tmp_path: Path,
                                                              watched: str) -> None:
    """postrm purge runs after dpkg removed the configuration (Debian policy §6.8): the
    namespaces come from the note the removal wrote. Run with its paths moved into tmp_path,
    the systemd helpers recorded, in a fresh network namespace (its "host's" table is one the
    test owns); a name that is not an `ip netns` name is never used."""
    control = _control_scripts(tmp_path)
    state, conf = tmp_path / "state", tmp_path / "etc"
    state.mkdir()
    conf.mkdir()
    (state / "namespaces").write_text(f"{watched}\n../../etc\nswt-gone-{uuid.uuid4().hex[:6]}\n")
    fw = Firewall(load_presets()["nftables"], watched)
    fw.apply(fw.render_setup())
    log, fakes = tmp_path / "ran.log", tmp_path / "bin"
    _recorders(fakes, log, "deb-systemd-helper", "systemctl")
    postrm = tmp_path / "postrm"
    postrm.write_text((control / "postrm").read_text()
                      .replace("state=/var/lib/synwatch", f"state={state}")
                      .replace("conf=/etc/synwatch", f"conf={conf}"))
    res = subprocess.run(["unshare", "--net", "--", "sh", str(postrm), "purge"],
                         env={**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}"},
                         capture_output=True, text=True, timeout=60, check=True)
    assert res.stdout.splitlines() == [
        f"synwatch: deleted the nftables table inet synwatch in netns {watched}"]
    assert res.stderr == ""
    assert subprocess.run(["ip", "netns", "exec", watched, "nft", "list", "table", "inet",
                           "synwatch"], capture_output=True, check=False).returncode != 0
    assert not state.exists() and not conf.exists()
    assert "deb-systemd-helper purge synwatch.service" in log.read_text()


def test_a_configuration_that_does_not_load_still_names_the_watched_namespace(
        tmp_path: Path) -> None:
    """A key this version does not know (an upgrade's configuration, a typo) fails
    load_config; the removal still cleans the namespace the file names (a path is no name)."""
    from synwatch.cli.uninstall import _watched_without_config
    from synwatch.config import ConfigError, load_config

    cfg = tmp_path / "synwatch.toml"
    cfg.write_text('[watch]\nnetns = "web"\nno_such_key = 1\n')
    with pytest.raises(ConfigError):
        load_config(str(cfg))
    assert _watched_without_config(str(cfg)) == "web"
    cfg.write_text('[watch]\nnetns = "../../x"\n')
    assert _watched_without_config(str(cfg)) == ""
    assert _watched_without_config(None) == ""


@pytest.mark.needs_root
def test_the_removal_lifts_ufw_bans_and_leaves_the_admins_rules(tmp_path: Path,
                                                                 watched: str) -> None:
    """ufw rules have no timeout: before, they stayed for ever once the package was gone. The
    namespace gets a ufw of its own (`ip netns exec` binds /etc/netns/NS/ufw over /etc/ufw),
    so the host's is never touched; one `ufw status` lists both families."""
    etc = Path("/etc/netns") / watched
    made_netns_dir = not etc.parent.exists()
    try:
        shutil.copytree("/etc/ufw", etc / "ufw")
        in_ns(watched, "ufw", "default", "allow", "incoming")
        in_ns(watched, "ufw", "--force", "enable")
        in_ns(watched, "ufw", "deny", "from", "192.0.2.0/24", "comment", "the admin rule")
        fw = Firewall(load_presets()["ufw"], watched)
        fw.apply(fw.render_ban([BanItem("198.51.100.0/24", 600, "synwatch incident 3"),
                                BanItem("2001:db8:7::/64", 600, "synwatch incident 3")]))
        cfg = tmp_path / "synwatch.toml"
        cfg.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                       f'[watch]\nnetns = "{watched}"\n')
        res = subprocess.run(["unshare", "--net", "--", sys.executable, "-m",
                              "synwatch.cli.uninstall"],
                             env={**os.environ, "SYNWATCH_CONFIG": str(cfg)},
                             capture_output=True, text=True, timeout=60, check=True)
        assert res.stdout.splitlines() == [
            f"synwatch: lifted the ban of 198.51.100.0/24 (ufw) in netns {watched}",
            f"synwatch: lifted the ban of 2001:db8:7::/64 (ufw) in netns {watched}"], res.stderr
        status = in_ns(watched, "ufw", "status")
        assert "synwatch" not in status and "the admin rule" in status, status
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if made_netns_dir:
            shutil.rmtree(etc.parent, ignore_errors=True)
