"""The request journal: the daemon owns an MQTT request durably before it acknowledges it.

A QoS 1 request is acknowledged as soon as it arrives (MQTT wants acknowledgements in arrival order, so holding
one back for a long generation would hold up every later one). Without a journal, a request in flight when the
daemon is killed would then be lost: the broker has its acknowledgement and never redelivers it. So:

1. on arrival, the request is written here (one fsynced SQLite commit, WAL mode), then acknowledged;
2. when the broker acknowledges its final reply, the entry is marked done;
3. at start, entries not done are run again (or answered `deadline_exceeded` if their deadline passed).

A reply that reached the broker just before a crash, whose entry could not yet be marked done, is sent again
at the next start: the reply carries the request's `id` and correlation data, so a client can drop the repeat.
A request the broker redelivers (DUP flag) that is already journaled is acknowledged and not run twice.

A request is run at most MAX_ATTEMPTS times: one that was in flight at two crashes in a row (it may be what
crashes us) is set aside as a dead letter (`dead_at`, `dead_reason`), kept for the operator and never replayed.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KEEP_DONE_SECONDS = 3600  # done entries are kept this long, to recognise late redeliveries
DEAD_KEEP_SECONDS = 7 * 24 * 3600  # dead letters are kept a week
MAX_ATTEMPTS = 2  # runs of one request before it is set aside as a dead letter

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests(
    row INTEGER PRIMARY KEY,
    digest TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    response_topic TEXT NOT NULL,
    correlation BLOB,
    received_at REAL NOT NULL,
    deadline_at REAL,
    done_at REAL,
    attempts INTEGER NOT NULL DEFAULT 1,
    dead_at REAL,
    dead_reason TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_digest ON requests(digest);
"""
# Journals written before dead letters existed lack these columns: added in place, their rows kept.
COLUMNS = {"attempts": "INTEGER NOT NULL DEFAULT 1", "dead_at": "REAL", "dead_reason": "TEXT"}
INDEXES = """
CREATE INDEX IF NOT EXISTS requests_open ON requests(done_at, dead_at) WHERE done_at IS NULL AND dead_at IS NULL;
DROP INDEX IF EXISTS requests_pending;
"""


@dataclass
class Entry:
    """A journaled request: enough to run it again and to answer it where it asked."""

    topic: str
    payload: bytes
    response_topic: str
    correlation: bytes | None
    received_at: float  # time.time()
    deadline_at: float | None = None  # time.time() after which it must not run
    row: int | None = None
    attempts: int = 1  # runs so far, this one included

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.topic.encode(), self.response_topic.encode(), self.correlation or b"", self.payload):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.hexdigest()


class RequestJournal:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the network, worker and main threads
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we acknowledge
        self._conn.executescript(SCHEMA)
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(requests)")}
        for name, kind in COLUMNS.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
        self._conn.executescript(INDEXES)
        self.prune()

    def seen(self, entry: Entry) -> bool:
        """Whether this exact request (topic, reply address, correlation, payload) is journaled already."""
        with self._lock:
            return self._conn.execute("SELECT 1 FROM requests WHERE digest = ? LIMIT 1",
                                      (entry.digest,)).fetchone() is not None

    def record(self, entry: Entry) -> int:
        with self._lock:
            entry.row = self._conn.execute(
                "INSERT INTO requests(digest, topic, payload, response_topic, correlation, received_at, deadline_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING row",
                (entry.digest, entry.topic, entry.payload, entry.response_topic, entry.correlation,
                 entry.received_at, entry.deadline_at)).fetchone()[0]
        return entry.row

    def finish(self, row: int) -> None:
        with self._lock:
            self._conn.execute("UPDATE requests SET done_at = ? WHERE row = ? AND done_at IS NULL", (time.time(), row))

    def pending(self) -> list[Entry]:
        """Requests owned but not yet answered nor set aside, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT topic, payload, response_topic, correlation, received_at, deadline_at, row, attempts "
                "FROM requests WHERE done_at IS NULL AND dead_at IS NULL ORDER BY row").fetchall()
        return [Entry(*r) for r in rows]

    def attempt(self, row: int) -> None:
        """Count one more run of a replayed request."""
        with self._lock:
            self._conn.execute("UPDATE requests SET attempts = attempts + 1 WHERE row = ?", (row,))

    def set_aside(self, row: int, reason: str) -> None:
        """A dead letter: never run again, kept (with its reason) for the operator."""
        with self._lock:
            self._conn.execute("UPDATE requests SET dead_at = ?, dead_reason = ? WHERE row = ? AND done_at IS NULL",
                               (time.time(), reason, row))

    def dead_letters(self) -> list[tuple[int, str, str]]:
        """(row, topic, reason) of every request set aside, oldest first."""
        with self._lock:
            return self._conn.execute("SELECT row, topic, dead_reason FROM requests WHERE dead_at IS NOT NULL "
                                      "ORDER BY row").fetchall()

    def prune(self, keep_seconds: float = KEEP_DONE_SECONDS) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM requests WHERE done_at IS NOT NULL AND done_at < ?",
                               (time.time() - keep_seconds,))
            self._conn.execute("DELETE FROM requests WHERE dead_at IS NOT NULL AND dead_at < ?",
                               (time.time() - DEAD_KEEP_SECONDS,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
