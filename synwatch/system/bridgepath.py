"""The host's path to a bridged container: the namespace that holds the other end of its veth.

A container on a bridge (Docker's docker0 and user networks, podman's, a CNI bridge) reaches the
world through a veth whose other end is a port of the bridge, in the namespace that routes for it
(the host's, or the one dockerd runs in). Traffic to the container is routed there and passes its
forward hook first, with the container's own address as its destination (after a published
port's DNAT), so a ban placed there (synwatch.actions.firewall, preset ``nftables-path``) stops a
flood before the container, in a table its processes cannot touch.

Which namespace that is, the kernel says exactly: the container's veth carries the other end's
``link_netnsid``, an id that only means something inside the container's namespace, and asking
the kernel from in there for the id of a candidate namespace (RTM_GETNSID with NETNSA_FD,
net/core/net_namespace.c ``rtnl_net_getid``) names the one it is. The other end must then be
the veth's peer (its ifindex and back-link) and a bridge port, or there is no path.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from synwatch.errors import CommandError, ProbeError
from synwatch.system import netns
from synwatch.system.netns import NsId
from synwatch.system.netnsfind import FoundNamespace, ident_text
from synwatch.system.runner import run

log = logging.getLogger("synwatch")

# include/uapi/linux/rtnetlink.h and net_namespace.h
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
SETTING = "ban.path"  # the history's record of a container's table, under the container's name
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class BridgePath:
    netns: str  # the namespace that routes for the container ("" our own), as synwatch names it
    ident: NsId
    bridge: str  # docker0, br-1a2b3c4d5e6f, cni0, ...
    port: str  # the veth's end on the bridge
    addresses4: tuple[str, ...]  # the container's own addresses on its links to that namespace
    addresses6: tuple[str, ...]
    container_inode: int = 0  # the container's namespace: its table's name
    nsid: int = 0  # the id the container's namespace gives the bridge's (its veths' link_netnsid)

    @property
    def table(self) -> str:
        return f"synwatch_path_{self.container_inode}"

    def describe(self) -> str:
        where = f"netns {self.netns}" if self.netns else "this host"
        return f"{where}, bridge {self.bridge} (port {self.port})"


def nsid_request(target_fd: int, seq: int = 1) -> bytes:
    """RTM_GETNSID for the namespace behind ``target_fd``: struct rtgenmsg (one byte, padded
    to four) and a NETNSA_FD attribute."""
    body = b"\0\0\0\0" + _ATTR.pack(8, NETNSA_FD) + struct.pack("=I", target_fd)
    return _HEADER.pack(_HEADER.size + len(body), RTM_GETNSID, NLM_F_REQUEST, seq, 0) + body


def parse_nsid(reply: bytes) -> int | None:
    """The NETNSA_NSID of an RTM_NEWNSID reply; None for an error or no id assigned (-1)."""
    if len(reply) < _HEADER.size:
        return None
    length, kind, _, _, _ = _HEADER.unpack_from(reply)
    if kind != RTM_NEWNSID or length > len(reply):
        return None
    at = _HEADER.size + 4
    while at + _ATTR.size <= length:
        size, attr = _ATTR.unpack_from(reply, at)
        if size < _ATTR.size or at + size > length:
            return None
        if attr == NETNSA_NSID and size >= 8:
            (nsid,) = struct.unpack_from("=i", reply, at + _ATTR.size)
            return nsid if nsid >= 0 else None
        at += (size + 3) & ~3
    return None


def nsid_of(target_fd: int) -> int | None:
    """The id the calling thread's namespace gives the one behind ``target_fd``."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:  # NETLINK_ROUTE
        s.settimeout(2.0)
        s.send(nsid_request(target_fd))
        return parse_nsid(s.recv(4096))


def links_of(text: str) -> list[dict[str, Any]]:
    """The links of `ip -j -d addr show`'s output; a ValueError when it is not JSON, and
    nothing of what is not a list of objects."""
    parsed = json.loads(text or "[]")
    return [e for e in parsed if isinstance(e, dict)] if isinstance(parsed, list) else []


def _links(name: str) -> list[dict[str, Any]]:
    return links_of(run(["ip", "-j", "-d", "addr", "show"], netns=name))


def _open(found: FoundNamespace) -> int | None:
    try:
        return netns.open_nsfs(found.name, found.path, found.ident)
    except ProbeError:  # gone since it was found, or another namespace on its path now
        return None


def _addresses(link: dict[str, Any], family: str) -> tuple[str, ...]:
    found = link.get("addr_info")
    return tuple(str(a["local"]) for a in (found if isinstance(found, list) else [])
                 if isinstance(a, dict) and a.get("family") == family
                 and a.get("scope") == "global" and a.get("local"))


