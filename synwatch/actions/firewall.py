"""A ban backend: one preset (nftables, ufw, iptables-ipset) rendered for one namespace and ban
granularity. Everything it does is rendered first (``render_*``), then run through the runner."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from synwatch.actions.presets import Preset, merge_batches
from synwatch.probes.accounting import mask
from synwatch.system.runner import Command, execute, run


@dataclass(frozen=True, slots=True)
class BanItem:
    prefix: str
    seconds: int = 0
    comment: str = "synwatch"

    def fields(self) -> dict[str, Any]:
        # rendered from the numbers, never from the text: an IPv6 scope ("%...") that ipaddress
        # accepts and keeps must not reach a firewall command
        parsed = ipaddress.ip_network(self.prefix)
        net = type(parsed)((int(parsed.network_address), parsed.prefixlen))
        return {"family": net.version, "prefix": str(net),
                "address": str(net.network_address), "seconds": self.seconds,
                "comment": safe_comment(self.comment)}


COMMENT_MAX = 100  # nft keeps an element's comment in its userdata (at most 128 bytes)


def safe_comment(text: str) -> str:
    """A comment that can stand in quotes in an nft script or a ufw argument: a fleet copy's
    comment names another node, and a row written by anyone must not end the quotes."""
    return re.sub(r"[^A-Za-z0-9 ._:/#-]", "_", text)[:COMMENT_MAX]


@dataclass(frozen=True, slots=True)
class Firewall:
    preset: Preset
    netns: str = ""
    v4_len: int = 24
    v6_len: int = 64
    # the preset's vars chosen here (a bridge path's table and container: nftables-path)
    values: tuple[tuple[str, str], ...] = ()
    # the addresses the bans guard, per family (a bridge path's: the container's own)
    destinations: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def name(self) -> str:
        return self.preset.name

    def context(self) -> dict[str, Any]:
        """Values a preset may use besides its own vars: the ban granularity's masks."""
        return {"mask4": mask(4, self.v4_len), "mask6": mask(6, self.v6_len),
                **dict(self.values)}

    def render_setup(self) -> list[Command]:
        items = [{"family": family, "addresses": ", ".join(addresses)}
                 for family, addresses in self.destinations if addresses]
        return merge_batches(self.preset.render("setup", self.context())
                             + self.preset.render("destinations", self.context(), items))

    def render_teardown(self) -> list[Command]:
        return self.preset.render("teardown", self.context())

    def render_ban(self, items: Sequence[BanItem]) -> list[Command]:
        return self.preset.render("ban", self.context(), [i.fields() for i in items])

    def render_unban(self, prefixes: Sequence[str]) -> list[Command]:
        return self.preset.render("unban", self.context(),
                                  [BanItem(p).fields() for p in prefixes])

    def apply(self, commands: Sequence[Command]) -> None:
        execute(commands, self.netns)

    def listed(self) -> dict[str, int | None]:
        """What the firewall holds now: prefix -> seconds left (None: no kernel timeout)."""
        assert self.preset.lister is not None
        found: dict[str, int | None] = {}
        outputs: dict[tuple[str, ...], str] = {}  # ufw lists both families in one status
        for family, length in ((4, self.v4_len), (6, self.v6_len)):
            argv = self.preset.lister.command.fill(self.preset.values(self.context(), family)).argv
            if argv not in outputs:
                outputs[argv] = run(argv, netns=self.netns)
            found.update(self.preset.parse_list(outputs[argv], family, length))
        return found
