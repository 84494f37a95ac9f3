"""
The ``agent.hello`` payload of phase 2 from a store snapshot (PROTOCOL §7.1).

Pure: a :class:`~hostlink_tw.agent.storereads.StoreSnapshot` (or ``None``
when the store is unavailable) and the running attempts' sequences in, the
wire dict out.  Our differences from the Go agent are all here: the true
start time, the true last sequence per stream, contiguous unacked sequences
merged into one range, ``bytes_used`` the exact sum of unacked byte counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hostlink_tw.agent.sizes import encoded_size
from hostlink_tw.agent.storereads import StoreSnapshot
from hostlink_tw.wire.envelope import format_sent_at
from hostlink_tw.wire.hello import (
    Capabilities,
    HelloSnapshot,
    ReceivedAttempt,
    RunningTask,
    SpoolStatus,
    StreamSequences,
    UnackedFinal,
    UnackedOutput,
    hello_payload,
)
from hostlink_tw.wire.payloads import TaskFinalPayload

__all__ = ["BOOT_ID_PATH", "build_hello", "process_identity", "read_boot_id"]

#: Linux's id of the current boot: a process group recorded under another
#: boot id is not ours to kill.
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    """This boot's id, or ``None`` where the system has none."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read(64).strip() or None
    except (OSError, UnicodeError):
        return None


def process_identity(pid: int, boot_id: str | None, proc: str = "/proc") -> str | None:
    """``<boot id>:<start time>`` of process ``pid``, or ``None`` when unknown.

    A pid (and so a process group id) is reused once its process is gone;
    the start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)
    and the boot id tell *our* task's shell from a later process that got
    the same number.
    """
    if boot_id is None:
        return None
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read(4096)
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: cut after the last ')'.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return f"{boot_id}:{fields[19]}"


def build_hello(
    snapshot: StoreSnapshot | None,
    settings: Any,
    *,
    sequences: Mapping[tuple[str, str], Mapping[str, int]],
    version: str,
    limit: int | None = None,
) -> dict[str, Any]:
    """The hello payload: the flags, and the store's state when there is one.

    With ``limit``, the payload is kept within that many bytes encoded: the
    newest entries of the lists are left out until it fits.  A final left
    out is still replayed as a ``task.final`` (§8.6), and an attempt left
    out is still known to the agent; only the control plane's early view of
    them is lost, which is better than a hello that cannot be sent at all.
    """
    capabilities = Capabilities(
        delivery_enabled=settings.delivery_enabled, results_enabled=settings.results_enabled
    )
    if snapshot is None:
        hello = HelloSnapshot(
            capabilities=capabilities,
            client_version=version,
            spool_status=SpoolStatus(byte_cap=settings.spool_cap_bytes),
        )
        return hello_payload(hello)
    running = None
    if snapshot.running:
        # The oldest; others (concurrency > 1) appear only through replay (§7.1).
        oldest = snapshot.running[0]
        seq = sequences.get((oldest.task_id, oldest.attempt_id), {})
        running = RunningTask(
            task_id=oldest.task_id,
            execution_attempt_id=oldest.attempt_id,
            started_at=format_sent_at(oldest.started_at),
            last_output_sequence=StreamSequences(
                stdout=seq.get("stdout", 0), stderr=seq.get("stderr", 0)
            ),
        )
    hello = HelloSnapshot(
        capabilities=capabilities,
        client_version=version,
        running_task=running,
        received_not_started=tuple(
            ReceivedAttempt(q.task_id, q.attempt_id, format_sent_at(q.received_at))
            for q in snapshot.queued
        ),
        unacked_finals=tuple(
            UnackedFinal(
                m.message_id, m.task_id, m.attempt_id,
                TaskFinalPayload.from_dict(m.payload, flags_required=True),
            )
            for m in snapshot.unacked_finals
        ),
        unacked_output=tuple(
            UnackedOutput(
                r.task_id, r.attempt_id, r.stream, r.first_sequence, r.last_sequence,
                r.truncated_locally,
            )
            for r in snapshot.unacked_output
        ),
        spool_status=SpoolStatus(
            byte_cap=settings.spool_cap_bytes, bytes_used=snapshot.bytes_used,
            has_rotated_chunks=False,
        ),
    )
    payload = hello_payload(hello)
    if limit is None or encoded_size(payload) <= limit:
        return payload
    return _trimmed(payload, limit)


def _trimmed(payload: dict[str, Any], limit: int) -> dict[str, Any]:
    trimmed = dict(payload)
    # Finals first (the largest, and replayed anyway), then output ranges,
    # then the queue; newest first within each.
    for key in ("unacked_finals", "unacked_output", "received_not_started"):
        items = list(trimmed[key])
        while items and encoded_size(trimmed) > limit:
            # Drop about the share of the excess one entry is worth, at least one.
            size = encoded_size(trimmed)
            each = max(1, encoded_size(items) // len(items))
            drop = max(1, min(len(items), (size - limit) // each))
            items = items[:-drop]
            trimmed[key] = items
        if encoded_size(trimmed) <= limit:
            break
    return trimmed
