"""The settings schema: every key with its validator, default and help text. Parsing
(synwatch/config/__init__.py) applies it; scripts/settings_docs.py writes the key table of
docs/configuration.md and the default file from it. Validators are pure: no file, no import
of what they name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synwatch.config.types import (
    DEFAULT_POLICY,
    EXEC_CHANGES,
    VERDICTS,
    Thresholds,
)
from synwatch.config.validators import (
    actions_for,
    argv,
    auto_or_bool,
    ban_backend,
    ban_bridged,
    ban_scope,
    ban_timeout,
    boolean,
    duration,
    exec_on,
    factor,
    fraction,
    host_globs,
    host_name,
    int_in,
    keep_for,
    listen_address,
    log_files,
    netns_choice,
    networks,
    notify_urls,
    password_file,
    ports,
    reconcile_period,
    state_dir_path,
    storage_url,
    upto_1d,
    upto_1h,
)

_DEFAULTS = Thresholds()


@dataclass(frozen=True, slots=True)
class Setting:
    """One key: how its value is checked, its default, and what it means (the key table of
    docs/configuration.md and the default file, packaging/synwatch.toml, are generated from these:
    `python scripts/settings_docs.py --write`, checked by tests/test_docs.py)."""

    validate: Callable[[Any], Any]
    default: Any
    help: str


def _s(validate: Callable[[Any], Any], default: Any, help_text: str) -> Setting:
    return Setting(validate, default, help_text)


_POLICY_HELP = {
    "capacity": "the actions a *capacity* incident runs",
    "concentrated": "... a *concentrated* one (the only verdict that may ban)",
    "spoofed": "... a *spoofed* one",
    "unknown": "... one with no verdict yet",
}

# section -> key -> Setting. The keys are an interface: scripts and tests outside rely on them.
SCHEMA: dict[str, dict[str, Setting]] = {
    "storage": {
        "url": _s(storage_url, "",
                  '`sqlite:///PATH` or `postgresql+psycopg://...` (the two histories '
                  'synwatch is built and tested on); `""` = `/var/lib/synwatch/synwatch.db` (root) '
                  "or `$XDG_STATE_HOME/synwatch/synwatch.db` (`~/.local/state/...`); "
                  '`"postgresql+psycopg://user@db.example/synwatch"` shares one history '
                  "with a fleet"),
        "password_file": _s(password_file, "", "a file whose first line is the database "
                            "password, put into `storage.url` (which then must have none; not "
                            "for SQLite); keep it readable by root only. A relative path is in "
                            "`$CREDENTIALS_DIRECTORY` when systemd sets it (`LoadCredential=`), "
                            'else in the configuration file\'s directory; `""` = none'),
        "host": _s(host_name, "", 'this node\'s name in the history; `""` = the hostname (two '
                   "nodes on one machine need two names)"),
        "state_dir": _s(state_dir_path, "", 'where the status file and the spool live; `""` = '
                        "next to an SQLite history, else `/var/lib/synwatch` (root) or "
                        "`$XDG_STATE_HOME/synwatch`"),
        "spool_max": _s(int_in(100, 10_000_000), 100_000,
                        "records spooled while the history cannot be written (a database "
                        "server away; an SQLite file locked, full, read-only or deleted), "
                        "replayed in order when it can be; also at most 32 MiB. Past either, "
                        "kernel lines wait in their source and an incident's updates are "
                        "thinned; openings, closings, actions and bans are always kept"),
    },
    "storage.retention": {
        "events": _s(keep_for, "90d", 'kernel events older than this are pruned; `"forever"` '
                     "keeps them"),
        "incidents": _s(keep_for, "forever", "closed incidents (with their timelines and action "
                        "runs) older than this are pruned"),
    },
    "sources": {
        "journald": _s(auto_or_bool, "auto",
                       '`"auto"` | `true` | `false`; auto = when journald runs '
                       "(`/run/systemd/journal/socket`) and has journal files"),
        "files": _s(log_files, [], 'syslog files to follow, e.g. `["/var/log/syslog"]`; never '
                    "trusted (any user can write kernel-like lines to them)"),
        "kmsg": _s(auto_or_bool, "auto", "`/dev/kmsg`; auto = when there is no journal and it is "
                   "readable"),
    },
    "watch": {
        "netns": _s(netns_choice, "",
                    'where to probe and act: `""` = our own namespace; an `ip netns` name; '
                    '`"*"` = every network namespace of the host (each container\'s, followed as '
                    "they come and go); or a list of names and globs "
                    '(`["", "docker:*", "k8s:shop/*"]`)'),
    },
    "incident": {
        "quiet_period": _s(duration, "60s", "an incident closes after this long without "
                           "kernel evidence"),
        "probe_interval": _s(upto_1h, "1s", "how often counters, listeners and SYN-RECV "
                             "sockets are read (at least `0.1s`; while no segment comes in, "
                             "the counters alone)"),
        "open_rate": _s(int_in(1, 10_000_000), _DEFAULTS.open_rate,
                        "SYNs/s finding a full SYN queue, or accept-queue overflows/s, that open "
                        "an incident with no log line (the kernel logs once per socket)"),
        "accounting": _s(auto_or_bool, "auto",
                         "count SYNs per source prefix and port in an nftables "
                         "set (`table inet synwatch`, chain `account`); auto = nft installed, "
                         "root, and `dry_run` off"),
        "sampler": _s(auto_or_bool, "auto",
                      "sample inbound SYNs on a packet socket with a BPF filter "
                      "(1 in N, N following the rate; no firewall rule, works in dry run and "
                      "with `tcp_syncookies=2`); auto = when a packet socket can be opened (root "
                      "or `CAP_NET_RAW`); `true` warns when it cannot"),
        "half_open_min": _s(int_in(1, 65535), _DEFAULTS.half_open_min,
                            "SYN-RECV at or above this (or a quarter of the backlog, if more) "
                            "..."),
        "half_open_for": _s(upto_1d, "10s", "... for this long, with most requests never "
                            "completing, opens a `half_open` incident (a slow flood that never "
                            "overflows)"),
        "verdict_window": _s(upto_1d, "10s", "the recent evidence a verdict follows; a "
                             "different confident verdict there starts a new phase"),
    },
    "verdict": {
        "capacity_completion": _s(fraction, _DEFAULTS.capacity_completion,
                                  "share of overflowing SYNs that completed a handshake (SYN "
                                  "cookies received / sent) at or above which the load is real "
                                  "(*capacity*)"),
        "spoofed_completion": _s(fraction, _DEFAULTS.spoofed_completion,
                                 "at or below this, with sources spread thin, the flood is "
                                 "*spoofed*"),
        "concentrated_prefixes": _s(int_in(1, 64), _DEFAULTS.concentrated_prefixes,
                                    'how many prefixes "a few" is'),
        "concentrated_share": _s(fraction, _DEFAULTS.concentrated_share,
                                 "share of SYNs those few must carry for *concentrated* (its "
                                 "lower 95% Wilson bound, from the sample size)"),
        "spoofed_min_prefixes": _s(int_in(2, 65536), _DEFAULTS.spoofed_min_prefixes,
                                   'how many prefixes "spread thin" is (estimated from those '
                                   "sampled once and twice: Chao1)"),
        "ipv4_prefix": _s(int_in(8, 32), _DEFAULTS.ipv4_prefix,
                          "prefix length of IPv4 sources (and of bans)"),
        "ipv6_prefix": _s(int_in(16, 128), _DEFAULTS.ipv6_prefix,
                          "prefix length of IPv6 sources (and of bans)"),
    },
    "allowlist": {
        "networks": _s(networks, [], "CIDRs never banned (loopback and our own addresses "
                       "never are)"),
    },
    "actions": {
        # a dry run unless the file says otherwise: a minimal /etc/synwatch/synwatch.toml must
        # not change sysctls and the firewall (the embedded default says so too)
        "dry_run": _s(boolean, True, "render and log actions, change nothing (also when the key "
                      "is missing); `run` warns when it is `false`"),
    },
    "actions.policy": {v: _s(actions_for(v), DEFAULT_POLICY[v], _POLICY_HELP[v])
                       for v in VERDICTS},
    "actions.syncookies": {
        "enabled": _s(boolean, True, "keep `tcp_syncookies` >= 1 during an incident, restore "
                      "after"),
    },
    "actions.synproxy": {
        "enabled": _s(boolean, False, "opt-in, with `synproxy` in a verdict's policy (e.g. "
                      '`spoofed = ["synproxy", "notify", "exec"]`): while a *spoofed* flood '
                      "lasts on a host that tracks connections, SYNPROXY for its port (nftables "
                      "`notrack` + `synproxy`, "
                      "`nf_conntrack_tcp_loose=0`), removed when it ends"),
    },
    "actions.ban": {
        "enabled": _s(boolean, True, "ban source prefixes of *concentrated* incidents, only "
                      "from kernel-side evidence"),
        "backend": _s(ban_backend, "nftables", '`"nftables"` | `"ufw"` | `"iptables-ipset"` '
                      "(presets in `actions/`)"),
        "duration": _s(ban_timeout, "1h", "the first ban of a prefix"),
        "increment": _s(factor, 2, "each later ban of the same prefix lasts this many times "
                        "longer ..."),
        "max_duration": _s(ban_timeout, "7d", "... up to this"),
        "max_per_incident": _s(int_in(1, 4096), 8, "cap on prefixes banned for one incident"),
        "max_total": _s(int_in(1, 1_000_000), 256, "cap on active bans"),
        "min_share": _s(fraction, 0.05, "a block carrying less of the flood's SYNs on its "
                        "own is not banned (never a target for being among the busiest)"),
        "coverage": _s(fraction, 0.95, "blocks are banned, busiest first, until they hold "
                       "this share of the flood's SYNs from sources that never complete a "
                       "handshake"),
        "widest_v4": _s(int_in(8, 32), _DEFAULTS.widest_v4,
                        "IPv4 prefixes that fill a larger block (four /24s of a /22) are banned "
                        "as that block, never wider than this"),
        "widest_v6": _s(int_in(16, 128), _DEFAULTS.widest_v6,
                        "the same for IPv6"),
        "scope": _s(ban_scope, "local", '`"fleet"`: a ban decided on one node is copied by '
                    "every node sharing the history (within about a second: each node reads the "
                    "fleet's changes), each within its own allowlist, caps and "
                    "`max_duration`; `unban` on any node lifts it everywhere"),
        "fleet_from": _s(host_globs, ["*"], "the nodes whose fleet bans this node copies: "
                         'names or globs (`["web*", "db1"]`) of `storage.host`; `["*"]` = every '
                         "node of the fleet, `[]` = none. Every row read is checked like a log "
                         "line (its prefix, times, host, scope) and every copy obeys this "
                         "node's own guards (allowlist, own addresses, `widest_v4`/`widest_v6`, "
                         "multicast, loopback, link-local, unspecified, reserved and "
                         "v4-mapped/compatible ranges, `max_total`, `max_per_incident`, "
                         "`max_duration`); a refusal is logged and counted "
                         "(`synwatch_fleet_refused_total`), not stored"),
        "bridged": _s(ban_bridged, "path", "where a bridged container's bans go when "
                      '`watch.netns` takes containers and `backend = "nftables"`: `"path"`, '
                      "on the host's path to it (a table of its own in the namespace of its "
                      "bridge, forward hook, matching its own addresses: its processes cannot "
                      'lift it and it needs no nft inside); `"inside"`, in its own namespace. '
                      "A container on no bridge (host or macvlan networking, a pod's CNI "
                      "without one) is banned inside whatever this says"),
        "reconcile": _s(reconcile_period, "60s", "how often every active ban is checked in the "
                        "kernel (present, at its prefix length, with the time left the history "
                        "says) and a drifted one put back"),
    },
    "actions.ratelimit": {
        "enabled": _s(boolean, False, "opt-in per-source SYN rate limit (nftables)"),
        "rate": _s(int_in(1, 1_000_000), 100, "new connections a minute from one address ..."),
        "burst": _s(int_in(1, 1_000_000), 50, "... after a burst of this many (browsers open "
                    "~6 connections per site, crawlers a few dozen) ..."),
        "hold": _s(ban_timeout, "5m", "... above which its SYNs are dropped for this long"),
        "ports": _s(ports, [], "TCP ports it applies to; `[]` = all"),
    },
    "actions.notify": {
        "enabled": _s(boolean, False, "send notifications"),
        "urls": _s(notify_urls, [], "apprise URLs (`mailto://`, `json://`, `slack://`, "
                   "`tgram://`, ...)"),
        "interval": _s(upto_1d, "10m", "at most one update per incident this often (besides "
                       "opened and closed)"),
        "timeout": _s(upto_1h, "10s", "per message: a dead mail server cannot hold synwatch "
                      "longer"),
        "retry": _s(upto_1d, "30s", "first retry of a failed message, doubling after"),
        # retry * 2**(attempts - 2) must stay a timedelta: 1d * 2**18 is 718 years
        "attempts": _s(int_in(1, 20), 5, "tries per message"),
        "picture": _s(boolean, True, "attach the incident's picture (a PNG: SYNs a second, "
                      "SYN-RECV against the backlog, cookies sent and validated, phases, "
                      "cookies and bans marked) where the service takes attachments, and say "
                      "how to see it where it takes none; needs the charts extra (Debian: "
                      "python3-matplotlib), without which messages are text"),
    },
    "actions.exec": {
        "enabled": _s(boolean, False, "run a program on incident changes"),
        "argv": _s(argv, [], 'its argv, absolute path first, no shell (e.g. '
                   '`["/usr/local/bin/on-synflood"]`); run with `SYNWATCH_*` variables'),
        "on": _s(exec_on, list(EXEC_CHANGES), "which changes run it"),
        "timeout": _s(upto_1d, "30s", "after which it is killed and the run recorded as "
                      "failed"),
    },
    "metrics": {
        "listen": _s(listen_address, "", '`"127.0.0.1:9851"` serves Prometheus text at `/metrics`; '
                     '`""` = off'),
    },
}

# What a section is about, above its keys in the default file.
SECTION_HELP = {
    "incident": "When an incident opens and closes, and what is read while it lasts.",
    "verdict": "How an incident is judged (docs/incidents.md): capacity, "
               "concentrated or spoofed.",
    "actions": "Actions are rendered and logged first; in a dry run that is all that happens.",
    "actions.policy": "What each verdict does (docs/actions.md). SYN cookies are not "
                      "chosen here: they are kept on during every incident. `ratelimit` "
                      "limits the addresses a concentrated flood shares with real users (NAT) "
                      "instead of banning them; [actions.ratelimit] enabled adds a standing "
                      "rule for every source. `synproxy` (opt-in, [actions.synproxy]) acts on "
                      "spoofed incidents only.",
}
