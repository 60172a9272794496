"""What the Debian package runs when synwatch is removed (``prerm remove``, never on an upgrade),
after the service has stopped: everything synwatch still holds in the kernel goes, since the
tool that would have lifted it is going away. In the host's namespace, the watched one
(``watch.netns``) and every namespace the history names (``watch.netns`` may have changed):

- its SYNPROXY chains, before ``nf_conntrack_tcp_loose`` is put back (they need it at 0);
- the sysctls it changed and still holds put back (``tcp_syncookies``, the conntrack loose
  setting: after a crash the value waits in the history);
- every ban, in every backend it may have used, lifted with the preset's own unban render:
  the elements of the nftables sets, of the ipset sets (whose iptables rules and sets then go,
  the preset's teardown) and ufw's rules with a synwatch comment; the history marks the bans
  removed, so a reinstall does not put them back;
- the SYN accounting chain and sets, the standing rate-limit chain and the per-source one (the
  presets' teardown);
- the bans of bridged containers on the host's path to them: every ``synwatch_path_*`` table, in
  whichever namespace holds it (a bridge's: the host's for Docker), lifted and removed.

Each thing done is one line on stdout (the terminal of the apt run); a failure is a warning on
stderr and never fails the removal. The nftables table itself, empty of bans, stays until the
purge, whose ``postrm`` runs after the configuration is gone (Debian policy §6.8): the
namespaces acted in are written for it to the file ``--note`` names (the package's prerm:
``/var/lib/synwatch/namespaces``).

    python -m synwatch.cli.uninstall [--note FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from synwatch.actions.ban import PATH_PRESET
from synwatch.actions.firewall import Firewall
from synwatch.actions.presets import Preset, load_presets
from synwatch.actions.ratelimit import PRESET as RATELIMIT
from synwatch.actions.ratelimit import SOURCES as SRCLIMIT
from synwatch.actions.syncookies import SYSCTL
from synwatch.actions.synproxy import LOOSE, proxied_ports, render_off
from synwatch.config import config_location, load_config
from synwatch.daemon.bridging import PATH_SETTING
from synwatch.errors import CommandError, SynwatchError
from synwatch.probes.accounting import CHAIN as ACCOUNTING
from synwatch.probes.accounting import TABLE, SynAccounting
from synwatch.records import ActionRun
from synwatch.store import History
from synwatch.system.bridgepath import recorded
from synwatch.system.netns import bind, exists
from synwatch.system.netnsfind import find_namespaces
from synwatch.system.runner import execute, run, show
from synwatch.system.sysctl import write_sysctl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("synwatch.cli.uninstall")
BAN_BACKENDS = ("nftables", "iptables-ipset", "ufw")
DETAIL = "lifted by the package's removal (synwatch.cli.uninstall)"


def _find_containers(names: Sequence[str]) -> None:
    """The containers' namespaces the history names ("docker:web1"), found as the service
    finds them, so that what it holds in a running container is lifted there too (one gone
    took it with it)."""
    wanted = {n for n in names if ":" in n or "#" in n}
    if wanted:
        for found in find_namespaces():
            if found.name in wanted and found.kind in ("container", "process"):
                bind(found.name, found.path, found.ident)


def where(netns: str) -> str:
    return f"in netns {netns}" if netns else "in the host's namespace"


def _gone(exc: CommandError) -> bool:
    """Did a command fail because what it reads is not there (a table, a set, the tool)?"""
    return any(s in exc.why for s in ("No such file or directory", "does not exist",
                                      "is not installed"))


@dataclass
class Uninstall:
    """One removal's work: ``store`` may be None (no history, or one that cannot be opened:
    the kernel is cleaned all the same)."""

    namespaces: Sequence[str]
    store: History | None = None
    say: Callable[[str], None] = print
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    presets: dict[str, Preset] = field(default_factory=load_presets)
    done: list[str] = field(default_factory=list)
    failed: int = 0

    def did(self, line: str) -> None:
        self.done.append(line)
        self.say(f"synwatch: {line}")

    def warn(self, text: str, *args: object) -> None:
        self.failed += 1
        log.warning(text, *args)

    def run(self) -> list[str]:
        named = list(dict.fromkeys(["", *self.namespaces]))
        _find_containers(named)
        here = [ns for ns in named if exists(ns)]
        for ns in named:
            if ns not in here:  # gone, and what it held with it
                for backend in BAN_BACKENDS:
                    self._forget(backend, ns, set(), set())
        tables = {ns: self._table(ns) for ns in here}
        for ns in here:
            if tables[ns] is not None:
                self._synproxy_off(ns)
        self._restore_settings()
        for ns in here:
            for backend in BAN_BACKENDS:
                if backend != "nftables" or tables[ns] is not None:
                    self._lift(self.presets[backend], ns, tables[ns])
            chains = (tables[ns] or (set(), set()))[0]
            for name in (SRCLIMIT, RATELIMIT):
                preset = self.presets[name]
                if preset.vars["chain"] in chains:
                    self._teardown(preset, ns, f"the rate-limit chain {preset.vars['chain']}")
            if ACCOUNTING in chains:
                try:
                    SynAccounting(ns).teardown()
                except CommandError as exc:
                    self.warn("cannot remove the SYN accounting chain %s: %s", where(ns), exc)
                else:
                    self.did(f"removed the SYN accounting chain {ACCOUNTING} and its sets "
                             f"(table inet {TABLE}) {where(ns)}")
        self._lift_paths(named)
        if not self.done and not self.failed:
            self.did("held no ban, rate limit or changed setting: nothing to lift")
        return self.done

    # -- what is there ------------------------------------------------------------------------

    def _table(self, netns: str) -> tuple[set[str], set[str]] | None:
        """The chains and sets of synwatch's nftables table; None where there is none."""
        try:
            listing = run(["nft", "-j", "list", "table", "inet", TABLE], netns=netns)
        except CommandError as exc:
            if not _gone(exc):
                self.warn("cannot read the nftables table inet %s %s: %s", TABLE,
                            where(netns), exc)
            return None
        try:
            objects = json.loads(listing).get("nftables", [])
        except (ValueError, AttributeError):
            objects = []
        chains = {o["chain"]["name"] for o in objects if isinstance(o, dict) and "chain" in o}
        sets = {o["set"]["name"] for o in objects if isinstance(o, dict) and "set" in o}
        return chains, sets

    # -- what it does -------------------------------------------------------------------------

    def _synproxy_off(self, netns: str) -> None:
        for port in sorted(proxied_ports(netns)):
            try:
                execute([render_off(port)], netns)
            except CommandError as exc:
                self.warn("cannot remove the SYNPROXY chains of port %d %s: %s", port,
                            where(netns), exc)
            else:
                self.did(f"removed the SYNPROXY chains of port {port} {where(netns)}")

    def _restore_settings(self) -> None:
        """This node's settings put back (a fleet's history holds every node's)."""
        if self.store is None:
            return
        try:
            saved = self.store.saved_settings()
        except SynwatchError as exc:
            self.warn("cannot read the settings to put back: %s", exc)
            return
        for netns, name, value in saved:
            if name not in (SYSCTL, LOOSE):  # the sysctls synwatch changes
                continue
            if not exists(netns):  # the namespace went, and its sysctls with it
                self._forget_setting(netns, name)
                continue
            try:
                write_sysctl(netns, name, int(value))
            except (OSError, SynwatchError, ValueError) as exc:
                self.warn("cannot put back %s=%s %s: %s", name, value, where(netns), exc)
                continue
            self.did(f"put back {name}={value} {where(netns)}")
            self._forget_setting(netns, name)

    def _forget_setting(self, netns: str, name: str) -> None:
        assert self.store is not None
        try:
            self.store.forget_setting(netns, name)
        except SynwatchError as exc:
            self.warn("cannot forget %s in the history: %s", name, exc)

    def _held(self, fw: Firewall) -> dict[str, int | None] | None:
        """What the backend holds, from its preset's own listing (per family: ufw lists both
        at once); None where it holds nothing at all (no table, no set, no tool)."""
        lister = fw.preset.lister
        assert lister is not None
        found: dict[str, int | None] = {}
        outputs: dict[tuple[str, ...], str | None] = {}
        for family in (4, 6):
            argv = lister.command.fill(fw.preset.values(fw.context(), family)).argv
            if argv not in outputs:
                try:
                    outputs[argv] = run(argv, netns=fw.netns)
                except CommandError as exc:
                    if not _gone(exc):
                        self.warn("cannot list the bans of %s %s: %s", fw.name,
                                  where(fw.netns), exc)
                    outputs[argv] = None
            text = outputs[argv]
            if text is not None:
                found.update(fw.preset.parse_list(text, family, 32 if family == 4 else 128))
        return found if any(o is not None for o in outputs.values()) else None

    def _lift(self, preset: Preset, netns: str,
              table: tuple[set[str], set[str]] | None) -> None:
        """Every ban the backend holds, lifted by its unban render; then its teardown."""
        fw = Firewall(preset, netns)
        if preset.name == "nftables":
            sets = {preset.family_vars[f]["set"] for f in (4, 6)}
            if table is None or not sets & table[1]:
                self._forget(preset.name, netns, set(), set())  # nothing of it is held
                return
        failed = self.failed
        held = self._held(fw)
        if held is None:
            if self.failed == failed:  # not there at all (no set, no tool): nothing is held
                self._forget(preset.name, netns, set(), set())
            return
        lifted: list[str] = []
        for prefix in sorted(held):
            try:
                fw.apply(fw.render_unban([prefix]))
            except CommandError as exc:
                self.warn("cannot lift the ban of %s (%s) %s: %s", prefix, preset.name,
                          where(netns), exc)
                continue
            lifted.append(prefix)
            self.did(f"lifted the ban of {prefix} ({preset.name}) {where(netns)}")
        self._forget(preset.name, netns, set(held) - set(lifted), set(lifted))
        if preset.steps.get("teardown"):
            self._teardown(preset, netns, f"the {preset.name} rules and sets")

    def _lift_paths(self, named: Sequence[str]) -> None:
        """Every table on the path to a bridged container, its bans lifted and then the table
        removed: in the namespaces the history recorded tables in, in the host's and in every
        `ip netns` one (where a table whose record was lost can be), never in a container's
        own (its processes could make one of that name)."""
        preset = self.presets[PATH_PRESET]
        lifted: set[str] = set()
        still: set[str] = set()
        records: list[str] = []
        if self.store is not None:
            try:
                records = [v for _, n, v in self.store.saved_settings() if n == PATH_SETTING]
            except SynwatchError as exc:
                self.warn("cannot read the tables in the history: %s", exc)
        every = find_namespaces()
        bridges = {place[0].ident for v in records if (place := recorded(v, every))}
        for found in every:
            if found.kind not in ("own", "netns") and found.ident not in bridges:
                continue
            try:
                listing = json.loads(run(["nft", "-j", "list", "tables"], netns=found.name))
            except (CommandError, ValueError):
                continue  # no nft, no table, a namespace gone meanwhile: nothing of ours
            for item in listing.get("nftables", []):
                table = item.get("table", {}) if isinstance(item, dict) else {}
                name = str(table.get("name", ""))
                if table.get("family") != "inet" or not name.startswith("synwatch_path_"):
                    continue
                fw = Firewall(preset, found.name, values=(("table", name),))
                held = self._held(fw) or {}
                try:
                    execute(fw.render_teardown(), found.name)
                except CommandError as exc:
                    self.warn("cannot remove table inet %s %s: %s", name, where(found.name),
                              exc)
                    still |= set(held)
                    continue
                for prefix in sorted(held):
                    self.did(f"lifted the ban of {prefix} ({PATH_PRESET}, table inet {name}) "
                             f"{where(found.name)}")
                lifted |= set(held)
                self.did(f"removed table inet {name}, the path to a container, "
                         f"{where(found.name)}")
        for ns in named:
            self._forget(PATH_PRESET, ns, still, lifted)
        if self.store is not None and not still:
            try:
                for ns, name, _ in self.store.saved_settings():
                    if name == PATH_SETTING:
                        self.store.forget_setting(ns, name)
            except SynwatchError as exc:
                self.warn("cannot forget the tables in the history: %s", exc)

    def _forget(self, backend: str, netns: str, still_held: set[str],
                lifted: set[str]) -> None:
        """The history's bans of this backend and namespace marked removed, but those still
        in the firewall (a failed unban): a reinstall must not put back what is not there.
        Those lifted now get an action run."""
        if self.store is None:
            return
        try:
            rows = [b for b in (self.store.active_bans(netns, self.now, backend)
                                + self.store.expired_bans(netns, self.now, backend))
                    if b.prefix not in still_held]
            self.store.mark_removed([b.id for b in rows], self.now)
            self.store.add_action_runs([
                ActionRun(incident_id=b.incident_id, action="unban", target=b.prefix,
                          status="done", at=self.now, detail=DETAIL)
                for b in rows if b.incident_id is not None and b.prefix in lifted])
        except SynwatchError as exc:
            self.warn("cannot mark the lifted bans removed in the history: %s", exc)

    def _teardown(self, preset: Preset, netns: str, what: str) -> None:
        commands = preset.render("teardown", {})
        try:
            execute(commands, netns)
        except CommandError as exc:
            self.warn("cannot remove %s %s: %s\n%s", what, where(netns), exc, show(commands))
        else:
            self.did(f"removed {what} {where(netns)}")


