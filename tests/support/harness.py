"""What several test modules share to run `synwatch run` for real: an sd_notify socket, a
service on the host's own namespace (dry run), and a service on a lab's namespaces read back
through the CLI. Helpers live here, not in test modules, so no test imports another."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tests.support.cli import synwatch
from tests.support.lab import Lab
from tests.support.wait import eventually


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def wait_for(self, wanted: str, timeout: float = 20) -> list[str]:
        """Datagrams until one holds the line ``wanted``; fails after ``timeout``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            seen.append(data)
            if wanted in data.split("\n"):
                return seen
        raise AssertionError(f"no {wanted!r} within {timeout}s; got {seen}")


def host_config(tmp_path: Path, body: str = "") -> Path:
    """A config for `synwatch run` on the host's own namespace: its store in tmp_path, ``body``
    (TOML sections), and a dry run, so the tests watch the host but never act on it (no
    sysctl, no firewall table)."""
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n{body}'
                      "[actions]\ndry_run = true\n")
    return config


def log_of(config: Path) -> Path:
    return config.with_suffix(".log")


def start_service(config: Path, notify: NotifySocket, **env: str) -> subprocess.Popen[str]:
    """`synwatch run` with its log appended to a file next to the config: an unread pipe would
    fill up (64 KiB) and block the service."""
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **env}
    with log_of(config).open("a") as err:
        return subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config",
                                 str(config)], env=full_env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)


