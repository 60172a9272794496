"""Advice that fits where the listener runs: a container's sysctls are its own namespace's, set
through its runtime, not with `sysctl -w` on the host (a new namespace starts from the kernel's
defaults, whatever the host says: kernel-facts.md §7).

Kubernetes sorts the sysctls: `net.ipv4.tcp_syncookies` is in its safe set (any pod may set it),
`net.core.somaxconn` is not: raising it lets un-accepted connections hold node memory the pod is
not charged for, and a pod may set it only where the kubelet allows it
(https://kubernetes.io/docs/tasks/administer-cluster/sysctl-cluster/). Docker and podman take
namespaced sysctls with `--sysctl` (https://docs.docker.com/reference/cli/docker/container/run/
#sysctl).
"""

from __future__ import annotations

import re

from synwatch.records import Place

SYSCTL_W = re.compile(r"`sysctl -w (net\.[a-z0-9_.]+)=(\d+)`( \(and in /etc/sysctl\.d/\))?")
SAFE_IN_PODS = frozenset({"net.ipv4.tcp_syncookies", "net.ipv4.ip_local_port_range",
                          "net.ipv4.ping_group_range",
                          "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_keepalive_time",
                          "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                          "net.ipv4.tcp_keepalive_probes"})
MEMORY_CAVEAT = ("un-accepted connections then hold node memory the container is not charged "
                 "for: raise it only as far as the backlog needs")


def _for_container(name: str, value: str, place: Place) -> str:
    """How to set one namespaced sysctl for this container, in its runtime's own words."""
    setting = f"{name}={value}"
    if place.pod:
        if name in SAFE_IN_PODS:
            how = (f"in the pod's spec (`securityContext.sysctls: [{{name: {name}, "
                   f"value: \"{value}\"}}]`; a safe sysctl in Kubernetes)")
        else:
            how = (f"in the pod's spec (`securityContext.sysctls: [{{name: {name}, "
                   f"value: \"{value}\"}}]`), which Kubernetes allows only where the kubelet "
                   f"runs with `--allowed-unsafe-sysctls={name}`")
    elif place.runtime in ("docker", "podman"):
        how = f"when the container starts: `{place.runtime} run --sysctl {setting} ...`"
    else:
        how = f"in the container's OCI spec (`linux.sysctl: {{\"{name}\": \"{value}\"}}`)"
    caveat = f" ({MEMORY_CAVEAT})" if name == "net.core.somaxconn" else ""
    return f"set {setting} for the container {how}{caveat}"


def in_place(recommendations: tuple[str, ...], place: Place) -> tuple[str, ...]:
    """The recommendations, with every `sysctl -w` said the way the place sets it."""
    if place.kind != "container":
        return recommendations
    return tuple(SYSCTL_W.sub(lambda m: _for_container(m.group(1), m.group(2), place), r)
                 for r in recommendations)
