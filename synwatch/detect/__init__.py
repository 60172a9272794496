"""Judging: probes and kernel lines into incidents (correlate), their verdicts (verdict,
stats, rules), a ban's width (bantargets), replays of recordings and the doctor's advice."""
