"""SYNPROXY for the flooded port while a spoofed flood lasts, on hosts that track connections.

A spoofed flood fills the connection-tracking table with one entry per forged source, and a
full table drops every new flow (docs/kernel.md §7). With this action (opt-in:
``[actions.synproxy] enabled = true`` and ``synproxy`` in the policy, e.g. ``spoofed =
["synproxy", "notify", "exec"]``) a listener whose incident is judged *spoofed* gets, in
synwatch's own table, the standard nftables SYNPROXY (wiki.nftables.org, "Synproxy"): its SYNs
``notrack``ed at raw priority, and in the input hook, before the admin's own filter chains,
the ``synproxy`` statement answering them with cookies, so only completed handshakes reach
conntrack and the socket. Each port has two chains of its own (``synproxy_raw_PORT``,
``synproxy_in_PORT``), so removing it is deleting them. ``nf_conntrack_tcp_loose`` must be 0
(an ACK that no SYN created must stay invalid for synproxy to see it): it is saved before it is
written and put back when the last port's flood ends, as ``tcp_syncookies`` is.

Before anything runs the action checks the namespace (nft's version, connection tracking,
``tcp_timestamps``, ``tcp_syncookies``) and has the kernel check the rules (``nft --check``),
and refuses with the reason. mss and wscale are the listener's own: wscale read from a
connection to it (TCP_INFO), mss from the MTU of the interface its clients come through.
"""

from __future__ import annotations

import re
import socket
import struct
from datetime import datetime

from synwatch.actions.registry import Action, ActionContext, Plan, skipped
from synwatch.config import Config
from synwatch.errors import CommandError
from synwatch.records import IncidentChange
from synwatch.system.netns import in_netns
from synwatch.system.runner import Command, execute, run, show
from synwatch.system.sysctl import sysctl_or_none, write_sysctl

TABLE = "synwatch"
LOOSE = "net.netfilter.nf_conntrack_tcp_loose"
MIN_NFT = (0, 9, 2)  # the synproxy statement (nftables 0.9.2, kernel 5.3)


def render_on(port: int, mss: int, wscale: int) -> Command:
    chains = (f"add chain inet {TABLE} synproxy_raw_{port} "
              "{ type filter hook prerouting priority raw; policy accept; }\n"
              f"add chain inet {TABLE} synproxy_in_{port} "
              "{ type filter hook input priority filter - 1; policy accept; }\n")
    return Command(("nft", "-f", "-"), f"add table inet {TABLE}\n" + chains
                   + f"flush chain inet {TABLE} synproxy_raw_{port}\n"
                   f"flush chain inet {TABLE} synproxy_in_{port}\n"
                   f"add rule inet {TABLE} synproxy_raw_{port} tcp dport {port} "
                   "tcp flags & (syn|ack) == syn notrack\n"
                   f"add rule inet {TABLE} synproxy_in_{port} tcp dport {port} "
                   f"ct state invalid,untracked synproxy mss {mss} wscale {wscale} "
                   "timestamp sack-perm\n"
                   f"add rule inet {TABLE} synproxy_in_{port} tcp dport {port} "
                   "ct state invalid drop\n")


def render_off(port: int) -> Command:
    return Command(("nft", "-f", "-"), f"delete chain inet {TABLE} synproxy_raw_{port}\n"
                                       f"delete chain inet {TABLE} synproxy_in_{port}\n")


def table_is_empty(listing: str) -> bool:
    return "chain " not in listing and "set " not in listing


def proxied_ports(netns: str) -> set[int]:
    """Ports with synwatch's SYNPROXY chains now (after a restart: what to reconcile)."""
    try:
        listing = run(["nft", "list", "table", "inet", TABLE], netns=netns)
    except CommandError:
        return set()  # no table of ours
    return {int(p) for p in re.findall(r"chain synproxy_in_(\d+) ", listing)}


