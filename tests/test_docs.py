"""Every config key and CLI command is documented in the README (datasette's test_docs idea)."""

from __future__ import annotations

import re

from synwatch.cli import build_parser
from synwatch.config import SCHEMA, parse_config
from tests.conftest import REPO, cli_commands, synwatch

README = (REPO / "README.md").read_text()


def test_the_key_table_and_the_default_file_are_generated_from_the_schema() -> None:
    """The old check looked for `enabled =` anywhere in the file, so deleting a key passed; the
    files are now what scripts/settings_docs.py writes from the schema, byte for byte."""
    from scripts import settings_docs

    assert settings_docs.default_file() == (REPO / "packaging" / "synwatch.toml").read_text(), \
        "packaging/synwatch.toml is stale: python scripts/settings_docs.py --write"
    assert settings_docs.readme(README) == README, \
        "the README key table is stale: python scripts/settings_docs.py --write"
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"| `{section}.{key}` |" in README


def test_the_default_file_says_every_default() -> None:
    """Parsing the embedded default gives what parsing an empty file gives: the file and the
    schema cannot disagree about a default."""
    text = (REPO / "packaging" / "synwatch.toml").read_text()
    assert parse_config(text, "x") == parse_config("", "x")
    assert text.count("\n[") + text.startswith("[") == len(SCHEMA)


def test_every_command_is_in_the_readme() -> None:
    commands = cli_commands(build_parser())
    assert "incidents show" in commands and "scan" in commands
    for command in commands:
        assert f"synwatch {command}" in README, command


def test_readme_starts_with_the_two_commands() -> None:
    block = README.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./scripts/run",
                                                              "./scripts/test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test\n" in ci, "CI must call the README's test command"


def _readme_commands() -> list[list[str]]:
    """Every synwatch command line in the README's code blocks, as argv (after a pipe too)."""
    import shlex

    found = []
    for block in re.findall(r"```(?:console|sh)\n(.*?)```", README, re.DOTALL):
        for line in block.splitlines():
            for piped in line.removeprefix("$ ").split(" | "):
                part = piped.strip()
                if part.startswith(("synwatch ", "PATH=/nonexistent synwatch ")):
                    words = shlex.split(part.split(" #")[0])
                    found.append(words[words.index("synwatch") + 1:])
    return found


def test_every_synwatch_command_in_the_readme_is_one_the_cli_takes() -> None:
    """As datasette tests its docs: a README example that the CLI refuses fails here."""
    commands = _readme_commands()
    assert len(commands) >= 6 and ["status"] in commands
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # a UsageError fails the test, naming the command
        assert callable(args.func), argv


def test_the_readmes_test_filter_example_runs_as_written() -> None:
    [argv] = [a for a in _readme_commands() if a and a[0] == "test-filter"]
    r = synwatch(*argv)
    assert r.code == 0 and "kernel-synflood/" in r.out, r
