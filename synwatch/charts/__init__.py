"""The picture of an incident: its series from the history (series.py), drawn as a PNG
(png.py, matplotlib) or in a terminal (terminal.py, uniplot), and drawn for a notification in
a child process (draw.py), so the service's own process never loads a plotting library."""

from __future__ import annotations

from synwatch.errors import UsageError

MISSING = ("needs the charts extra: pip install 'synwatch[charts]' (Debian: apt install "
           "python3-matplotlib, and pip install uniplot for the terminal)")


def require(module: str, what: str) -> None:
    """Import ``module`` or say which package is missing (exit 2)."""
    import importlib  # noqa: PLC0415

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(what, f"{module} is not installed; {MISSING}") from exc
