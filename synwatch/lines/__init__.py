"""Kernel log lines into events: the catalogue of patterns (filters/ as data), the
log formats and their trust (sinks), times, and the literal-first scan of old logs."""
