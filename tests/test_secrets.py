"""A password in storage.url is for root only: `check-config` warns, and `run` logs once at its
start, when the file holding it is readable by other users (issue 26)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import synwatch
from tests.support.harness import NotifySocket, start_service, stop_service

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


def _run_until_ready(path: Path, tmp_path: Path) -> str:
    """`synwatch run` on ``path`` until it is READY, then stopped: everything it logged."""
    notify = NotifySocket(tmp_path / "notify")
    proc = start_service(path, notify)
    try:
        notify.wait_for("READY=1", timeout=60)
    finally:
        code, log = stop_service(proc)
    assert code == 0, log
    return log


def test_run_logs_the_warning_once_at_its_start(tmp_path: Path) -> None:
    path = _config(tmp_path, REFUSED, 0o644)
    log = _run_until_ready(path, tmp_path)
    assert log.count("holds a password") == 1, log
    assert f"WARNING synwatch: {_warning(path, '0644', 'every user')}" in log, log
    assert "s3cret" not in log


# -- tokens in notification URLs (apprise): whoever reads them can post as synwatch -----------

SECRET_NOTIFY = ["slack://TokenA/TokenB/TokenC", "tgram://123456789:AAbotToken/4711",
                 "discord://4711/webhookToken", "mailto://alerts:s3cret@mail.example",
                 "json://hooks.example/synwatch?token=s3cret", "ntfys://ntfy.example/topic",
                 "xml://hooks.example/path?apikey=s3cret", "form://hooks.example?Webhook=x"]
# the generic HTTP notifiers' path is the receiver's own path, not a token
PLAIN_NOTIFY = ["json://hooks.example/path", "jsons://hooks.example:8443/a/b/c",
                "xmls://hooks.example/path", "form://hooks.example/path/",
                "mailto://mail.example?to=admin@example.org", "ntfy://ntfy.example"]


def _notify_config(tmp_path: Path, urls: list[str], mode: int) -> Path:
    path = tmp_path / "synwatch.toml"
    quoted = ", ".join(f'"{u}"' for u in urls)
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                    f'[sources]\njournald = false\nkmsg = false\nfiles = ["{tmp_path}/kern.log"]\n'
                    f"[actions.notify]\nurls = [{quoted}]\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("url", SECRET_NOTIFY)
def test_a_notify_url_with_a_token_in_a_file_others_read_warns(tmp_path: Path,
                                                               url: str) -> None:
    from synwatch.config import load_config
    from synwatch.daemon.preflight import check_secrets

    path = _notify_config(tmp_path, [*PLAIN_NOTIFY, url], 0o644)
    [check] = check_secrets(load_config(str(path)))
    scheme = url.split("://", maxsplit=1)[0]
    assert (check.outcome, check.subject) == ("warn", "actions.notify.urls")
    assert check.text.startswith(f"holds a password or token ({scheme}://), and {path} (mode "
                                 "0644) is readable by every user: "), check.text


@pytest.mark.parametrize("url", PLAIN_NOTIFY)
def test_a_notify_url_without_a_token_does_not_warn(tmp_path: Path, url: str) -> None:
    from synwatch.config import load_config
    from synwatch.daemon.preflight import check_secrets

    assert check_secrets(load_config(str(_notify_config(tmp_path, [url], 0o644)))) == []


def test_check_config_warns_once_for_the_notify_urls_never_printing_them(
        tmp_path: Path) -> None:
    path = _notify_config(tmp_path, [*SECRET_NOTIFY, *PLAIN_NOTIFY], 0o644)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0, r.err  # a warning, not a failure
    [line] = [x for x in r.out.splitlines() if "holds a password or token" in x]
    schemes = "discord://, form://, json://, mailto://, ntfys://, slack://, tgram://, xml://"
    fix = "chmod 640" if path.stat().st_gid == 0 else "chmod 600"
    assert line.startswith(f"warn  actions.notify.urls: holds a password or token ({schemes}), "
                           f"and {path} (mode 0644) is readable by every user: `{fix} {path}`")
    for secret in ("TokenA", "AAbotToken", "webhookToken", "s3cret"):
        assert secret not in r.out + r.err
    if os.geteuid() == 0:  # what the package installs: 0640 root:root
        os.chown(path, 0, 0)
        path.chmod(0o640)
        r = synwatch("check-config", "--config", str(path))
        assert r.code == 0 and "holds a password" not in r.out, r.out


# -- storage.password_file ------------------------------------------------------------------

PASSWORD = "s3cr@t/p%41ss"


def _password_config(tmp_path: Path, mode: int, file_mode: int) -> tuple[Path, Path]:
    secret = tmp_path / "db-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(file_mode)
    path = _config(tmp_path, "postgresql+psycopg://synwatch@127.0.0.1:1/synwatch", mode)
    path.write_text(path.read_text().replace("[storage]\n",
                                             f'[storage]\npassword_file = "{secret}"\n'))
    return path, secret


def test_a_password_file_others_can_read_warns_and_the_config_does_not(tmp_path: Path) -> None:
    """The password is in the password file: that file is the one to guard, not the config
    (whose storage.url names none)."""
    path, secret = _password_config(tmp_path, 0o644, 0o644)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0, r.err
    fix = "chmod 640" if secret.stat().st_gid == 0 else "chmod 600"
    assert (f"warn  storage.password_file: {secret} (mode 0644) is readable by every user: "
            f"`{fix} {secret}`\n") in r.out, r.out
    assert "holds a password" not in r.out, r.out
    secret.chmod(0o600)
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0 and "storage.password_file" not in r.out, r.out


@pytest.mark.skipif(os.geteuid() != 0, reason="root:root and another group need chown")
def test_a_password_file_root_only_reads_does_not_warn_but_another_group_does(
        tmp_path: Path) -> None:
    from synwatch.config import load_config
    from synwatch.daemon.preflight import check_secrets

    path, secret = _password_config(tmp_path, 0o600, 0o640)
    os.chown(secret, 0, 0)  # as the package installs its files
    assert check_secrets(load_config(str(path))) == []
    os.chown(secret, 0, 65534)  # nogroup
    [check] = check_secrets(load_config(str(path)))
    assert check.subject == "storage.password_file"
    assert "(mode 0640) is readable by group " in check.text
    assert f"`chmod 600 {secret}`" in check.text


def test_the_password_from_the_file_is_never_shown(tmp_path: Path) -> None:
    path, _ = _password_config(tmp_path, 0o644, 0o644)
    shown = "postgresql+psycopg://synwatch:***@127.0.0.1:1/synwatch"
    r = synwatch("check-config", "--config", str(path))
    assert r.code == 0 and f"storage.url: {shown}: " in r.out, r  # it is there, masked
    outputs = [r.out + r.err]
    for fmt in ("table", "json"):
        r = synwatch("status", "--config", str(path), "--format", fmt)
        assert r.code == 3 and shown in r.out, r  # the store's error names it, masked
        outputs.append(r.out + r.err)
    for text in outputs:
        for form in (PASSWORD, "s3cr%40t", "p%2541ss", "s3cr@t"):
            assert form not in text, text


def test_run_never_logs_the_password_from_the_file(tmp_path: Path) -> None:
    path, secret = _password_config(tmp_path, 0o600, 0o644)
    log = _run_until_ready(path, tmp_path)
    assert log.count(f"WARNING synwatch: storage.password_file: {secret} (mode 0644)") == 1, log
    assert "store: postgresql+psycopg://synwatch:***@127.0.0.1:1/synwatch" in log, log
    assert "s3cr" not in log


def test_a_password_in_the_query_is_never_shown_either(tmp_path: Path) -> None:
    """libpq's ``?password=`` is masked as the userinfo's is, in `status` and `check-config`."""
    path = _config(tmp_path, "postgresql+psycopg://synwatch@127.0.0.1:1/synwatch"
                             "?password=s3cret&sslmode=disable", 0o600)
    for argv in (("status",), ("status", "--format", "json"), ("check-config",)):
        r = synwatch(*argv, "--config", str(path))
        assert "password=***" in r.out + r.err and "s3cret" not in r.out + r.err, r


def test_a_port_that_is_not_a_number_is_a_config_error(tmp_path: Path) -> None:
    path = _config(tmp_path, "postgresql+psycopg://synwatch:s3cret@db:abc/synwatch", 0o600)
    for argv in (("check-config",), ("status",), ("incidents", "list")):
        r = synwatch(*argv, "--config", str(path))
        assert r.code == 2 and "storage.url: Port could not be cast" in r.err, r
        assert "s3cret" not in r.out + r.err
