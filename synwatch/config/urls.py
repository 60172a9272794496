"""Passwords in ``storage.url``, read and written with urllib alone: parsing is pure, and the
service keeps SQLAlchemy out of its process on an SQLite history."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote, urlsplit


def has_password(url: str) -> bool:
    """Does a database URL carry a password (``user:secret@`` or libpq's ``?password=``)? A
    blank ``?password=`` counts: the driver would take it over the one in the userinfo."""
    try:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query,
                                                               keep_blank_values=True)
    except ValueError:  # not a URL at all: the store says what is wrong with it
        return False


def is_sqlite(url: str) -> bool:
    """``sqlite://...`` or ``sqlite+driver://...`` (a file or memory: no server, no password)."""
    return url.split("://", 1)[0].split("+", 1)[0].lower() == "sqlite"


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in its userinfo, percent-encoded: SQLAlchemy's URL parser and
    libpq both decode it, and ``@``, ``/``, ``:`` or ``%`` in it cannot end the field early.
    The URL must have no password of its own (the parser refuses that beforehand)."""
    scheme, _, rest = url.partition("://")
    # the authority ends at the path, the query or the fragment (RFC 3986, 3.2)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    return f"{scheme}://{user}:{quote(password, safe='')}@{hostport}{rest[end:]}"


def masked(url: str) -> str:
    """``url`` as it may be shown or logged: a password in the userinfo or in libpq's
    ``?password=`` replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostport}{rest[end:]}"
    return scheme + sep + re.sub(r"([?&]password=)[^&#]*", r"\1***", rest, flags=re.IGNORECASE)


def port_problem(url: str) -> str | None:
    """Why a server URL's port is not one (``host:abc``), or None."""
    try:
        urlsplit(url).port  # noqa: B018 - the property parses and checks it
    except ValueError as exc:
        return str(exc)
    return None