def stop_service(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, wait; the exit code and everything the service logged (all its runs)."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    return proc.returncode, log_of(Path(proc.args[-1])).read_text()


class Service:
    def __init__(self, the_lab: Lab, tmp_path: Path, quiet: str = "3s",
                 dry_run: bool = True, extra: str = "", incident: str = "",
                 storage: str = "", run_in: str = "", watch: str = "") -> None:
        """``storage``: the [storage] section's keys (default: an SQLite file in tmp_path);
        ``watch``: watch.netns as TOML (default: the lab's server namespace);
        ``run_in``: a namespace the process itself runs in (`ip netns exec`, which execs: the
        pid is the service's), e.g. one routed to a database server in a namespace."""
        self.run_in = run_in
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config = tmp_path / "synwatch.toml"
        storage = storage or f'url = "sqlite:///{tmp_path}/h.db"'
        self.config.write_text(
            f'[storage]\n{storage}\n'
            '[sources]\njournald = false\nkmsg = true\n'
            f'[watch]\nnetns = {watch or json.dumps(the_lab.server_ns)}\n'
            f'[incident]\nquiet_period = "{quiet}"\nprobe_interval = "0.5s"\n{incident}'
            f'[actions]\ndry_run = {str(dry_run).lower()}\n{extra}')
        self.netns = the_lab.server_ns
        self.log = tmp_path / "service.log"
        self.log.touch()
        self.recording = tmp_path / "recording.jsonl"
        # a second of slack: kmsg times are derived from the monotonic clock
        self.started = datetime.now(timezone.utc) - timedelta(seconds=1)
        self.start()

    def start(self) -> None:
        """Start `synwatch run` (again, after stop() or a crash: same store, same log)."""
        logged = len(self.log.read_text())
        self.proc = subprocess.Popen(
            [*(["ip", "netns", "exec", self.run_in] if self.run_in else []),
             sys.executable, "-m", "synwatch", "run", "--config", str(self.config),
             "--record", str(self.recording)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True,
            env={**os.environ, "TZ": "UTC"})
        self.wait_log("synwatch running", after=logged)

    def wait_log(self, text: str, timeout: float = 20, after: int = 0) -> None:
        eventually(lambda: text in self.log.read_text()[after:], f"{text!r} in the log",
                   timeout, every=0.05, alive=self.proc, seen=self.log.read_text)

    def incidents(self, port: int) -> list[dict[str, Any]]:
        r = synwatch("incidents", "list", "--port", str(port), "--format", "json",
                     "--config", str(self.config))
        assert r.code == 0, r.err
        found: list[dict[str, Any]] = json.loads(r.out)
        return found

    def wait_incidents(self, port: int, want: int, status: str,
                       timeout: float = 30) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def there() -> list[dict[str, Any]] | None:
            found[:] = self.incidents(port)
            return list(found) if len(found) >= want and all(
                i["status"] == status for i in found) else None

        return eventually(there, f"{want} {status} incidents on {port}", timeout, every=0.5,
                          seen=lambda: f"got {found}\n{self.log.read_text()}")

    def events(self, port: int) -> list[dict[str, Any]]:
        r = synwatch("events", "list", "--format", "json", "--config", str(self.config))
        # kmsg is read from the start of its ring buffer: lines from before this service
        # started belong to earlier runs
        return [e for e in json.loads(r.out) if e["port"] == port
                and datetime.fromisoformat(e["time"]) >= self.started]

    def snapshot(self) -> str:
        """`synwatch snapshot --format json` of the watched namespace."""
        r = synwatch("snapshot", "--netns", self.netns, "--format", "json")
        assert r.code == 0, r.err
        return r.out

    def probes(self) -> int:
        """Probes taken so far: each writes a line to the recording as it starts."""
        return self.recording.read_text().count('"type":"evidence"')

    def wait_probes(self, rounds: int = 3, timeout: float = 20) -> None:
        """The positive marker before a "nothing happened" assertion: ``rounds`` whole rounds
        of the service's loop (probe, correlation, actions and their ticks) ran since the call,
        so whatever must not happen had its chance."""
        want = self.probes() + rounds + 1
        eventually(lambda: self.probes() >= want, f"{rounds} probes", timeout, every=0.05,
                   alive=self.proc, seen=self.log.read_text)

    def wait_turns(self, rounds: int = 3, timeout: float = 20) -> None:
        """wait_probes for a service watching many namespaces, whose quiet ones are swept, not
        probed: ``rounds`` writes of its status file (one a second, from the loop, after its
        probes, sweeps and actions' ticks)."""
        from synwatch.config import load_config
        from synwatch.daemon.status import status_path

        path = status_path(load_config(str(self.config)))
        seen: set[str] = set()

        def turned() -> bool:
            with contextlib.suppress(OSError, ValueError, KeyError):
                seen.add(json.loads(path.read_text())["updated_at"])
            return len(seen) > rounds

        eventually(turned, f"{rounds} turns of the loop", timeout, every=0.05, alive=self.proc,
                   seen=self.log.read_text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)

    def check_replay(self, port: int, name: str) -> None:
        """The recording replays to the incidents the service stored, and is kept as a golden
        replay when SYNWATCH_SAVE_REPLAYS names a directory (tests/data/replays)."""
        r = synwatch("replay", str(self.recording), "--format", "json",
                     "--config", str(self.config))
        assert r.code == 0, r.err
        replayed = [i for i in json.loads(r.out) if i["port"] == port]
        live = self.incidents(port)
        fields = ("verdict", "trigger", "status", "opened_at", "closed_at", "peak_syn_recv",
                  "top_prefixes", "recommendations")
        want = [{k: i[k] for k in fields} for i in live]
        got = [{k: i[k] for k in fields} for i in replayed]
        assert got == want, f"replayed:\n{json.dumps(got, indent=1)}\nlive:\n" \
            f"{json.dumps(want, indent=1)}"
        if os.environ.get("SYNWATCH_SAVE_REPLAYS"):
            keep = Path(os.environ["SYNWATCH_SAVE_REPLAYS"])
            lines = [json.loads(x) for x in self.recording.read_text().splitlines()]
            # only this test's listener and events: the golden file stays small and readable
            for d in lines:
                if d["type"] == "evidence":
                    d["snapshot"]["listeners"] = [li for li in d["snapshot"]["listeners"]
                                                  if li["port"] == port]
            lines = [d for d in lines if d["type"] in ("settings", "evidence")
                     or d["port"] == port]
            (keep / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
            (keep / f"{name}.expected.json").write_text(
                json.dumps([{k: i[k] for k in fields} for i in replayed], indent=1) + "\n")
