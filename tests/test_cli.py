"""The command line's own behaviour: usage errors are one line and exit 2, with or without
--debug, wherever --debug is placed."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cli import synwatch


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

    from synwatch.cli.render import table

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


# issue 26: arguments the history or the clock cannot hold were internal errors.
BIG = "99999999999999999999"  # beyond SQLite's 64-bit integers
TOO_LARGE_ARGUMENTS = [
    (["incidents", "show", BIG], "incidents show: argument ID: expected a whole number from 1 "
                                 "to 9223372036854775807"),
    (["incidents", "show", "0"], "incidents show: argument ID: expected a whole number from 1"),
    (["incidents", "list", "--limit", BIG], "incidents list: argument --limit: expected a whole "
                                            "number from 1 to 9223372036854775807"),
    (["events", "list", "--limit", BIG], "events list: argument --limit: expected a whole "
                                         "number from 1 to 9223372036854775807"),
    (["events", "list", "--since", "99999999999d"], "events list: argument --since: at most "
                                                    "36500d"),
    (["incidents", "list", "--since", "9" * 400 + "s"], "incidents list: argument --since: at "
                                                        "most 36500d"),
    (["doctor", "--seconds", "-1"], "doctor: argument --seconds: expected seconds from 0.1 to "
                                    "3600"),
    (["doctor", "--seconds", "nan"], "doctor: argument --seconds: expected seconds from 0.1"),
    (["doctor", "--seconds", "inf"], "doctor: argument --seconds: expected seconds from 0.1"),
    (["top", "--interval", "-1"], "top: argument --interval: expected seconds from 0.1 to 3600"),
    (["snapshot", "--netns", "../../etc"], "snapshot: argument --netns: "),
    (["doctor", "--netns", "a/b"], "doctor: argument --netns: "),
    (["test-filter", "--max-misses", "-1", "x"], "test-filter: argument --max-misses: expected "
                                                 "a whole number from 0 to 1000000"),
]


@pytest.mark.parametrize(("argv", "said"), TOO_LARGE_ARGUMENTS,
                         ids=[" ".join(a)[:40] for a, _ in TOO_LARGE_ARGUMENTS])
def test_an_argument_the_code_cannot_hold_is_a_usage_error(
        argv: list[str], said: str, store_config: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from synwatch import cli

    monkeypatch.setenv("SYNWATCH_CONFIG", str(store_config))
    monkeypatch.setattr(cli, "setup_logging", lambda _debug, **_kw: None)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"synwatch: {said}"), err
    assert err.count("\n") == 1 and len(err) < 300


def test_the_largest_accepted_arguments_work(store_config: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from synwatch import cli

    monkeypatch.setenv("SYNWATCH_CONFIG", str(store_config))
    monkeypatch.setattr(cli, "setup_logging", lambda _debug, **_kw: None)
    largest = str(2**63 - 1)
    assert cli.main(["incidents", "show", largest]) == 1  # not found, as any other id
    assert "internal error" not in capsys.readouterr().err
    for argv in (["events", "list", "--limit", largest, "--since", "36500d"],
                 ["incidents", "list", "--limit", largest, "--since", "36500d"]):
        assert cli.main([*argv, "--format", "json"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == "[]\n"


# --- a property test over every command's arguments ---------------------------------------
# What `run` and `top` do with valid arguments is the service and a live screen: `top` is only
# parsed, `run` left to tests/test_service.py.
PARSE_ONLY = {"top", "try"}  # interactive; three floods (tests/test_try_lab.py runs it)
NOT_RUN = {"run"}

# argv never holds NUL (execve cannot pass it); it does hold undecodable bytes, which Python
# gives as lone surrogates (surrogateescape)
_CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)) | \
    st.sampled_from(["\udc80", "\udcff"])
_DURATION = st.sampled_from(["99999999999d", "9" * 400 + "s", "36500d", "36501d", "1e3s",
                              "-1s", "0s", "1h30m"]) | st.builds(
    lambda n, u: f"{n}{u}", st.integers(0, 10**30) | st.sampled_from(["9" * 40, "1.5", ""]),
    st.sampled_from(["ms", "s", "m", "h", "d", "w", "", "x"]))
# numbers as typed, weighted to the edges: past 64 bits, past a float, negative, not finite
_EDGES = [str(2**63 - 1), str(2**63), str(2**64), "9" * 20, "9" * 400, "-1", "0", "-0", "0.05",
          "1e999", "-1e999", "nan", "inf", "-inf", " 1", "1_000", "٣", "²", "0x10", "1e3"]
_NUMBER = st.one_of(st.sampled_from(_EDGES), st.integers(-2**70, 2**70).map(str),
                    st.integers(-100, 100).map(str),
                    st.text(alphabet="0123456789", min_size=1, max_size=60),
                    st.floats().map(repr))
_VALUE = st.one_of(_NUMBER, _NUMBER, _DURATION, st.text(_CHARS, max_size=30),
                   st.sampled_from(["-", "/", ".", "..", "::/0", "0.0.0.0/0", "10.0.0.0/33",
                                    "192.0.2.0/24", "json", "table", ""]))


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices]) | _VALUE
    if action.type is not None:  # a number or a duration: mostly those, at their edges
        return st.one_of(st.sampled_from(_EDGES), _NUMBER, _DURATION, _VALUE)
    return _VALUE


def _arguments(parser: argparse.ArgumentParser) -> st.SearchStrategy[list[str]]:
    """Arguments shaped as the command takes them (some of its options, each with any value;
    its positionals, any values), now and then with a stray value: mostly past the parser, so
    that the values reach the command."""
    options, positionals = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue  # they print and exit 0 before anything else is looked at
        if action.option_strings:
            takes = action.nargs != 0
            options.append(st.tuples(st.sampled_from(action.option_strings),
                                     _value_for(action) if takes else st.just(None)))
        else:
            many = action.nargs in ("+", "*")
            positionals.append(st.lists(_value_for(action), min_size=0 if action.nargs == "*"
                                        else 1, max_size=3 if many else 1))
    chosen = (st.lists(st.one_of(options), max_size=4, unique_by=lambda o: o[0]) if options
              else st.just([]))

    def flat(parts: tuple[list[tuple[str, str | None]], list[list[str]], list[str]]) -> list[str]:
        opts, pos, stray = parts
        out = [t for o, v in opts for t in ((o,) if v is None else (o, v))]
        return [*out, *(v for values in pos for v in values), *stray]

    stray = st.one_of(st.just([]), st.just([]), st.just([]), _VALUE.map(lambda v: [v]))
    return st.tuples(chosen, st.tuples(*positionals).map(list), stray).map(flat)


def _commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    from synwatch.cli import build_parser
    from tests.support.cli import cli_commands

    parser = build_parser()
    return [(name.split(), _subparser(parser, name.split()))
            for name in cli_commands(parser) if name.split()[0] not in NOT_RUN]


COMMANDS = _commands()


@pytest.mark.parametrize(("words", "parser"), COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_argument_is_an_internal_error(words: list[str], parser: argparse.ArgumentParser,
                                          data: st.DataObject, store_config: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Any arguments to any command: exit 0, 1, 2 or 3 with its own message, never an internal
    error or a traceback (issue 26: `incidents show 99999999999999999999`, `--limit` and
    `--since` as large, `doctor --seconds -1` were internal errors)."""
    import io
    import sys

    from synwatch import cli
    from synwatch.cli import build_parser, kernel
    from synwatch.errors import SynwatchError

    class NoSleep:  # doctor measures over --seconds: refuse what time.sleep refuses, skip the rest
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            time.sleep(seconds if not 0 <= seconds < 86400 else 0)

    monkeypatch.chdir(store_config.parent)  # relative paths name nothing of the repository
    monkeypatch.setenv("SYNWATCH_CONFIG", str(store_config))
    monkeypatch.setattr(cli, "setup_logging", lambda _debug, **_kw: None)
    monkeypatch.setattr(kernel, "time", NoSleep)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    argv = [*words, *data.draw(_arguments(parser), label="arguments")]
    if argv[0] in PARSE_ONLY:
        status = 0
        try:
            build_parser().parse_args(argv)
        except SynwatchError as exc:
            status = int(exc.status)
        assert status in (0, 2), argv
        return
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # --help, --version
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code in (0, 1, 2, 3), (argv, code, err)
    assert "internal error" not in err, (argv, err)
    # --debug shows the traceback of an error it reports (and lets an internal one raise)
    assert "Traceback" not in err or "--debug" in argv, (argv, err)


