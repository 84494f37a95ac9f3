"""
The answer to an agent's reconnect snapshot (PROTOCOL §7.1, §7.2): which of
its finals the control plane already has, which attempts it must drop, and
where each stream's replay should resume.  Pure: :func:`plan_hello` reads the
snapshot and asks an :class:`AttemptKnowledge` what the control plane knows;
the task service applies the :class:`HelloPlan` to its store and sends
:meth:`HelloPlan.directives`.

The rules, attempt by attempt (every attempt the snapshot names: the running
one, the received ones, those with unacked output or finals):

* An attempt the control plane no longer wants is discarded, with the
  reason: ``unknown_attempt`` (not ours, or not this agent's),
  ``task_cancelled``, or ``superseded`` (its task has another current
  attempt).
* An unacked final is acknowledged when it is stored already (same message
  id) or its attempt already has a final.  A wanted attempt's final with no
  output of that attempt left to replay is *adopted*: stored from the
  snapshot and acknowledged, so an agent that does not replay finals after
  directives (the Go agent) still delivers it.  Any other wanted final is
  left to the agent's replay, after its output.
* ``output_replay``, for every stream of a wanted attempt with unacked
  output, and both streams of a wanted running attempt: the next sequence
  this control plane needs (highest stored + 1).  When the agent no longer
  has that sequence (its unacked range starts above it, or it reports having
  sent more than was ever stored here and has nothing unacked), the missing
  sequences are given up on (:attr:`HelloPlan.skipped_output`; the task is
  flagged truncated) rather than asked for in a loop of gap errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from hostlink_tw.wire.hello import (
    DiscardedAttempt,
    HelloAckDirectives,
    HelloSnapshot,
    OutputReplay,
    UnackedFinal,
)
from hostlink_tw.wire.payloads import STREAM_STDERR, STREAM_STDOUT
from hostlink_tw.wire.vocabulary import AGENT_HELLO

__all__ = [
    "REASON_CANCELLED",
    "REASON_SUPERSEDED",
    "REASON_UNKNOWN",
    "AttemptKnowledge",
    "HelloPlan",
    "plan_hello",
    "snapshot_attempts",
]

#: ``discarded_attempts`` reasons.
REASON_UNKNOWN = "unknown_attempt"
REASON_CANCELLED = "task_cancelled"
REASON_SUPERSEDED = "superseded"


class AttemptKnowledge(Protocol):
    """What :func:`plan_hello` asks of the control plane's store, for one agent."""

    def unwanted(self, task_id: str, attempt_id: str) -> str | None:
        """Why this attempt is no longer wanted (a discard reason), or None if it is."""

    def highest(self, attempt_id: str, stream: str) -> int:
        """The highest output sequence stored for the attempt's stream (0: none)."""

    def stored_finals(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these final message ids are stored."""

    def has_final(self, attempt_id: str) -> bool:
        """Whether a final of the attempt is stored."""


@dataclass(frozen=True)
class HelloPlan:
    """
    What to answer a snapshot with, and what to record first.

    :ivar adopted_finals: Finals to store from the snapshot (each is also in
        :attr:`acknowledged_final_message_ids`).
    :ivar skipped_output: ``(attempt_id, stream, highest)``: sequences up to
        ``highest`` the agent no longer has and this control plane never
        stored; move past them.
    :ivar mentioned: Every attempt id the snapshot names.
    """

    acknowledged_final_message_ids: tuple[str, ...] = ()
    discarded_attempts: tuple[DiscardedAttempt, ...] = ()
    output_replay: tuple[OutputReplay, ...] = ()
    adopted_finals: tuple[UnackedFinal, ...] = ()
    skipped_output: tuple[tuple[str, str, int], ...] = ()
    mentioned: frozenset[str] = frozenset()

    def directives(self, hello_message_id: str, delivery_enabled: bool) -> HelloAckDirectives:
        """The ``agent.hello_ack`` payload acking that hello."""
        return HelloAckDirectives(
            acked_message_id=hello_message_id,
            acked_type=AGENT_HELLO,
            acknowledged_final_message_ids=self.acknowledged_final_message_ids,
            discarded_attempts=self.discarded_attempts,
            output_replay=self.output_replay,
            delivery_enabled=delivery_enabled,
        )


def snapshot_attempts(snapshot: HelloSnapshot) -> list[tuple[str, str]]:
    """Every ``(task_id, execution_attempt_id)`` the snapshot names, once, in order."""
    pairs: list[tuple[str, str]] = []
    if snapshot.running_task is not None:
        pairs.append((snapshot.running_task.task_id, snapshot.running_task.execution_attempt_id))
    pairs.extend((r.task_id, r.execution_attempt_id) for r in snapshot.received_not_started)
    pairs.extend((o.task_id, o.execution_attempt_id) for o in snapshot.unacked_output)
    pairs.extend((f.task_id, f.execution_attempt_id) for f in snapshot.unacked_finals)
    return list(dict.fromkeys(pairs))


def plan_hello(snapshot: HelloSnapshot, known: AttemptKnowledge) -> HelloPlan:
    """Decide the answer to ``snapshot`` from what ``known`` says (see the module docstring)."""
    pairs = snapshot_attempts(snapshot)
    reasons = {pair: known.unwanted(*pair) for pair in pairs}
    wanted = {attempt for (task, attempt), reason in reasons.items() if reason is None}
    discarded = tuple(
        DiscardedAttempt(task, attempt, reason)
        for (task, attempt), reason in reasons.items()
        if reason is not None
    )
    running = snapshot.running_task

    # Streams with output still to come, and where the agent's unacked range starts.
    first_unacked: dict[tuple[str, str, str], int] = {}
    for output in snapshot.unacked_output:
        if output.execution_attempt_id in wanted:
            key = (output.task_id, output.execution_attempt_id, output.stream)
            first_unacked[key] = min(first_unacked.get(key, output.first_sequence),
                                     output.first_sequence)
    streaming = {attempt for _, attempt, _ in first_unacked}
    if running is not None:
        streaming.add(running.execution_attempt_id)

    acknowledged: list[str] = []
    adopted: list[UnackedFinal] = []
    stored = known.stored_finals(final.message_id for final in snapshot.unacked_finals)
    ended: set[str] = set()
    for final in snapshot.unacked_finals:
        attempt = final.execution_attempt_id
        if final.message_id in stored or attempt in ended or known.has_final(attempt):
            acknowledged.append(final.message_id)
        elif attempt in wanted and attempt not in streaming:
            adopted.append(final)
            acknowledged.append(final.message_id)
        else:
            continue
        ended.add(attempt)

    replay: list[OutputReplay] = []
    skipped: list[tuple[str, str, int]] = []
    for (task, attempt, stream), first in first_unacked.items():
        needed = known.highest(attempt, stream) + 1
        if needed < first:
            skipped.append((attempt, stream, first - 1))
            needed = first
        replay.append(OutputReplay(task, attempt, stream, needed))
    if running is not None and running.execution_attempt_id in wanted:
        task, attempt = running.task_id, running.execution_attempt_id
        for stream, last in (
            (STREAM_STDOUT, running.last_output_sequence.stdout),
            (STREAM_STDERR, running.last_output_sequence.stderr),
        ):
            if (task, attempt, stream) in first_unacked:
                continue
            needed = known.highest(attempt, stream) + 1
            if needed <= last:  # sent and acked, by someone, but not stored here
                skipped.append((attempt, stream, last))
                needed = last + 1
            replay.append(OutputReplay(task, attempt, stream, needed))

    return HelloPlan(
        acknowledged_final_message_ids=tuple(dict.fromkeys(acknowledged)),
        discarded_attempts=discarded,
        output_replay=tuple(replay),
        adopted_finals=tuple(adopted),
        skipped_output=tuple(skipped),
        mentioned=frozenset(attempt for _, attempt in pairs),
    )
