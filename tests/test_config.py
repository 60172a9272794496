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
from tests.support import DATA, REPO
from tests.support.cli import synwatch

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
    assert tuple(sorted(p.name for p in load_presets().values() if p.action == "ban"
                        and p.name != "nftables-path")) == BAN_BACKENDS  # chosen by `bridged`


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


# issue 26: values check-config accepted stopped the service (quiet_period at the start,
# retention at the first prune, the rate limit's hold at its setup). Each key is bounded to what
# the code that uses it holds, and the message names the largest value.
TOO_LARGE = [
    ("incident", "quiet_period", '"99999999999d"', "must be at most 365d"),
    ("incident", "quiet_period", '"' + "9" * 400 + 's"', "must be at most 365d"),  # inf
    ("storage.retention", "events", '"99999999999d"', "must be at most 36500d"),
    ("storage.retention", "incidents", '"36501d"', "must be at most 36500d"),
    ("actions.ratelimit", "hold", '"99999999999d"', "must be at most 365d"),
    ("actions.ratelimit", "hold", '"500ms"', "must be at least 1s"),  # "timeout 0s": forever
    ("actions.ban", "duration", '"999d"', "must be at most 365d"),
    ("actions.ban", "duration", '"0.5s"', "must be at least 1s"),
    ("actions.ban", "max_duration", '"53w"', "must be at most 365d"),
    ("actions.ban", "increment", "inf", "expected a number from 1 to 100"),
    ("actions.ban", "increment", "nan", "expected a number from 1 to 100"),
    ("actions.ban", "increment", "1e308", "expected a number from 1 to 100"),
    ("incident", "probe_interval", '"2h"', "must be at most 1h"),
    ("incident", "half_open_for", '"2d"', "must be at most 1d"),
    ("incident", "verdict_window", '"2d"', "must be at most 1d"),
    ("actions.notify", "interval", '"2d"', "must be at most 1d"),
    ("actions.notify", "timeout", '"2h"', "must be at most 1h"),
    ("actions.notify", "retry", '"2d"', "must be at most 1d"),
    ("actions.notify", "attempts", "100", "expected a whole number from 1 to 20"),
    ("actions.exec", "timeout", '"25d"', "must be at most 1d"),
    ("verdict", "concentrated_share", "nan", "expected a fraction from 0 to 1"),
    ("storage", "spool_max", "9" * 30, "expected a whole number from 100 to 10000000"),
]


@pytest.mark.parametrize(("section", "key", "value", "why"), TOO_LARGE,
                         ids=[f"{s}.{k}={v[:14]}" for s, k, v, _ in TOO_LARGE])
def test_a_value_the_code_cannot_hold_is_refused_naming_the_largest(
        section: str, key: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"[{section}]\n{key} = {value}\n", "x.toml")
    assert err.value.key == f"{section}.{key}"
    assert err.value.reason.startswith(why), err.value.reason
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)  # a digit run is cut short


@pytest.mark.parametrize(("section", "key", "value"), [
    ("incident", "quiet_period", "99999999999d"), ("incident", "quiet_period", "9" * 400 + "s"),
    ("storage.retention", "events", "99999999999d"), ("actions.ratelimit", "hold", "99999999999d"),
])
def test_check_config_exits_2_on_the_values_that_stopped_the_service(
        tmp_path: Path, section: str, key: str, value: str) -> None:
    path = _config(tmp_path, f'[{section}]\n{key} = "{value}"\n')
    r = synwatch("check-config", "--config", str(path))
    most = "36500d" if section == "storage.retention" else "365d"
    assert r.code == 2 and r.out == "", r
    assert r.err.startswith(f"synwatch: config {path}: {section}.{key}: must be at most {most}, "
                            'got "'), r.err
    assert r.err.count("\n") == 1


def test_ipset_bans_are_bounded_by_ipsets_largest_timeout() -> None:
    from synwatch.config.validators import IPSET_MAX_TIMEOUT

    ipset = '[actions.ban]\nbackend = "iptables-ipset"\n'
    with pytest.raises(ConfigError) as err:
        parse_config(f'{ipset}max_duration = "25d"\n', "x.toml")
    assert err.value.key == "actions.ban.max_duration"
    assert err.value.reason.startswith(f"must be at most {IPSET_MAX_TIMEOUT}s (24.8 days)")
    c = parse_config(f'{ipset}max_duration = "{IPSET_MAX_TIMEOUT}s"\n', "x.toml")
    assert c.ban.max_duration == IPSET_MAX_TIMEOUT
    # the same value with nftables is fine: its limit is far beyond a year
    assert parse_config('[actions.ban]\nmax_duration = "25d"\n', "x.toml").ban.max_duration


@pytest.mark.parametrize("text", [
    "x = " + "[" * 50_000 + "]" * 50_000,
    "[incident]\nquiet_period = " + "{a = " * 50_000 + "1" + "}" * 50_000,
    "[storage]\nspool_max = " + "9" * 5000,  # beyond int()'s 4300 digits
])
def test_a_pathological_toml_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    """A TOML nested 50,000 deep was an internal error (RecursionError), not exit 2."""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "x.toml")
    assert err.value.key is None and err.value.reason.startswith("not valid TOML: ")
    path = tmp_path / "deep.toml"
    path.write_text(text)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 2 and r.err.startswith(f"synwatch: config {path}: not valid TOML: "), r
    assert r.err.count("\n") == 1 and "internal error" not in r.err


