"""Writes the histories in this folder: one SQLite file per old schema, with data in every
table, as the synwatch of that schema wrote it (naive UTC times in SQLite, JSON as text, a
notification retry as prose in ``detail`` before 0003). Kept as files, as fail2ban keeps
database_v1.db and database_v2.db, so a migration is tested on what users have on disk.

    python -m tests.data.store.make_old_histories   # from the repository root
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from synwatch.store import MIGRATIONS

HERE = Path(__file__).resolve().parent
OLD = ("0001", "0002")


def _schema(path: Path, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _rows(db: sqlite3.Connection, revision: str) -> None:
    top = json.dumps([{"prefix": "203.0.113.0/24", "count": 180, "share": 0.9}])
    db.execute(
        "INSERT INTO incidents (id, host, netns, address, port, family, status, verdict, "
        "trigger, opened_at, closed_at, first_evidence_at, detected_at, peak_syn_recv, "
        "top_prefixes, recommendations, evidence) VALUES (1, 'web01', '', '0.0.0.0', 443, 4, "
        "'closed', 'concentrated', 'log', '2026-11-20 10:00:01.000000', "
        "'2026-11-20 10:05:00.000000', '2026-11-20 10:00:00.500000', "
        "'2026-11-20 10:00:01.000000', 200, ?, ?, ?)",
        (top, json.dumps(["ban 203.0.113.0/24"]),
         json.dumps({"reasons": ["4 prefixes carry 90% of SYN-RECV"]})))
    db.execute(
        "INSERT INTO events (id, time, recorded_at, source, trusted, historical, kind, family, "
        "address, port, mode, source_ip, source_port, host, message, pattern, dedup_key, "
        "incident_id) VALUES (1, '2026-11-20 10:00:01.000000', '2026-11-20 10:00:01.100000', "
        "'journald', 1, 0, 'syn_flood', 4, '0.0.0.0', 443, 'cookies', NULL, NULL, 'web01', "
        "'TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:443. Sending cookies.', "
        "'kernel-synflood/form-f', 'cursor-1', 1)")
    db.execute(
        "INSERT INTO evidence_samples (id, incident_id, at, syn_recv, accept_queue, backlog, "
        "rates, top_prefixes) VALUES (1, 1, '2026-11-20 10:00:02.000000', 200, 0, 511, ?, ?)",
        (json.dumps({"syns_overflowed": 950.0}), json.dumps([["203.0.113.0/24", 180]])))
    runs = [
        (1, "ban", "203.0.113.0/24", "done", "banned for 3600 s", "nft -f -"),
        (2, "notify", "opened", "failed", "attempt 1 of 5: refused; retrying in 30 s", "T\nB"),
        (3, "notify", "closed", "failed",
         "attempt 1: not done when synwatch stopped; retrying at the next start", "T\nB"),
        (4, "notify", "update", "failed", "attempt 5 of 5: refused", "T\nB"),
    ]
    db.executemany(
        "INSERT INTO action_runs (id, incident_id, action, target, status, at, rendered, "
        "detail) VALUES (?, 1, ?, ?, ?, '2026-11-20 10:01:00.000000', ?, ?)",
        [(i, a, t, s, r, d) for i, a, t, s, d, r in runs])
    db.execute(
        "INSERT INTO bans (id, prefix, backend, netns, incident_id, created_at, expires_at, "
        "removed_at, times_banned) VALUES (1, '203.0.113.0/24', 'nftables', '', 1, "
        "'2026-11-20 10:01:00.000000', '2026-11-20 11:01:00.000000', NULL, 1)")
    db.execute("INSERT INTO source_positions (source, position, updated_at) VALUES "
               "('journald', ?, '2026-11-20 10:05:00.000000')", (json.dumps({"cursor": "c1"}),))
    if revision >= "0002":
        db.execute("INSERT INTO saved_settings (netns, name, value, saved_at) VALUES "
                   "('', 'net.ipv4.tcp_syncookies', '0', '2026-11-20 10:00:01.000000')")


def main() -> None:
    for revision in OLD:
        path = HERE / f"schema_{revision}.db"
        path.unlink(missing_ok=True)
        _schema(path, revision)
        with sqlite3.connect(path) as db:
            _rows(db, revision)
        sqlite3.connect(path).execute("VACUUM").connection.close()
        print(path)


if __name__ == "__main__":
    main()
