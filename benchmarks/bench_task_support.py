"""
Shared pieces of the task benchmarks (replay, store, fleet): the agent's
task options, the in-process control plane with a tasks file, looks at an
agent's store from outside, ``/proc/PID/io``, and the report's cells.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_support import Identity

__all__ = [
    "STORE_SUFFIXES",
    "start_task_control_plane",
    "store_count",
    "store_files",
    "task_agent_args",
    "unacked_messages",
    "write_bytes",
]

#: The files of one SQLite store in WAL mode.
STORE_SUFFIXES = ("", "-wal", "-shm")


def task_agent_args(cp_port: int, tmp: str, *extra: str) -> list[str]:
    """
    The ``twistd hostlink`` options of an agent that takes tasks from the
    control plane on 127.0.0.1:``cp_port`` (its HTTP paths too, so nothing
    leaves the machine), with its store and task directory under ``tmp``.
    """
    return [
        "--control-plane-url", f"http://127.0.0.1:{cp_port}",
        "--enable-delivery", "--enable-results",
        "--local-store-path", os.path.join(tmp, "agent.db"),
        "--task-workdir", tmp,
        "--reconnect-min", "100ms", "--reconnect-max", "1s",
        "--task-kill-grace", "1s",
        *extra,
    ]


async def start_task_control_plane(identities: Sequence[Identity], tmp: str, port: int = 0,
                                   **options: Any) -> Any:
    """The reference control plane on 127.0.0.1:``port``, its tasks in ``tmp``/cp.db."""
    from hostlink_tw.controlplane import start_control_plane

    return await start_control_plane(
        {i.agent_id: i.key.public_key() for i in identities},
        listen=f"tcp:{port}:interface=127.0.0.1",
        ping_interval=0,
        tasks_database=os.path.join(tmp, "cp.db"),
        **options,
    )


def unacked_messages(path: str) -> int:
    """Unacked messages in an agent store no agent has open (the store's own read)."""
    from hostlink_tw.agent.store import Database

    db = Database(path)
    try:
        return db.outbox_totals()[0]
    finally:
        db.close()


def store_count(path: str, sql: str) -> int:
    """
    One ``count(*)`` from an agent's store, read-only: safe beside the running
    agent (WAL).  0 when the file does not exist yet.
    """
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def store_files(path: str) -> dict[str, int]:
    """Bytes of the store's database, WAL and shared-memory files (0 if absent)."""
    sizes = {}
    for suffix in STORE_SUFFIXES:
        try:
            sizes[suffix or "db"] = os.path.getsize(path + suffix)
        except OSError:
            sizes[suffix or "db"] = 0
    return {k.lstrip("-"): v for k, v in sizes.items()}


def write_bytes(pid: int) -> int:
    """Bytes process ``pid`` caused to be written to storage (``/proc/PID/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")
