"""
The reference control plane's replay memory: which nonces each agent used
inside the signed-timestamp window, in memory (:class:`NonceCache`) and, for a
daemon, in its SQLite file (:class:`NonceStore`) so that a restart does not
reopen the window for captured upgrade headers.

PROTOCOL §2: the nonce is standard base64, with padding, of 16 random bytes
(24 characters); :func:`valid_nonce` refuses anything else before it can reach
the memory.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import os
import re
import sqlite3
import stat
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from hostlink_tw.wire.signing import NONCE_BYTES

__all__ = [
    "DATABASE_NAME",
    "NonceCache",
    "NonceStore",
    "ReplayStoreError",
    "valid_nonce",
]

#: The control plane's own SQLite file, created beside its agents file.
DATABASE_NAME = "controlplane.db"

# 16 bytes are 22 base64 characters and "==".
_NONCE = re.compile(r"[A-Za-z0-9+/]{22}==", re.ASCII)

# Rows whose window has passed are deleted at most this often (seconds of the
# control plane's clock): one DELETE per minute keeps the file at the size of
# the window without a statement per upgrade.
_PURGE_EVERY = 60.0


def valid_nonce(nonce: str) -> bool:
    """True if ``nonce`` is the canonical base64 (with padding) of 16 bytes."""
    if not _NONCE.fullmatch(nonce):
        return False
    try:
        raw = base64.b64decode(nonce, validate=True)
    except (binascii.Error, ValueError):
        return False
    # The last character carries four unused bits: only one spelling of
    # each 16 bytes is accepted, so a replay cannot hide behind another.
    return len(raw) == NONCE_BYTES and base64.b64encode(raw).decode("ascii") == nonce


class NonceCache:
    """
    Nonces accepted inside the time window, per agent.

    An entry is kept until its signed timestamp leaves the window
    (``timestamp + window``): before that moment the same headers would still
    pass the timestamp check, so forgetting earlier would accept a replay.
    The timestamp itself is at most ``window`` ahead of the clock when the
    upgrade is accepted, so no entry outlives ``now + 2 * window``.

    Memory is bounded twice: ``per_agent`` entries per agent (:meth:`over_quota`:
    an agent that signs upgrades faster than that is refused on its own,
    everyone else is unaffected) and ``max_entries`` in all (:meth:`full`).
    """

    def __init__(self, window: float, max_entries: int, per_agent: int | None = None) -> None:
        """
        :param window: Seconds a timestamp stays acceptable (the max skew).
        :param max_entries: Hard cap on remembered nonces.
        :param per_agent: Cap per agent id (default: ``max_entries``).
        """
        self.window = window
        self.max_entries = max_entries
        self.per_agent = max_entries if per_agent is None else per_agent
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def count(self, agent_id: str) -> int:
        """How many nonces of this agent are remembered."""
        return self._counts.get(agent_id, 0)

    def evict(self, now: float) -> None:
        """Forget every nonce whose timestamp left the window before ``now``."""
        while self._heap and self._heap[0][0] < now:
            expires, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]
                left = self._counts[key[0]] - 1
                if left:
                    self._counts[key[0]] = left
                else:
                    del self._counts[key[0]]

    def seen(self, agent_id: str, nonce: str, now: float) -> bool:
        """True if this agent used this nonce inside the window."""
        self.evict(now)
        return (agent_id, nonce) in self._expiry

    def full(self, now: float) -> bool:
        """True if no new nonce can be remembered (after eviction)."""
        self.evict(now)
        return len(self._expiry) >= self.max_entries

    def over_quota(self, agent_id: str, now: float) -> bool:
        """True if this agent already has ``per_agent`` nonces inside the window."""
        self.evict(now)
        return self._counts.get(agent_id, 0) >= self.per_agent

    def add(self, agent_id: str, nonce: str, timestamp: float) -> float:
        """Remember a nonce until ``timestamp + window``; return that moment."""
        expires = timestamp + self.window
        self.remember(agent_id, nonce, expires)
        return expires

    def remember(self, agent_id: str, nonce: str, expires: float) -> None:
        """Remember a nonce until ``expires`` (what :meth:`NonceStore.load` returns)."""
        key = (agent_id, nonce)
        if key not in self._expiry:
            self._counts[agent_id] = self._counts.get(agent_id, 0) + 1
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))

    def clear(self) -> None:
        """Forget every nonce."""
        self._expiry.clear()
        self._heap.clear()
        self._counts.clear()


class ReplayStoreError(ValueError):
    """The replay store's SQLite file cannot be used; the message names it and says why."""