def test_a_deep_value_under_a_known_key_names_the_key() -> None:
    """Nested as deep as tomllib parses: the message quoting it stays one short line."""
    with pytest.raises(ConfigError) as err:
        parse_config("[sources]\nfiles = " + "[" * 400 + "]" * 400 + "\n", "x.toml")
    assert err.value.key == "sources.files" and len(err.value.reason) < 300


LARGEST = """
[incident]
quiet_period = "365d"
probe_interval = "1h"
half_open_for = "1d"
verdict_window = "1d"
[storage.retention]
events = "36500d"
incidents = "36500d"
[actions.ban]
duration = "365d"
max_duration = "365d"
increment = 100
[actions.ratelimit]
hold = "365d"
[actions.notify]
interval = "1d"
timeout = "1h"
retry = "1d"
attempts = 20
[actions.exec]
timeout = "1d"
"""


def test_the_largest_accepted_values_work_where_they_are_used(tmp_path: Path) -> None:
    """Every limit is within what its consumer holds: the correlator's timedelta, the prune's
    "now - retention", the ban and rate-limit timeouts nft renders, the notify retry's last
    delay, and subprocess's timeout for exec."""
    from datetime import datetime, timedelta, timezone

    from synwatch.actions.exec import run_program
    from synwatch.actions.firewall import BanItem, Firewall
    from synwatch.actions.presets import load_presets
    from synwatch.actions.ratelimit import PRESET, ratelimit_context
    from synwatch.clock import FrozenClock
    from synwatch.config.validators import NFT_MAX_TIMEOUT, POLL_MAX_TIMEOUT
    from synwatch.detect.correlate import Correlator
    from synwatch.store import History

    c = parse_config(LARGEST, "largest")
    now = datetime.now(timezone.utc)
    Correlator("h", "", c.thresholds, c.quiet_period, FrozenClock(now))  # timedelta(quiet)
    # the prune (service._prune_step): now - retention, on a real history
    store = History.open(f"sqlite:///{tmp_path}/h.db", host="h")
    assert c.storage.keep_events is not None and c.storage.keep_incidents is not None
    assert store.prune_events(now - timedelta(seconds=c.storage.keep_events)) == 0
    assert store.prune_incidents(now - timedelta(seconds=c.storage.keep_incidents), now) == 0
    store.close()
    # the firewall timeouts as nft is given them: within what its parser takes
    hold = ratelimit_context(c)["hold"]
    assert 0 < hold <= NFT_MAX_TIMEOUT
    setup = load_presets()[PRESET].render("setup", ratelimit_context(c))
    assert f"timeout {hold}s;" in str(setup[0].stdin)
    from synwatch.actions.banchoice import ban_seconds

    longest = ban_seconds(c.ban, 3)  # increment 100, three bans before: capped at max_duration
    assert longest == int(c.ban.max_duration) <= NFT_MAX_TIMEOUT
    ban = Firewall(load_presets()["nftables"]).render_ban([BanItem("192.0.2.0/24", longest)])
    assert f"timeout {longest}s" in str(ban[0].stdin)
    assert now + timedelta(seconds=c.ban.max_duration)  # expires_at (ban.py)
    # the notify retry's last delay (respond.py: retry * 2 ** (attempt - 1)) as a datetime
    last = c.notify.retry * 2 ** (c.notify.attempts - 2)
    assert now + timedelta(seconds=last)
    # exec's timeout as subprocess.run takes it
    assert c.exec.timeout <= POLL_MAX_TIMEOUT
    assert run_program(("/bin/true",), {}, c.exec.timeout).startswith("exit status 0")