def listener_wscale(netns: str, address: str | None, port: int, family: int | None) -> int:
    """The window scale the listener advertises: a connection to it from inside the namespace,
    read back with TCP_INFO (tcpi_snd_wscale, the low nibble of its seventh byte)."""
    v6 = family == 6
    wildcard = address is None or address in ("::", "0.0.0.0")  # noqa: S104 - a listener's
    target = ("::1" if v6 else "127.0.0.1") if wildcard else address

    def measure() -> int:
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET) as s:
            s.settimeout(3)
            s.connect((target, port))
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(struct.unpack_from("B", info, 6)[0] & 0x0F)

    return in_netns(netns, measure)


def client_mss(netns: str, family: int | None, toward: str) -> int:
    """The mss the listener advertises to clients: the MTU of the interface the route to them
    leaves by, less the IP and TCP headers."""
    route = run(["ip", "-o", "route", "get", toward], netns=netns)
    dev = re.search(r" dev (\S+)", route)
    if dev is None:
        raise CommandError("ip route get", f"no interface toward {toward}")
    link = run(["ip", "-o", "link", "show", "dev", dev.group(1)], netns=netns)
    mtu = re.search(r" mtu (\d+)", link)
    if mtu is None:
        raise CommandError("ip link show", f"no MTU for {dev.group(1)}")
    return int(mtu.group(1)) - (60 if family == 6 else 40)


def preflight(netns: str, change: IncidentChange) -> str | None:
    """Why SYNPROXY cannot run here, or None."""
    try:
        version = run(["nft", "--version"])
    except CommandError as exc:
        return f"nft is not usable: {exc.why}"
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", version)
    if found is None or tuple(int(x) for x in found.groups()) < MIN_NFT:
        return f"nftables {found.group(0) if found else version.strip()} has no synproxy " \
               "statement (0.9.2 and later)"
    if sysctl_or_none(netns, "net.netfilter.nf_conntrack_count") is None:
        return "connection tracking does not run here: there is no table for the flood to " \
               "fill, and SYN cookies alone answer it"
    if sysctl_or_none(netns, "net.ipv4.tcp_timestamps") != 1:
        return "net.ipv4.tcp_timestamps is off: without timestamps SYNPROXY loses window " \
               "scaling and SACK for every connection"
    if (sysctl_or_none(netns, "net.ipv4.tcp_syncookies") or 0) < 1:
        return "net.ipv4.tcp_syncookies is 0 (the syncookies action turns it on)"
    if change.port is None:
        return "the flood's port is not known"
    return None


