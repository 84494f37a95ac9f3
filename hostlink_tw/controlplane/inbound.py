"""
What an agent's session does with each valid envelope it receives: a table
from message type to handler (phase 1).

``agent.hello`` is answered with ``agent.hello_ack`` acking its
``message_id``, which makes the session active; it must come first, or the
session is refused (``hello_required``).  ``ack`` is taken as is; an
``error`` from the agent is logged; the ``task.*`` messages an agent sends
are acknowledged with ``ack``; any other type is refused
(``unexpected_type``).

Phase 2: with :class:`TaskHandling` attached (:meth:`InboundHandlers.attach_tasks`;
the control plane attaches its :class:`~hostlink_tw.controlplane.tasks.TaskService`),
the hello is answered with the task side's payload (its snapshot's
directives; a hello whose payload is neither ``{}`` nor a valid snapshot is
refused like an invalid frame), the task side is told once the hello_ack is
out, the ``task.*`` messages are its, and it sees the agent's errors too.
The gateway makes each read of a connection one :meth:`InboundHandlers.batch`:
the task side stores the output that read brings at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from hostlink_tw.controlplane.sessions import Session, SessionRegistry
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.errors import ProtocolError
from hostlink_tw.wire.payloads import ack_payload
from hostlink_tw.wire.vocabulary import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    CLOSE_POLICY,
    ERROR,
    TASK_DELIVER,
    TASK_OUTPUT,
    TASK_TYPES,
)

if TYPE_CHECKING:
    from hostlink_tw.controlplane.hooks import GatewayHooks

__all__ = ["InboundConnection", "InboundHandlers", "TaskHandling", "ack_envelope", "printable"]

log = Logger()


def ack_envelope(agent_id: str, envelope: Envelope, highest: int | None, now: float) -> Envelope:
    """The ``ack`` of ``envelope``: its id and type, its task ids, and for a
    ``task.output`` the highest output sequence held (``highest``)."""
    return make_envelope(
        ACK,
        agent_id,
        ack_payload(
            envelope.message_id,
            envelope.type,
            envelope.task_id,
            envelope.execution_attempt_id,
            highest if envelope.type == TASK_OUTPUT else None,
        ),
        now=now,
        task_id=envelope.task_id,
        execution_attempt_id=envelope.execution_attempt_id,
    )


def printable(text: str | None, limit: int = 128) -> str:
    """A header value or peer text made safe for one log line (hostile input)."""
    if text is None:
        return "-"
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")


class InboundConnection(Protocol):
    """What a handler may do with the connection an envelope came on."""

    def send_envelope(self, envelope: Envelope) -> None:
        """Send one envelope as a text frame."""

    def refuse(self, close_code: int, code: str, message: str, related: str) -> None:
        """Answer with an ``error`` envelope, then close with ``close_code``."""


Handler = Callable[[InboundConnection, Session, Envelope], None]


class TaskHandling(Protocol):
    """The task side of a session (phase 2), as the handlers call it."""

    def hello_ack(self, session: Session, envelope: Envelope) -> dict[str, object]:
        """
        The ``agent.hello_ack`` payload for this hello.

        :raises ProtocolError: The hello's payload is not acceptable.
        """

    def activated(self, session: Session) -> None:
        """The hello_ack was sent."""

    def handle(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        """A ``task.*`` message from the agent."""

    def agent_error(self, session: Session, envelope: Envelope) -> None:
        """An ``error`` from the agent (after it is logged)."""

    def batch(self, connection: InboundConnection) -> AbstractContextManager[None]:
        """The messages handled inside are one batch (their output is stored at once)."""


class InboundHandlers:
    """The handlers of an active session's messages, by message type."""

    def __init__(
        self, clock: Callable[[], float], hooks: GatewayHooks, sessions: SessionRegistry
    ) -> None:
        """
        :param clock: Wall-clock Unix time (``sent_at`` of our answers).
        :param hooks: Asked whether a hello is answered.
        :param sessions: Told when a session becomes active.
        """
        self._clock = clock
        self._hooks = hooks
        self._sessions = sessions
        self._table: dict[str, Handler] = {ACK: self._ignore, ERROR: self._agent_error}
        for message_type in TASK_TYPES - {TASK_DELIVER}:
            self._table[message_type] = self._ack
        self._tasks: TaskHandling | None = None

    def attach_tasks(self, tasks: TaskHandling) -> None:
        """Hand hellos, ``task.*`` messages and the agent's errors to the task side too."""
        self._tasks = tasks
        for message_type in TASK_TYPES - {TASK_DELIVER}:
            self._table[message_type] = tasks.handle

    def batch(self, connection: InboundConnection) -> AbstractContextManager[None]:
        """The messages handled inside (one read of ``connection``) are one batch."""
        if self._tasks is None:
            return nullcontext()
        return self._tasks.batch(connection)

    def handle(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        """Handle one valid envelope (already checked against the session's agent id)."""
        if envelope.type == AGENT_HELLO:
            self._hello(connection, session, envelope)
            return
        if session.hello_message_id is None:
            connection.refuse(
                CLOSE_POLICY,
                "hello_required",
                f"the first message must be {AGENT_HELLO}, not {envelope.type}",
                envelope.message_id,
            )
            return
        self._table.get(envelope.type, self._unexpected)(connection, session, envelope)

    def _hello(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        session.hello_message_id = envelope.message_id
        if not self._hooks.ack_hello(session):
            return
        if self._tasks is None:
            payload: dict[str, object] = ack_payload(envelope.message_id, envelope.type)
        else:
            try:
                payload = self._tasks.hello_ack(session, envelope)
            except ProtocolError as e:
                connection.refuse(CLOSE_POLICY, e.code, e.message, envelope.message_id)
                return
        connection.send_envelope(
            make_envelope(AGENT_HELLO_ACK, session.agent_id, payload, now=self._clock())
        )
        if not session.active:
            session.active = True
            session.active_since = self._clock()
            log.info(
                "session active agent_id={agent_id} remote={remote}",
                agent_id=session.agent_id,
                remote=session.remote,
            )
            self._sessions.activated(session)
        if self._tasks is not None:
            self._tasks.activated(session)

    def _ignore(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        pass

    def _agent_error(
        self, connection: InboundConnection, session: Session, envelope: Envelope
    ) -> None:
        log.warn(
            "agent reported an error agent_id={agent_id} code={code} message={message}",
            agent_id=session.agent_id,
            code=printable(str(envelope.payload.get("code", ""))),
            message=printable(str(envelope.payload.get("message", "")), 200),
        )
        if self._tasks is not None:
            self._tasks.agent_error(session, envelope)

    def _ack(self, connection: InboundConnection, session: Session, envelope: Envelope) -> None:
        connection.send_envelope(
            ack_envelope(session.agent_id, envelope, envelope.sequence, self._clock())
        )

    def _unexpected(
        self, connection: InboundConnection, session: Session, envelope: Envelope
    ) -> None:
        connection.refuse(
            CLOSE_POLICY,
            "unexpected_type",
            f"an agent may not send {envelope.type}",
            envelope.message_id,
        )
