"""`synwatch try`: the real thing on this kernel, safely. A throwaway pair of network namespaces
(synwatch.system.lab), three listeners there, three short bounded floods (spoofed, concentrated,
a burst of real clients), judged by `synwatch run` itself with the admin's own configuration,
watching only that namespace, in a dry run, recording into a throwaway history. Everything it
made is removed at the end, also on failure, Ctrl-C or SIGTERM. What it cannot help: the kernel
prints its SYN-flood line into the host's log (one per flooded listener). A synwatch service
watching this host records it as an event for a port it does not listen on, and nothing more (a
line opens an incident only where the watched namespace's own counters bear it out)."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from synwatch.config import Config
from synwatch.daemon.status import status_path
from synwatch.errors import SynwatchError
from synwatch.records import ActionRun, Incident
from synwatch.system.lab import (
    CLIENT_IP,
    SERVER_IP,
    SPOOF_NET,
    NamespacePair,
    burst_code,
    fresh_port,
    listener_code,
    make_pair,
    ports_in_kernel_log,
    remove_pair,
)

if TYPE_CHECKING:
    from synwatch.store import History

QUIET = 3.0  # seconds: incidents close this long after their flood, not the configured wait
START_TIMEOUT = 30.0
JUDGE_TIMEOUT = 45.0  # per flood: the traces clear in ~3 s (one SYN-ACK retransmit), then QUIET
STOP_TIMEOUT = 20.0


class TryError(SynwatchError):
    """`synwatch try` cannot run here (not root, no `ip`), or its service did not start."""


@dataclass(frozen=True)
class Flood:
    name: str
    expected: str  # the verdict a right judgement gives
    backlog: int
    what: str  # what is sent, for people


FLOODS = (
    Flood("spoofed", "spoofed", 16,
          f"6000 SYNs from random forged addresses all over {SPOOF_NET}.0.0/16"),
    Flood("concentrated", "concentrated", 64,
          f"3000 SYNs from forged addresses in two networks, {SPOOF_NET}.1.0/24 and "
          f"{SPOOF_NET}.2.0/24"),
    Flood("real clients", "capacity", 4,
          f"a burst of 305 real connections from {CLIENT_IP}; the application never calls "
          "accept()"),
)


def _sender(flood: Flood, port: int) -> list[str]:
    """argv in the client namespace: the flood, bounded (it ends by itself within seconds)."""
    if flood.expected == "capacity":
        code = burst_code(SERVER_IP, port, established=5, attempts=300, hold=1.5)
    else:
        if flood.expected == "spoofed":
            sources = [f"{SPOOF_NET}.{random.randint(0, 255)}.{random.randint(1, 254)}"
                       for _ in range(6000)]
        else:
            sources = [f"{SPOOF_NET}.{net}.{random.randint(1, 254)}"
                       for net in (1, 2) for _ in range(1500)]
            random.shuffle(sources)
        code = (f"from synwatch.system.lab import send_syns\n"
                f"send_syns({SERVER_IP!r}, {port}, {sources!r})\n")
    return [sys.executable, "-c", code]


@dataclass(frozen=True)
class Judged:
    """What the service made of one flood: its incidents (none: it opened nothing)."""

    flood: Flood
    address: str
    port: int
    incidents: tuple[tuple[Incident, tuple[ActionRun, ...]], ...]

    @property
    def verdicts(self) -> list[str]:
        return [i.verdict for i, _ in self.incidents]

    @property
    def as_expected(self) -> bool:
        return bool(self.incidents) and all(v == self.flood.expected for v in self.verdicts)


class Stopped(Exception):
    """SIGTERM or SIGHUP while trying: cleaned up like Ctrl-C."""


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (a cleanup cut short by a second
    Ctrl-C would leave the lab behind); they are delivered after it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child: ``sig`` when the `synwatch try` that made it dies, however it dies (SIGKILL,
    the OOM killer), so no listener or service outlives it (prctl(2), kept across execve)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def history_url(workdir: Path) -> str:
    return f"sqlite:///{workdir}/try.db"


def trial_config(config: Config, pair: NamespacePair, workdir: Path) -> Config:
    """The admin's configuration, watching only the lab's server namespace: a dry run into a
    throwaway history, the kernel's log read from /dev/kmsg, no metrics listener, incidents
    closed after QUIET seconds. Everything that judges (thresholds, verdict settings, the
    sampler, the policy) is theirs."""
    return replace(
        config, netns=pair.server_ns, dry_run=True, journald=False, kmsg="auto", files=(),
        storage_url=history_url(workdir), quiet_period=QUIET, metrics_listen=None,
        storage=replace(config.storage, state_dir=str(workdir), password_file=""))


def can_try() -> None:
    if os.geteuid() != 0:
        raise TryError("try", "needs root: it makes two network namespaces (CAP_NET_ADMIN) "
                       "and sends forged SYNs inside them (CAP_NET_RAW)")
    if shutil.which("ip") is None:
        raise TryError("try", "needs `ip` (Debian: apt install iproute2) to make its "
                       "network namespaces")


@dataclass
class Trial:
    """One run of `synwatch try`: ``floods()`` yields each flood's judgement as it is made."""

    config: Config
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="synwatch-try-")))
    pair: NamespacePair | None = None
    service_pid: int | None = None
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.workdir / "service.log"

    def floods(self) -> Iterator[Judged]:
        old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            self.pair = make_pair(uuid.uuid4().hex[:6], prefix="swtry")
            self._in(self.pair.server_ns, "sh", "-c",
                     # request sockets live ~3 s instead of ~63 s: each flood's traces clear
                     # before the next one, and its incident closes soon after it
                     "echo 1 > /proc/sys/net/ipv4/tcp_synack_retries")
            taken = ports_in_kernel_log()
            ports = [fresh_port(taken) for _ in FLOODS]
            for flood, port in zip(FLOODS, ports, strict=True):
                self._start_listener(port, flood.backlog)
            self._start_service()
            for flood, port in zip(FLOODS, ports, strict=True):
                yield self._judge(flood, port)
        finally:
            self.clean_up()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _in(self, ns: str, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                       timeout=30)

    def _start_listener(self, port: int, backlog: int) -> None:
        assert self.pair is not None
        proc = subprocess.Popen(["ip", "netns", "exec", self.pair.server_ns, sys.executable,
                                 "-c", listener_code(port, backlog)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True,
                                # no thread runs in `synwatch try`: the hook is safe here
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.processes.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "listening":
            raise TryError("try", f"the lab's listener on port {port} did not start")

    def _start_service(self) -> None:
        """`synwatch run` in a child process, on the trial's configuration, its log in the
        work directory (the admin sees the judgements, and the log when it fails)."""
        assert self.pair is not None
        config = trial_config(self.config, self.pair, self.workdir)
        log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with _signals_held():  # a Ctrl-C between the fork and knowing the pid would lose it
            pid = os.fork()
            if pid == 0:  # the child: never returns into the caller's code
                _run_service(config, log_fd)
            self.service_pid = pid
        os.close(log_fd)
        # the service's loop has run once it writes its status file: its first probe is the
        # baseline the floods are measured from
        status = status_path(config)
        deadline = time.monotonic() + START_TIMEOUT
        while not status.exists():
            self._check_service("at its start")
            if time.monotonic() > deadline:
                raise TryError("try", f"the service did not start within {START_TIMEOUT:.0f} s:"
                               f"\n{self._log_tail()}")
            time.sleep(0.1)

    def _check_service(self, when: str) -> None:
        """The service child is still running, or the trial stops with its log's last lines."""
        if self.service_pid is not None and os.waitpid(self.service_pid, os.WNOHANG) != (0, 0):
            self.service_pid = None  # reaped
            raise TryError("try", f"the service stopped{' ' + when if when else ''}:\n"
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def _history(self) -> History:
        from synwatch.store import History  # noqa: PLC0415

        return History.open(history_url(self.workdir), write=False)

    def _judge(self, flood: Flood, port: int) -> Judged:
        assert self.pair is not None
        sender = subprocess.Popen(["ip", "netns", "exec", self.pair.client_ns,
                                   *_sender(flood, port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.processes.append(sender)
        _, err = sender.communicate(timeout=120)
        if sender.returncode != 0:
            why = (err.strip().splitlines() or [f"exit {sender.returncode}"])[-1]
            raise TryError("try", f"the {flood.name} flood could not be sent: {why}")
        store = self._history()
        try:
            deadline = time.monotonic() + JUDGE_TIMEOUT
            while True:
                found = store.incidents(port=port)
                if found and all(i.status == "closed" for i in found):
                    break
                if time.monotonic() > deadline:
                    break  # judged as far as it got: an open incident, or none
                self._check_service("")
                time.sleep(0.25)
            incidents = tuple((i, tuple(store.incident(i.id)[1])) for i in found)
        finally:
            store.close()
        return Judged(flood, "0.0.0.0", port, incidents)

    def clean_up(self) -> None:
        """The service stopped (it restores what it set, which in a dry run is nothing), the
        lab's processes killed, its namespaces and the throwaway history removed; with Ctrl-C
        and SIGTERM held until it is done, each step whatever the one before did."""
        with _signals_held():
            try:
                for proc in self.processes:
                    proc.kill()
                    proc.wait()
                self.processes.clear()
            finally:
                try:
                    if self.service_pid is not None:
                        _stop(self.service_pid)
                        self.service_pid = None
                finally:
                    try:
                        if self.pair is not None:
                            remove_pair(self.pair)
                            self.pair = None
                    finally:
                        shutil.rmtree(self.workdir, ignore_errors=True)


def _run_service(config: Config, log_fd: int) -> NoReturn:
    """The forked child: `synwatch run` on the trial's configuration, its log into ``log_fd``,
    stopped with SIGTERM by the parent (or by its death), never reloading another
    configuration on SIGHUP (which would bring back the admin's live one)."""
    code = 1
    try:
        os.setsid()  # Ctrl-C is the caller's to handle: it stops this child with SIGTERM
        _die_with_parent(signal.SIGTERM)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # a pipe the caller's output goes to never waits on this child
        os.dup2(log_fd, 2)
        os.environ.pop("NOTIFY_SOCKET", None)
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        from synwatch.daemon.service import Service  # noqa: PLC0415
        from synwatch.system.logsetup import setup_logging  # noqa: PLC0415

        class TrialService(Service):
            def _reload(self) -> None:
                logging.getLogger("synwatch").info(
                    "reload ignored: synwatch try keeps its own configuration")

        logging.getLogger().handlers.clear()
        setup_logging(debug=False, timestamps=True)
        code = TrialService(config, None).run()
    except BaseException:  # the child says why in its log, and exits
        logging.getLogger("synwatch").exception("synwatch try: the service failed")
    finally:
        os._exit(code)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaped either way."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