def test_the_largest_timeouts_are_taken_by_the_real_nft(tmp_path: Path) -> None:
    """The rate limit's setup and a ban at the longest accepted timeouts, applied by nft in a
    network namespace of their own (`99999999999d` made the rate limit's setup fail)."""
    import os
    import shutil

    from synwatch.actions.firewall import BanItem, Firewall
    from synwatch.actions.presets import load_presets
    from synwatch.actions.ratelimit import PRESET, ratelimit_context

    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs root and nft")
    c = parse_config(LARGEST, "largest")
    presets = load_presets()
    fw = Firewall(presets["nftables"])
    commands = [*presets[PRESET].render("setup", ratelimit_context(c)), *fw.render_setup(),
                *fw.render_ban([BanItem("192.0.2.0/24", int(c.ban.max_duration))])]
    script = "\n".join(str(cmd.stdin) for cmd in commands if cmd.argv[:2] == ("nft", "-f"))
    done = subprocess.run(["unshare", "--net", "nft", "-f", "-"], input=script, text=True,
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr


# -- storage.password_file: the database password kept out of the configuration -------------

SERVER = "postgresql+psycopg://synwatch@127.0.0.1:1/synwatch"  # refuses at once
# `@`, `/` and `:` would end the URL's fields early, and an unquoted `%41` would read as "A"
PASSWORD = "s3cr@t/p%41ss:w0rd"


def _password_config(tmp_path: Path, password_file: str, url: str = SERVER) -> Path:
    path = tmp_path / "synwatch.toml"
    path.write_text(f'[storage]\nurl = "{url}"\npassword_file = "{password_file}"\n'
                    f'state_dir = "{tmp_path}"\n')
    return path


def test_the_password_file_is_read_into_the_url_quoted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import make_url

    from synwatch.store.dialect import libpq_uri

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    secret = tmp_path / "db-password"
    secret.write_text(f"  {PASSWORD}  \nnot the password\n")  # the first line, stripped
    c = load_config(str(_password_config(tmp_path, str(secret))))
    assert c.storage_url == ("postgresql+psycopg://synwatch:s3cr%40t%2Fp%2541ss%3Aw0rd"
                             "@127.0.0.1:1/synwatch")
    assert c.storage.password_file == str(secret)
    # both readers of the URL get the password back: SQLAlchemy (the store) and libpq (the
    # history reader)
    url = make_url(c.storage_url)
    assert (url.username, url.password, url.host, url.port) == ("synwatch", PASSWORD,
                                                                "127.0.0.1", 1)
    assert conninfo_to_dict(libpq_uri(c.storage_url))["password"] == PASSWORD
    # parsing alone reads no file: the URL is as written
    assert parse_config(_password_config(tmp_path, str(secret)).read_text(),
                        "x.toml").storage_url == SERVER


def test_a_relative_password_file_is_a_systemd_credential_else_beside_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"  # what LoadCredential= makes
    credentials.mkdir()
    (credentials / "db-password").write_text("from-systemd\n")
    (tmp_path / "db-password").write_text("from-etc\n")
    path = _password_config(tmp_path, "db-password")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    c = load_config(str(path))
    assert c.storage_url == "postgresql+psycopg://synwatch:from-systemd@127.0.0.1:1/synwatch"
    assert c.storage.password_file == str(credentials / "db-password")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    c = load_config(str(path))
    assert c.storage_url == "postgresql+psycopg://synwatch:from-etc@127.0.0.1:1/synwatch"
    # and through the CLI, as the unit's ExecStartPre runs it
    (credentials / "db-password").write_text("")
    r = synwatch("check-config", "--config", str(path),
                 env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert r.code == 2 and r.err == (f"synwatch: config {path}: storage.password_file: "
                                     f"{credentials / 'db-password'} is empty: the password is "
                                     "its first line\n"), r


@pytest.mark.parametrize(("case", "url", "why"), [
    ("missing", SERVER, "cannot read {file}: No such file or directory"),
    ("a directory", SERVER, "cannot read {file}: Is a directory"),
    ("empty", SERVER, "{file} is empty: the password is its first line"),
    ("a blank first line", SERVER, "{file} is empty: the password is its first line"),
    ("not UTF-8", SERVER, "{file} is not UTF-8 text"),
    ("a URL with a password", "postgresql+psycopg://synwatch:inline@127.0.0.1:1/synwatch",
     "storage.url already has a password"),
    ("a URL with ?password=", "postgresql+psycopg://synwatch@127.0.0.1:1/synwatch"
                              "?password=inline", "storage.url already has a password"),
    # blank, it would still win over the file's in the driver
    ("a URL with a blank ?password=", f"{SERVER}?sslmode=disable&password=",
     "storage.url already has a password"),
    ("an SQLite URL", "sqlite:///{dir}/h.db", 'storage.url is an SQLite history '
                                             '("sqlite:///{dir}/h.db"), which has no password'),
    ("the default URL", "", "storage.url is an SQLite history"),
])
def test_a_password_file_that_cannot_work_is_exit_2_naming_the_key(
        tmp_path: Path, case: str, url: str, why: str) -> None:
    file = tmp_path / "db-password"
    if case == "a directory":
        file.mkdir()
    elif case != "missing":
        file.write_bytes({"empty": b"", "a blank first line": b"  \nsecond\n",
                          "not UTF-8": b"\xff\xfe\n"}.get(case, b"s3cret\n"))
    path = _password_config(tmp_path, str(file), url.format(dir=tmp_path))
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 2 and r.out == "", r
    assert r.err.startswith(f"synwatch: config {path}: storage.password_file: "
                            f"{why.format(file=file, dir=tmp_path)}"), r.err
    assert r.err.count("\n") == 1 and "s3cret" not in r.err


def test_a_password_file_path_is_text_without_control_characters() -> None:
    for value in ("3", '"a\\u0000b"', '"a\\nb"'):
        with pytest.raises(ConfigError) as err:
            parse_config(f"[storage]\nurl = {SERVER!r}\npassword_file = {value}\n", "x.toml")
        assert err.value.key == "storage.password_file"
        assert err.value.reason.startswith('expected a file path or "", got '), err.value
