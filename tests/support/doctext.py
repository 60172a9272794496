"""The README and docs/ as the doc tests read them: the pages, their console examples, and the
shape of a line of output (what it is, whatever the numbers)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.support import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS = {path: path.read_text() for path in DOC_FILES}


@dataclass
class Example:
    where: str
    command: str  # as the doc shows it, after "$ "
    shown: list[str]
    code: int = 0  # what `echo $?` under it shows, else 0


def console_examples() -> list[Example]:
    found = []
    for path, text in DOCS.items():
        for block in re.findall(r"```console\n(.*?)```", text, re.DOTALL):
            current: Example | None = None
            for line in block.splitlines():
                if line.startswith("$ echo $?") and current is not None:
                    current.code = -1  # the next line is the code
                elif line.startswith("$ "):
                    current = Example(path.name, line[2:], [])
                    found.append(current)
                elif line.startswith("#"):
                    current = None
                elif current is not None and current.code == -1:
                    current.code = int(line)
                elif current is not None:
                    current.shown.append(line)
    return [e for e in found if re.search(r"(^|\| |sudo |\S+=\S+ )synwatch ", e.command)]


def shape(line: str) -> str:
    """What a line is: its label up to the first ": " (the whole line when it has none), with
    every number, time and path made alike and spaces collapsed (an error line, "synwatch: ...",
    to its fourth field: the command or file, the key and the start of why); which log source a
    machine uses is the machine's (journald where there is a journal, else kmsg)."""
    s = re.sub(r"\bsources\.(journald|kmsg|files)\b", "sources.X", line)
    s = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+(?:[+-]\d\d:\d\d)?", "T", s)
    s = re.sub(r"(?<![\w.])/[\w./-]+", "P", s)
    s = re.sub(r"\d+", "N", s)
    s = " ".join(s.split())
    label, sep, _ = s.partition(": ")
    if label == "synwatch" and sep:  # an error line: what it is about, and about which key
        fields = s.split(": ")
        if fields[1].startswith("config "):  # which file is the reader's
            fields[1] = "config F"
        return ": ".join(fields[:4])
    return label + sep.strip()


def in_order(shown: list[str], printed: list[str]) -> bool:
    """The shown shapes appear in the printed ones, in order ("..." stands for lines left
    out, so everything shown is compared as a subsequence)."""
    want = [shape(x) for x in shown if x.strip() and x.strip() != "..."]
    have = iter(shape(x) for x in printed)
    return all(any(w == h for h in have) for w in want)