class SynproxyAction(Action):
    name = "synproxy"
    per_incident = True  # chosen in [actions.policy]; it acts on spoofed incidents only
    order = 20  # after syncookies, before bans and messages

    def __init__(self, ctx: ActionContext) -> None:
        super().__init__(ctx)
        self.active: dict[int, int] = {}  # port -> the incident it is for
        self.refused: set[tuple[int, int | None]] = set()  # (port, incident): said once

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.synproxy.enabled

    def _where(self) -> str:
        return f"netns {self.ctx.netns}" if self.ctx.netns else "this host"

    def start(self) -> list[Plan]:
        """After a restart: chains whose flood is not known to be on are removed (an open
        spoofed incident puts its own back at its next update), and tcp_loose put back."""
        plans = [self._off(port, None) for port in sorted(proxied_ports(self.ctx.netns))]
        saved = self.ctx.store.saved_setting(self.ctx.netns, LOOSE)
        if not plans and saved is not None:  # a crash after the chains went
            plans.append(Plan(self.name, LOOSE, f"sysctl -w {LOOSE}={saved}  # in "
                              f"{self._where()}, the value before the flood",
                              lambda: self._disengage(None, saved)))
        return plans

    def on_change(self, change: IncidentChange) -> list[Plan]:
        port, inc = change.port, change.incident_id
        if change.change == "closed":
            if port in self.active and self.active[port] == inc:
                return [self._off(port, inc)]
            return []
        # Once on, it stays on until the incident closes: SYNPROXY itself changes the evidence
        # (the listener sees no forged SYN any more, real clients complete), so the verdict
        # that follows is no reason to take it off mid-flood.
        if change.verdict != "spoofed":
            return []
        if port is None or port in self.active or (port, inc) in self.refused:
            return []
        self.refused.add((port, inc))  # one try per flood; the outcome says why not
        why = preflight(self.ctx.netns, change)
        if why is not None:
            return [skipped(self.name, f"port {port}", f"not applied: {why}", inc)]
        try:
            toward = change.top_prefixes[0][0].split("/")[0] if change.top_prefixes else \
                ("2001:db8::1" if change.family == 6 else "192.0.2.1")
            mss = client_mss(self.ctx.netns, change.family, toward)
            wscale = listener_wscale(self.ctx.netns, change.address, port, change.family)
        except (CommandError, OSError) as exc:
            return [skipped(self.name, f"port {port}", f"not applied: cannot measure the "
                                                       f"listener's mss and wscale: {exc}", inc)]
        command = render_on(port, mss, wscale)
        try:  # the kernel checks the rules (module, syntax) and changes nothing
            execute([Command(("nft", "--check", "-f", "-"), command.stdin)], self.ctx.netns)
        except CommandError as exc:
            return [skipped(self.name, f"port {port}", f"not applied: the kernel refuses the "
                                                       f"rules: {exc.why}", inc)]
        self.active[port] = inc or 0
        loose = sysctl_or_none(self.ctx.netns, LOOSE)
        rendered = show([command]) + (f"\nsysctl -w {LOOSE}=0  # in {self._where()}, was "
                                      f"{loose}; put back when the last flood ends"
                                      if loose else "")
        return [Plan(self.name, f"port {port}", rendered,
                     lambda: self._engage(command, loose), inc)]

    def tick(self, now: datetime) -> list[Plan]:
        """A port whose incident closed while its verdict was not spoofed any more (the
        responder calls on_change per verdict) still has its chains: removed here."""
        return [self._off(port, inc) for port, inc in list(self.active.items())
                if inc not in self.ctx.open]

    def _engage(self, command: Command, loose: int | None) -> str:
        store, netns = self.ctx.store, self.ctx.netns
        if loose and store.saved_setting(netns, LOOSE) is None:
            store.save_setting(netns, LOOSE, str(loose), self.ctx.clock.now())
            write_sysctl(netns, LOOSE, 0)
        execute([command], netns)
        return "SYNPROXY on" + (f", {LOOSE} {loose} -> 0" if loose else "")

    def _off(self, port: int, incident_id: int | None) -> Plan:
        self.active.pop(port, None)
        others = list(self.active)
        saved = self.ctx.store.saved_setting(self.ctx.netns, LOOSE)
        rendered = show([render_off(port)]) + (
            f"\nsysctl -w {LOOSE}={saved}  # in {self._where()}, the value before the flood"
            if saved is not None and not others else "")
        return Plan(self.name, f"port {port}", rendered,
                    lambda: self._disengage(port, None if others else saved), incident_id)

    def _disengage(self, port: int | None, saved: str | None) -> str:
        if port is not None:
            try:
                execute([render_off(port)], self.ctx.netns)
            except CommandError as exc:
                if "No such file or directory" not in exc.why:  # gone already (a flush)
                    raise
            self._drop_empty_table()
        if saved is not None:
            write_sysctl(self.ctx.netns, LOOSE, int(saved))
            self.ctx.store.forget_setting(self.ctx.netns, LOOSE)
        return "SYNPROXY off" + (f", {LOOSE} -> {saved}" if saved is not None else "")

    def _drop_empty_table(self) -> None:
        """The table is synwatch's: left without chains or sets (no bans, no accounting), it
        goes too, so the ruleset is as it was before the flood."""
        try:
            listing = run(["nft", "list", "table", "inet", TABLE], netns=self.ctx.netns)
        except CommandError:
            return
        if table_is_empty(listing):
            run(["nft", "delete", "table", "inet", TABLE], netns=self.ctx.netns)
