"""Every config key and CLI command is documented in the README or docs/ (datasette's test_docs
idea), the examples there are ones the CLI takes, and the links between the pages lead somewhere.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from synwatch.cli import build_parser
from synwatch.config import SCHEMA, parse_config
from tests.support import REPO
from tests.support.cli import cli_commands, synwatch
from tests.support.doctext import DOC_FILES, DOCS, console_examples, in_order, shape

README = (REPO / "README.md").read_text()
CONFIGURATION = DOCS[REPO / "docs" / "configuration.md"]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def test_the_key_table_and_the_default_file_are_generated_from_the_schema() -> None:
    """The old check looked for `enabled =` anywhere in the file, so deleting a key passed; the
    files are now what scripts/settings_docs.py writes from the schema, byte for byte."""
    from scripts import settings_docs

    assert settings_docs.default_file() == (REPO / "packaging" / "synwatch.toml").read_text(), \
        "packaging/synwatch.toml is stale: python scripts/settings_docs.py --write"
    assert settings_docs.with_key_table(CONFIGURATION) == CONFIGURATION, \
        "the key table in docs/configuration.md is stale: python scripts/settings_docs.py --write"
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"| `{section}.{key}` |" in CONFIGURATION


def test_the_default_file_says_every_default() -> None:
    """Parsing the embedded default gives what parsing an empty file gives: the file and the
    schema cannot disagree about a default."""
    text = (REPO / "packaging" / "synwatch.toml").read_text()
    assert parse_config(text, "x") == parse_config("", "x")
    assert text.count("\n[") + text.startswith("[") == len(SCHEMA)


def test_every_command_is_documented() -> None:
    commands = cli_commands(build_parser())
    assert "incidents show" in commands and "scan" in commands
    everything = "\n".join(DOCS.values())
    for command in commands:
        assert f"synwatch {command}" in everything, command


def test_every_toml_example_is_a_configuration_synwatch_takes() -> None:
    """A key the docs show in a configuration example exists, with a value it takes."""
    blocks = [(path, block) for path, text in DOCS.items()
              for block in re.findall(r"```toml\n(.*?)```", text, re.DOTALL)]
    assert len(blocks) >= 2
    for path, block in blocks:
        parse_config(block, str(path))  # a ConfigError names the file and the key


def test_readme_starts_with_the_two_commands() -> None:
    """The title, one paragraph saying what synwatch is, then the two commands."""
    head, block = README.split("```sh\n", 1)
    assert head.startswith("# synwatch\n\n") and "\n## " not in head
    assert len([p for p in head.split("\n\n")[1:] if p.strip()]) == 1, "one paragraph first"
    lines = block.split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in lines] == ["./scripts/run",
                                                              "./scripts/test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test\n" in ci, "CI must call the README's test command"


def _commands_in(text: str) -> list[list[str]]:
    """Every synwatch command line in the text's sh blocks and after "$ " in its console blocks,
    as argv (after a pipe too; behind `sudo` or `VAR=value` too)."""
    found = []
    for kind, block in re.findall(r"```(console|sh)\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            if kind == "console" and not line.startswith("$ "):
                continue  # what a command printed
            for piped in line.removeprefix("$ ").split(" | "):
                part = re.sub(r"^(?:sudo |[A-Z_]+=\S* )*", "", piped.strip())
                if part.startswith("synwatch "):
                    found.append(shlex.split(part.split(" #")[0])[1:])
    return found


def _documented_commands() -> list[list[str]]:
    return [argv for text in DOCS.values() for argv in _commands_in(text)]


def test_every_synwatch_command_in_the_docs_is_one_the_cli_takes() -> None:
    """As datasette tests its docs: an example that the CLI refuses fails here."""
    commands = _documented_commands()
    assert len(commands) >= 6 and ["status"] in commands
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # a UsageError fails the test, naming the command
        assert callable(args.func), argv


def test_the_test_filter_examples_run_as_written() -> None:
    examples = [a for a in _documented_commands() if a and a[0] == "test-filter"]
    assert examples
    for argv in examples:
        r = synwatch(*argv)
        assert r.code == 0 and "kernel-synflood/" in r.out, r


def _replay_examples() -> list[tuple[list[str], list[str]]]:
    """`$ synwatch replay FILE` in a console block, and the output lines shown under it."""
    found = []
    for text in DOCS.values():
        for block in re.findall(r"```console\n(.*?)```", text, re.DOTALL):
            lines = block.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("$ synwatch replay "):
                    shown = []
                    for out in lines[i + 1:]:
                        if out.startswith("$ "):
                            break
                        shown.append(out)
                    found.append((shlex.split(line[2:])[1:], shown))
    return found


def test_the_replayed_incidents_are_what_replay_prints() -> None:
    """The incidents in the docs are real: each line shown under `synwatch replay FILE` is one
    that the command prints today (`...` stands for lines left out)."""
    examples = _replay_examples()
    assert len(examples) >= 3
    for argv, shown in examples:
        r = synwatch(*argv)
        assert r.code == 0, r
        printed = r.out.splitlines()
        for line in shown:
            if line.strip() != "...":
                assert line in printed, (argv, line)


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.MULTILINE):
        slug = _anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files_and_headings_that_exist(path: Path) -> None:
    text = FENCE.sub("", DOCS[path])
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        assert where.exists(), f"{path.name}: {target}: no such file"
        if anchor and where.suffix == ".md":
            assert anchor in _anchors(where.read_text()), f"{path.name}: {target}: no heading"


def test_a_shape_tells_lines_apart() -> None:
    """The comparison can fail: a line that lost its label, a label renamed, lines out of
    order."""
    assert shape("store: sqlite:////tmp/x.db (this node: vm)") == "store:"
    assert shape("0.0.0.0:2024  128      0") == shape("10.1.2.3:80 4 5")
    assert in_order(["a: 1", "...", "b: 2"], ["a: 9", "x", "b: 7"])
    assert not in_order(["b: 2", "a: 1"], ["a: 9", "b: 7"])
    assert not in_order(["store: x"], ["stores: x"])
    assert console_examples(), "no console examples found"


def test_the_try_example_has_the_shape_of_what_try_prints() -> None:
    """`synwatch try` runs in tests/test_try_lab.py (20 s of floods); here its rendering, fed
    incidents as the service records them, against the README's example, line by line."""
    from datetime import datetime, timezone

    from synwatch.cli.render import print_judged, print_trial_end
    from synwatch.cli.trial import FLOODS, Judged
    from synwatch.records import ActionRun, Incident

    now = datetime(2026, 12, 6, tzinfo=timezone.utc)

    def judged(n: int, trigger: str, bans: tuple[str, ...]) -> Judged:
        flood = FLOODS[n]
        incident = Incident(n, "h", "ns", "0.0.0.0", 40000 + n, 4, "closed", flood.expected,
                            trigger, now, now, now, now, 17, (), ("a recommendation",),
                            {"reasons": ["a reason"]})
        runs = tuple(ActionRun(n, "ban", b, "dry-run", now) for b in bans)
        return Judged(flood, "0.0.0.0", 40000 + n, ((incident, runs),))

    all_three = [judged(0, "log", ()), judged(1, "log", ("10.232.1.0/24", "10.232.2.0/24")),
                 judged(2, "counters", ())]
    out = io.StringIO()
    out.write("synwatch try: 3 short floods on this kernel\n")  # the CLI's own header line
    for n, one in enumerate(all_three, 1):
        print_judged(n, one, out)
    print_trial_end(all_three, out)
    [example] = [e for e in console_examples() if e.command == "sudo synwatch try"]
    assert in_order(example.shown, out.getvalue().splitlines()), out.getvalue()
