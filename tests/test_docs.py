"""Every config key and CLI command is documented in the README (datasette's test_docs idea)."""

from __future__ import annotations

import argparse

from synwatch.cli import build_parser
from synwatch.config import _SCHEMA
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_readme_and_the_default_file() -> None:
    default = (REPO / "packaging" / "synwatch.toml").read_text()
    for section, keys in _SCHEMA.items():
        assert f"[{section}]" in default, section
        for key in keys:
            assert f"`{section}.{key}`" in README, f"{section}.{key} not in README"
            assert f"\n{key} =" in default, f"{section}.{key} not in packaging/synwatch.toml"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix}{name} ")
                out.extend(nested or [f"{prefix}{name}"])
    return out


def test_every_command_is_in_the_readme() -> None:
    commands = _commands(build_parser())
    assert "incidents show" in commands and "scan" in commands
    for command in commands:
        assert f"synwatch {command}" in README, command


def test_readme_starts_with_the_two_commands() -> None:
    block = README.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["sudo ./scripts/run",
                                                              "sudo ./scripts/test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test\n" in ci, "CI must call the README's test command"