def _check_regular_file(path: str) -> None:
    """
    Refuse a path that exists and is not a regular file (a FIFO would block
    SQLite's first read, and with it the reactor), opening it the way
    :mod:`hostlink_tw._files` opens files: non-blocking, then ``fstat``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ReplayStoreError(f"{path}: cannot open the database: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReplayStoreError(
                f"{path}: the database must be a regular file (found a "
                f"{'directory' if os.path.isdir(path) else 'FIFO, socket or device'})"
            )
    finally:
        os.close(fd)


class NonceStore:
    """
    The replay window on disk: one SQLite table (``nonces``: ``agent_id``,
    ``nonce``, ``expires_at``) in the control plane's own database file
    (WAL journal), read once at start and appended to for every accepted
    upgrade.

    Writes run on one thread of their own, never on the reactor: the
    upgrade is answered only once its nonce is committed (so a crash cannot
    forget a nonce an agent or an eavesdropper already saw accepted), and
    upgrades that arrive while a commit is in progress are committed
    together in the next transaction (group commit), so a storm costs one
    commit per batch, not one per upgrade.  ``synchronous=NORMAL``: in WAL
    mode a commit reaches the operating system before it returns, which is
    what survives a control-plane restart or crash; only a power cut can
    lose the last transactions, and a power cut also ends every session.
    Expired rows are deleted in the same transactions, at most once a
    minute.

    The start-up read (:meth:`load`) runs on the calling thread: it happens once,
    before the control plane listens.
    """

    def __init__(self, path: str, reactor: Any) -> None:
        """
        :raises ReplayStoreError: The file is not a regular file, or SQLite
            cannot open or initialise it (the message names the file).
        """
        self.path = path
        self._reactor = reactor
        _check_regular_file(path)
        try:
            # check_same_thread=False: after start-up only the pool's one
            # thread uses the connection.
            self._db: sqlite3.Connection | None = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS nonces ("
                " agent_id TEXT NOT NULL, nonce TEXT NOT NULL, expires_at REAL NOT NULL,"
                " PRIMARY KEY (agent_id, nonce)) WITHOUT ROWID"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS nonces_expires_at ON nonces (expires_at)"
            )
        except sqlite3.Error as e:
            raise ReplayStoreError(f"{path}: cannot use the database: {e}") from None
        # Started with the first write, so a control plane that never
        # accepts an upgrade (one that failed to listen) has no thread to stop.
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="hostlink-controlplane-db")
        self._queue: list[tuple[tuple[str, str, float], Deferred[None]]] = []
        self._flushing: Deferred[None] | None = None
        self._next_purge = 0.0
        self._closed = False

    def load(self, now: float) -> list[tuple[str, str, float]]:
        """The remembered nonces still inside the window at ``now``."""
        assert self._db is not None
        try:
            rows = self._db.execute(
                "SELECT agent_id, nonce, expires_at FROM nonces WHERE expires_at >= ?", (now,)
            ).fetchall()
        except sqlite3.Error as e:
            raise ReplayStoreError(f"{self.path}: cannot read the database: {e}") from None
        return [(str(a), str(n), float(x)) for a, n, x in rows]

    def record(self, agent_id: str, nonce: str, expires_at: float, now: float) -> Deferred[None]:
        """Store one nonce; fire once it is committed (fail if it cannot be)."""
        d: Deferred[None] = Deferred()
        if self._closed:
            d.errback(ReplayStoreError(f"{self.path}: the database is closed"))
            return d
        self._queue.append(((agent_id, nonce, expires_at), d))
        if self._flushing is None:
            self._flush(now)
        return d

    def _flush(self, now: float) -> None:
        batch, self._queue = self._queue, []
        purge_before: float | None = None
        if now >= self._next_purge:
            purge_before = now
            self._next_purge = now + _PURGE_EVERY
        if not self._pool.started:
            self._pool.start()
        flushing = deferToThreadPool(
            self._reactor, self._pool, self._write, [row for row, _ in batch], purge_before
        )
        self._flushing = flushing

        def done(result: object) -> None:
            self._flushing = None
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._queue and not self._closed:
                self._flush(now)

        flushing.addBoth(done)

    def _write(self, rows: Iterable[tuple[str, str, float]], purge_before: float | None) -> None:
        # On the pool's thread.
        db = self._db
        if db is None:
            raise ReplayStoreError(f"{self.path}: the database is closed")
        try:
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT OR REPLACE INTO nonces (agent_id, nonce, expires_at) VALUES (?, ?, ?)",
                    rows,
                )
                if purge_before is not None:
                    db.execute("DELETE FROM nonces WHERE expires_at < ?", (purge_before,))
        except sqlite3.Error as e:
            raise ReplayStoreError(f"{self.path}: cannot write the database: {e}") from None

    def close(self) -> Deferred[None]:
        """Finish the pending writes, then close the file and stop the thread."""
        self._closed = True
        d: Deferred[None] = Deferred()

        def finish(_: object = None) -> None:
            if self._flushing is not None:
                self._flushing.addBoth(finish)
                return
            queued, self._queue = self._queue, []
            for _, waiting in queued:
                waiting.errback(ReplayStoreError(f"{self.path}: the database is closed"))
            if self._pool.started:
                self._pool.stop()
            if self._db is not None:
                self._db.close()
                self._db = None
            if not d.called:
                d.callback(None)

        finish()
        return d


def database_beside(agents_file: str) -> str:
    """The control plane's database path for an agents file: same directory."""
    return os.path.join(os.path.dirname(os.path.abspath(agents_file)), DATABASE_NAME)

