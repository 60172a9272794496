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
