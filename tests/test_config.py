"""Config: strict keys, values checked with the key named, exit 2 on the command line."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from synwatch.config import (
    BAN_BACKENDS,
    BUILTIN_ACTIONS,
    BanSettings,
    ExecSettings,
    NotifySettings,
    RatelimitSettings,
    load_config,
    parse_config,
)
from synwatch.errors import ConfigError
from tests.conftest import DATA, REPO, synwatch

INVALID = sorted((DATA / "config" / "invalid").glob("*.toml"))


def _want(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# want-error: "), f"{path.name} does not state its error"
    return first.removeprefix("# want-error: ")


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_states_its_error(path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"config {path}: {_want(path)}"


@pytest.mark.parametrize("path", INVALID[:4], ids=[p.stem for p in INVALID[:4]])
def test_check_config_prints_one_line_and_exits_2(path: Path) -> None:
    res = synwatch("check-config", "--config", str(path))
    assert res.code == 2
    assert res.err == f"synwatch: config {path}: {_want(path)}\n"
    assert res.out == ""


def test_every_contract_key_is_read() -> None:
    path = DATA / "config" / "valid" / "full.toml"
    c = load_config(str(path))
    assert c.storage_url.startswith("postgresql+psycopg://")
    assert (c.journald, c.kmsg, c.files) == (False, True, ("/var/log/syslog", "/var/log/kern.log"))
    assert c.netns == "web-ns" and c.quiet_period == 90
    assert c.allowlist == (ipaddress.ip_network("192.0.2.0/24"),
                           ipaddress.ip_network("2001:db8::/32"))
    assert (c.dry_run, c.syncookies_enabled) == (False, False)
    assert c.policy == {"capacity": ("notify",), "concentrated": ("ban", "notify", "exec"),
                        "spoofed": ("exec",), "unknown": ()}
    assert c.ban == BanSettings(enabled=True, backend="iptables-ipset", duration=7200,
                                increment=3, max_duration=2 * 86400, max_per_incident=4,
                                max_total=64, min_share=0.1)
    assert c.ratelimit == RatelimitSettings(True, 300, 100, 600, (80, 443))
    assert c.notify == NotifySettings(True, c.notify.urls, 1800, 5, 60, 3)
    assert len(c.notify.urls) == 2
    assert c.exec == ExecSettings(True, ("/usr/local/bin/on-synflood", "--page"),
                                  ("opened", "closed"), 20)
    assert c.metrics_listen == ("127.0.0.1", 9851)
    # every key parses; the machine check then finds the watched namespace missing
    r = synwatch("check-config", "--config", str(path))
    missing = 'watch.netns: there is no network namespace "web-ns" (`ip netns list`)'
    assert r.code == 2 and r.err.startswith(f"synwatch: config {path}: {missing}"), r.err
    assert f"fail  {missing}\n" in r.out


def test_embedded_default_is_the_packaged_file_and_safe() -> None:
    text = (REPO / "packaging" / "synwatch.toml").read_text()
    c = parse_config(text, "default")
    assert c.dry_run is True, "the embedded default must not change a laptop's firewall"
    assert c.notify.enabled is False and c.netns == ""
    assert (c.journald, c.kmsg, c.files) == ("auto", "auto", ())
    assert c.storage_url.startswith("sqlite:///")


def test_where_the_config_comes_from(tmp_path: Path) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text('[incident]\nquiet_period = "5m"\n')
    res = synwatch("check-config", env={"SYNWATCH_CONFIG": str(env_file)})
    assert res.code == 0 and res.out.endswith(f"{env_file}: OK\n"), res.out
    # --config wins over the environment
    other = tmp_path / "other.toml"
    other.write_text("[incident]\nquiet_period = 5\n")
    res = synwatch("check-config", "--config", str(other), env={"SYNWATCH_CONFIG": str(env_file)})
    assert res.code == 2 and "incident.quiet_period" in res.err


def test_unreadable_config_is_exit_2(tmp_path: Path) -> None:
    res = synwatch("check-config", "--config", str(tmp_path / "missing.toml"))
    assert res.code == 2
    assert res.err == f"synwatch: config {tmp_path / 'missing.toml'}: No such file or directory\n"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = INVALID[0]
    res = synwatch("--debug", "check-config", "--config", str(bad))
    assert res.code == 2 and "Traceback" in res.err  # still the exit status of a bad config


def test_a_file_that_does_not_say_dry_run_is_a_dry_run() -> None:
    """One default everywhere: a minimal /etc/synwatch/synwatch.toml must not act."""
    assert parse_config("", "minimal").dry_run is True
    assert parse_config("[actions]\n", "minimal").dry_run is True
    assert parse_config("[actions]\ndry_run = false\n", "live").dry_run is False


def test_parsing_is_pure_it_imports_no_store_and_no_action() -> None:
    """issue 11: parsing loaded the presets and the entry points (26 modules and SQLAlchemy)."""
    code = ("import sys; from synwatch.config import load_config; "
            f"load_config({str(DATA / 'config' / 'valid' / 'full.toml')!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', "
            "'synwatch.actions', 'synwatch.store', 'importlib.metadata'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out == "[]\n"


def test_the_built_in_names_are_what_is_shipped() -> None:
    from synwatch.actions.presets import load_presets
    from synwatch.actions.registry import registered

    assert {n: c.per_incident for n, c in registered().items()} == BUILTIN_ACTIONS
    assert tuple(sorted(p.name for p in load_presets().values()
                                        if p.action == "ban")) == BAN_BACKENDS


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "synwatch.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n{body}')
    return path


def test_check_config_fails_when_the_ban_tool_is_missing_and_actions_are_live(
        tmp_path: Path) -> None:
    """It printed OK on a machine without nft; now a live ban backend needs its tool."""
    no_tools = {"PATH": str(tmp_path)}  # a PATH with no nft on it
    live = _config(tmp_path, "[actions]\ndry_run = false\n")
    r = synwatch("check-config", "--config", str(live), env=no_tools)
    why = "actions.ban.backend: nftables needs nft, which is not installed"
    assert r.code == 2 and r.err == f"synwatch: config {live}: {why}\n", r
    assert f"fail  {why}\n" in r.out
    dry = _config(tmp_path, "[actions]\ndry_run = true\n")
    r = synwatch("check-config", "--config", str(dry), env=no_tools)
    assert r.code == 0 and f"warn  {why}\n" in r.out, r  # a dry run only renders
    r = synwatch("check-config", "--config", str(live))
    assert r.code == 0 and "ok    actions.ban.backend: nftables: nft installed\n" in r.out, r


def test_check_config_opens_the_history_without_creating_it(tmp_path: Path) -> None:
    path = _config(tmp_path, "")
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0 and f"{tmp_path}/h.db will be created" in r.out, r
    assert not (tmp_path / "h.db").exists()
    (tmp_path / "h.db").write_bytes(b"not a database" * 100)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 2 and "storage.url: " in r.err and "not a database" in r.err, r


def test_a_plugin_that_is_not_installed_is_found_at_the_start_not_by_parsing(
        tmp_path: Path) -> None:
    path = _config(tmp_path, '[actions.policy]\nspoofed = ["page"]\n')
    assert load_config(str(path)).policy["spoofed"] == ("page",)  # it could be a plugin
    why = ('actions.policy.spoofed: "page" is not an action (known: ban, exec, notify, '
           "ratelimit, syncookies, synproxy)")
    for command in ("check-config", "run"):
        r = synwatch(command, "--config", str(path))
        assert r.code == 2 and r.err.endswith(f"synwatch: config {path}: {why}\n"), (command, r)
    assert not (tmp_path / "h.db").exists()  # refused before the history was opened


def test_synproxy_is_chosen_in_the_policy_as_the_interface_says(tmp_path: Path) -> None:
    """`spoofed = ["synproxy", "notify"]` (the interface's own example) parses, and
    check-config warns where only one of the two halves of the opt-in is there."""
    both = _config(tmp_path, '[actions.synproxy]\nenabled = true\n'
                             '[actions.policy]\nspoofed = ["synproxy", "notify"]\n')
    assert load_config(str(both)).policy["spoofed"] == ("synproxy", "notify")
    r = synwatch("check-config", "--config", str(both))
    assert r.code == 0 and "actions.synproxy" not in r.out, r
    alone = _config(tmp_path, '[actions.synproxy]\nenabled = true\n')
    r = synwatch("check-config", "--config", str(alone))
    assert r.code == 0 and "warn  actions.synproxy.enabled: true, but no verdict's policy " \
                           "names synproxy" in r.out, r
