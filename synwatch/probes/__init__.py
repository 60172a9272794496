"""Probes: the kernel's own state, per network namespace (counters, sysctls, sockets)."""
