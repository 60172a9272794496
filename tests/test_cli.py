"""The command line's own behaviour: usage errors are one line and exit 2, with or without
--debug, wherever --debug is placed."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import synwatch


def test_a_bad_command_is_named_once() -> None:
    r = synwatch("bogus")
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("synwatch: argument COMMAND: invalid choice: 'bogus'"), r.err
    assert r.err.count("\n") == 1


def test_a_usage_error_is_one_line_wherever_debug_is(store_config: Path) -> None:
    for argv in (("--debug", "incidents", "list", "--since", "soon"),
                 ("incidents", "list", "--since", "soon", "--debug"),
                 ("incidents", "--debug", "list", "--since", "soon")):
        r = synwatch(*argv)
        assert r.code == 2 and "Traceback" not in r.err, (argv, r.err)
        assert r.err.startswith("synwatch: incidents list: argument --since"), (argv, r.err)
    r = synwatch("incidents", "list", "--config", str(store_config), "--debug")
    assert r.code == 0 and "DEBUG" in r.err, r  # accepted after the command, and it counts


def test_tables_are_rich_and_never_wrap_on_a_terminal_or_in_a_pipe() -> None:
    """`table` is rich's Table at the width of its widest row: one line per row however long
    (rich alone wraps at 80 columns in a pipe), bold headers on a terminal only, cells taken
    as text (never as markup: "[::]:443")."""
    import io

    from synwatch.output import table

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    rows = [{"listener": "[::]:443", "why": "w " * 150}, {"listener": "0.0.0.0:80", "why": None}]
    piped, terminal = io.StringIO(), Terminal()
    table(rows, ["listener", "why"], piped)
    table(rows, ["listener", "why"], terminal)
    assert piped.getvalue().splitlines() == [
        "LISTENER    WHY", f"[::]:443    {('w ' * 150).rstrip()}", "0.0.0.0:80  -"]
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b[1m" in lines[0] and "\x1b" not in piped.getvalue()
    assert lines[1].startswith("[::]:443    w w")