def addresses_of(links: list[dict[str, Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The links' own global addresses, IPv4 and IPv6."""
    return (tuple(a for link in links for a in _addresses(link, "inet")),
            tuple(a for link in links for a in _addresses(link, "inet6")))


def veths_of(links: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The veths whose other end is in another namespace, with an IPv4 address."""
    return [link for link in links
            if isinstance(link.get("linkinfo"), dict)
            and link["linkinfo"].get("info_kind") == "veth"
            and isinstance(link.get("link_netnsid"), int)
            and isinstance(link.get("link_index"), int) and _addresses(link, "inet")]


def _veths(container: str) -> list[dict[str, Any]]:
    return veths_of(_links(container))


def addresses_toward(container: str, nsid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The container's addresses now on its links to the namespace it calls ``nsid`` (they
    change with `docker network connect`/`disconnect`)."""
    links = [link for link in _veths(container) if link["link_netnsid"] == nsid]
    return addresses_of(links)


def find_path(container: str, container_inode: int,
              candidates: Iterable[FoundNamespace]) -> BridgePath | None:
    """The bridge path of namespace ``container`` (a synwatch name it can be entered by) among
    ``candidates`` (the namespaces found on the host, ours included); None when none of its
    veths ends on a bridge in one of them. The bans guard every address the container has on
    its links to that namespace (a container on two networks of one host has two). A command
    that fails is a CommandError."""
    veths = _veths(container)
    if not veths:
        return None
    wanted = {link["link_netnsid"] for link in veths}
    fds: list[tuple[FoundNamespace, int]] = []
    try:
        for found in candidates:
            fd = _open(found)
            if fd is not None:
                fds.append((found, fd))

        def ask() -> dict[int, FoundNamespace]:
            ids: dict[int, FoundNamespace] = {}
            for found, fd in fds:
                nsid = nsid_of(fd)
                if nsid is not None and nsid in wanted and nsid not in ids:
                    ids[nsid] = found
            return ids

        try:
            by_nsid = netns.visit(container, ask)
        except (ProbeError, OSError) as exc:
            raise CommandError(f"RTM_GETNSID in netns {container}", str(exc)) from exc
    finally:
        for _, fd in fds:
            os.close(fd)
    for link in veths:
        nsid = link["link_netnsid"]
        peer_ns = by_nsid.get(nsid)
        if peer_ns is None:
            continue
        if peer_ns.kind in ("container", "process"):
            netns.bind(peer_ns.name, peer_ns.path, peer_ns.ident)
        for peer in _links(peer_ns.name):
            if (peer.get("ifindex") == link["link_index"]
                    and peer.get("link_index") == link.get("ifindex")
                    and isinstance(peer.get("linkinfo"), dict)
                    and peer["linkinfo"].get("info_slave_kind") == "bridge"
                    and peer.get("master")):
                v4, v6 = addresses_of([v for v in veths if v["link_netnsid"] == nsid])
                return BridgePath(peer_ns.name, peer_ns.ident, str(peer["master"]),
                                  str(peer.get("ifname", "?")), v4, v6, container_inode, nsid)
    return None


def owner_key(found: FoundNamespace) -> str:
    """What tells two containers apart on one reused nsfs inode (the kernel hands out the
    lowest free one): the runtime's container id, else the process."""
    return found.owner.container_id if found.owner else f"pid:{found.pid}"


def record(container: FoundNamespace, path: BridgePath) -> str:
    """How the history remembers a container's table (the setting ``ban.path``)."""
    return json.dumps({"container": ident_text(container.ident), "owner": owner_key(container),
                       "bridge": ident_text(path.ident), "table": path.table})


def same_container(saved: str, live: FoundNamespace | None) -> bool:
    """Is the remembered table ``live``'s (not a namespace gone, nor another container on its
    name or its inode)?"""
    try:
        doc = json.loads(saved)
        return (live is not None and doc.get("container") == ident_text(live.ident)
                and doc.get("owner") == owner_key(live))
    except (ValueError, AttributeError):
        return False


def recorded(saved: str, seen: Iterable[FoundNamespace]) -> tuple[FoundNamespace, str] | None:
    """Where a remembered table is: its bridge's namespace (bound to its name, to be entered)
    and the table's name; None when that namespace went (a reboot, dockerd's own namespace
    gone) or the record is not one."""
    try:
        doc = json.loads(saved)
        bridge, table = str(doc["bridge"]), str(doc["table"])
    except (ValueError, KeyError, TypeError):
        return None
    found = next((f for f in seen if ident_text(f.ident) == bridge), None)
    if found is None or not table.startswith("synwatch_path_"):
        return None
    if found.kind in ("container", "process"):
        netns.bind(found.name, found.path, found.ident)
    return found, table
