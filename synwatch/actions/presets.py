"""Action presets: the commands of a firewall backend (or of the rate limit) as data.

One TOML file per preset in ``actions/`` (shipped as ``synwatch/actions_presets``). A preset names
its steps (setup, ban, unban, list, teardown), each a list of command templates filled in with
``str.format`` fields, and carries samples: inputs with the exact render (or parse) they must give,
so every template has a golden render that the tests check. Consecutive commands that feed the same
argv on stdin (``nft -f -``) are merged into one batch, which nft applies atomically.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synwatch.errors import ConfigError
from synwatch.system.runner import Command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STEPS = ("setup", "destinations", "ban", "unban", "teardown")
PER_FAMILY_STEPS = ("ban", "unban")
_TOP_KEYS = {"name", "action", "description", "kernel_timeouts", "vars", "vars4", "vars6",
             "list", "samples", *STEPS}


@dataclass(frozen=True, slots=True)
class CommandTemplate:
    argv: tuple[str, ...]
    stdin: str | None = None
    unless: tuple[str, ...] | None = None
    when: tuple[str, ...] | None = None

    def fill(self, values: dict[str, Any]) -> Command:
        def argv(template: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if template is None else tuple(a.format(**values) for a in template)

        return Command(tuple(a.format(**values) for a in self.argv),
                       None if self.stdin is None else self.stdin.format(**values),
                       argv(self.unless), argv(self.when))


@dataclass(frozen=True, slots=True)
class ListStep:
    """How to read back what is banned: a command per family and a pattern over its output with
    a ``prefix`` (or ``address``) group and, for kernel-side timeouts, a ``remaining`` group."""

    command: CommandTemplate
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    action: str
    description: str
    kernel_timeouts: bool
    vars: dict[str, Any]
    family_vars: dict[int, dict[str, Any]]
    steps: dict[str, tuple[CommandTemplate, ...]]
    lister: ListStep | None
    samples: tuple[dict[str, Any], ...] = field(default=())

    def values(self, context: dict[str, Any], family: int | None = None) -> dict[str, Any]:
        """The fields a template sees: the preset's vars, each family's vars suffixed with 4 or
        6, the caller's context, and for one family its vars unsuffixed plus ``ip``."""
        out = dict(self.vars)
        for fam, fvars in self.family_vars.items():
            out.update({f"{k}{fam}": v for k, v in fvars.items()})
        out.update(context)
        if family is not None:
            out.update(self.family_vars.get(family, {}))
            out.update(family=family, ip="ip" if family == 4 else "ip6")
        return out

    def render(self, step: str, context: dict[str, Any],
               items: list[dict[str, Any]] | None = None) -> list[Command]:
        """``step`` rendered once (setup, teardown) or once per item (ban, unban: each item has
        ``family`` and the prefix fields), with nft batches merged."""
        templates = self.steps.get(step, ())
        commands: list[Command] = []
        each: list[dict[str, Any]] = items if items is not None else [{}]
        for item in each:
            values = self.values({**context, **item}, item.get("family"))
            commands += [t.fill(values) for t in templates]
        return merge_batches(commands)

    def parse_list(self, output: str, family: int, prefix_len: int) -> dict[str, int | None]:
        """prefix (as ipaddress writes it, with its length) -> seconds left (None when the
        backend keeps no timeout)."""
        assert self.lister is not None
        found: dict[str, int | None] = {}
        for m in self.lister.pattern.finditer(output):
            groups = m.groupdict()
            if groups.get("prefix"):
                prefix = groups["prefix"]
            elif groups.get("host"):  # a lone address: the longest prefix
                prefix = f"{groups['host']}/{128 if ':' in groups['host'] else 32}"
            else:
                prefix = f"{groups['address']}/{groups.get('length') or prefix_len}"
            if (":" in prefix) != (family == 6):
                continue
            try:  # as ipaddress writes it: nft lists ::ffff:0:0/96 as ::ffff:0.0.0.0/96
                prefix = str(ipaddress.ip_network(prefix, strict=False))
            except ValueError:
                continue
            remaining = groups.get("remaining")
            found[prefix] = int(remaining) if remaining is not None else None
        return found


def merge_batches(commands: list[Command]) -> list[Command]:
    out: list[Command] = []
    for c in commands:
        last = out[-1] if out else None
        if (last is not None and c.stdin is not None and last.stdin is not None
                and last.argv == c.argv and last.unless is None and c.unless is None
                and last.when is None and c.when is None):
            out[-1] = Command(c.argv, last.stdin.rstrip("\n") + "\n" + c.stdin)
        else:
            out.append(c)
    return out


def _template(raw: Any, where: str) -> CommandTemplate:
    if not isinstance(raw, dict) or set(raw) - {"argv", "stdin", "unless", "when"}:
        raise ConfigError(where, None, "a command is a table with argv, stdin, unless and when")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(where, None, "argv must be a non-empty list of strings")
    unless, when = raw.get("unless"), raw.get("when")
    stdin = raw.get("stdin")
    return CommandTemplate(tuple(argv), stdin if isinstance(stdin, str) else None,
                           tuple(unless) if isinstance(unless, list) else None,
                           tuple(when) if isinstance(when, list) else None)


def parse_preset(text: str, where: str) -> Preset:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, None, f"not valid TOML: {exc}") from exc
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(where, sorted(unknown)[0], "unknown key in an action preset")
    for key in ("name", "action", "description"):
        if not isinstance(doc.get(key), str):
            raise ConfigError(where, key, "missing (a string)")
    steps = {s: tuple(_template(t, where) for t in doc.get(s, [])) for s in STEPS if s in doc}
    list_step = None
    if "list" in doc:
        raw = doc["list"]
        list_step = ListStep(_template({k: v for k, v in raw.items() if k != "pattern"}, where),
                             re.compile(raw["pattern"], re.MULTILINE))
    preset = Preset(
        name=doc["name"], action=doc["action"], description=doc["description"],
        kernel_timeouts=bool(doc.get("kernel_timeouts", False)),
        vars=dict(doc.get("vars", {})),
        family_vars={4: dict(doc.get("vars4", {})), 6: dict(doc.get("vars6", {}))},
        steps=steps, lister=list_step, samples=tuple(doc.get("samples", [])))
    sampled = {s.get("step") for s in preset.samples}
    for step in [*steps, *(["list"] if list_step else [])]:
        if step not in sampled:
            raise ConfigError(where, step, "has no sample (every step needs a golden render)")
    return preset


def presets_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "actions_presets", here.parent / "actions"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("action presets", None, f"missing from the installation (next to {here})")


def load_presets(directory: Path | None = None) -> dict[str, Preset]:
    folder = directory or presets_dir()
    out: dict[str, Preset] = {}
    for path in sorted(folder.glob("*.toml")):
        preset = parse_preset(path.read_text(encoding="utf-8"), str(path))
        out[preset.name] = preset
    return out