def note_namespaces(namespaces: Sequence[str], note: Path) -> None:
    """The namespaces other than the host's that the purge deletes the table in, one a line."""
    names = sorted({ns for ns in namespaces if ns and exists(ns)})
    if not names:
        return
    try:
        note.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        note.write_text("".join(f"{ns}\n" for ns in names))
    except OSError as exc:
        log.warning("cannot note the namespaces for the purge in %s: %s", note, exc)


def _watched_without_config(path: str | None) -> str:
    """watch.netns read from a file that does not pass as a configuration (a key unknown to
    this version, a typo): the removal still cleans the namespace it names."""
    if path is None:
        return ""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    watch = doc.get("watch")
    netns = watch.get("netns") if isinstance(watch, dict) else None
    return netns if isinstance(netns, str) and "/" not in netns else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synwatch.cli.uninstall",
                                     description="Lift what synwatch holds in the kernel and "
                                                 "put back what it raised (the package's prerm).")
    parser.add_argument("--note", type=Path, metavar="FILE",
                        help="write the watched namespaces here, for the purge to delete the "
                             "table in them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="synwatch: %(message)s")
    store: History | None = None
    namespaces: list[str] = []
    try:
        config = load_config(None)
    except SynwatchError as exc:
        log.warning("%s; cleaning the namespace it names without its history", exc)
        namespaces.append(_watched_without_config(config_location(None)))
    else:
        namespaces.append(config.netns)
        try:
            store = History.open_existing(config.storage_url, host=config.host, write=True)
            if store is not None:
                namespaces += sorted(store.namespaces())
        except SynwatchError as exc:
            log.warning("%s; lifting what the kernel holds without the history", exc)
    try:
        if args.note is not None:
            note_namespaces(namespaces, args.note)
        Uninstall(namespaces, store, say=lambda line: print(line, flush=True)).run()
    finally:
        if store is not None:
            store.close()
    return 0  # a removal must not fail on what it could not undo


if __name__ == "__main__":
    sys.exit(main())