def test_a_recording_whose_quiet_period_no_timedelta_holds_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`replay FILE` takes the recording's settings as the config would: a quiet period of
    1e300 s was an OverflowError in the correlator."""
    import json

    from synwatch import cli

    recording = tmp_path / "r.jsonl"
    recording.write_text(json.dumps({"type": "settings", "quiet_period": 1e300,
                                     "thresholds": {}}) + "\n")
    assert cli.main(["replay", str(recording)]) == 2
    assert capsys.readouterr().err == (f"synwatch: {recording}:1: not a synwatch recording's "
                                       "settings: quiet_period 1e+300 is not a duration\n")


def test_a_look_at_a_history_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    """`status`, the lists, `incidents show`, `doctor` and `unban` on a fresh host: they say
    there is nothing yet, and the history (its directory too) is left for `synwatch run` to
    create."""
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/lib/h.db"\n')
    r = synwatch("status", "--config", str(config))
    assert r.code == 3 and "no history yet: `synwatch run` creates it" in r.out, r
    for argv in (("incidents", "list"), ("events", "list"), ("bans", "list"),
                 ("incidents", "list", "--format", "json")):
        r = synwatch(*argv, "--config", str(config))
        assert r.code == 0 and r.err == "", r
    assert json.loads(r.out) == []
    r = synwatch("doctor", "--seconds", "0.1", "--format", "json", "--config", str(config))
    assert r.code == 0 and r.err == "", r  # the present judged; no history is no advice
    r = synwatch("unban", "192.0.2.0/24", "--config", str(config))
    assert r.code == 1 and "no history yet, so no ban of synwatch's to lift" in r.err, r
    r = synwatch("incidents", "show", "1", "--config", str(config))
    assert (r.code, r.err) == (1, "synwatch: incident 1: no history yet: `synwatch run` "
                                  "creates it\n"), r
    assert not (tmp_path / "lib").exists()
