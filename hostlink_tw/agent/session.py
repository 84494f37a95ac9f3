"""
One active session: the message dispatch table, sending, and ack waiters.

A :class:`Session` is created when the hello is acked and ended when its
connection closes.  Inbound envelopes are dispatched through a table from
message type to handler (phase 1: ``ack``, ``agent.hello_ack`` and
``error``; every other type breaks the phase-1 rule and ends the
connection).  :meth:`Session.send_expecting_ack` returns a Deferred that
fires with the ``ack`` whose ``acked_message_id`` matches; every waiter
still open when the session ends fails with :class:`SessionEndedError`.

Whatever must outlive sessions (an outbox that flushes on activation)
implements :class:`SessionListener` and is told of each session's start and
end by the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO_ACK,
    ERROR,
    Envelope,
    ErrorPayload,
    ProtocolError,
)
from hostlink_tw.safetext import escape_control
from hostlink_tw.wire.vocabulary import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
)

__all__ = [
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED_DATA",
    "FRAME_PREVIEW_CHARS",
    "Session",
    "SessionEndedError",
    "SessionListener",
    "ViolationError",
    "violation_for",
]

#: At most this many characters of peer text go into a log line.
FRAME_PREVIEW_CHARS = 200



class SessionEndedError(Exception):
    """The session ended before the awaited answer came."""


class ViolationError(Exception):
    """
    An inbound message breaks the protocol: the connection ends.

    :ivar problem: what is wrong, in a few words (log line and close reason).
    :ivar detail: the specifics.
    :ivar close_code: the WebSocket close code to send.
    :ivar msg_type: the envelope's type, when there is one.
    """

    def __init__(self, problem: str, detail: str, close_code: int, msg_type: str | None) -> None:
        super().__init__(f"{problem}: {detail}")
        self.problem = problem
        self.detail = detail
        self.close_code = close_code
        self.msg_type = msg_type


def violation_for(envelope: Envelope) -> ViolationError:
    """The phase-1 rule for an ``error`` or a type the agent does not handle."""
    if envelope.type == ERROR:
        try:
            error = ErrorPayload.from_dict(envelope.payload)
            detail = (
                f"code={escape_control(error.code, FRAME_PREVIEW_CHARS)} "
                f"message={error.message[:FRAME_PREVIEW_CHARS]!r} "
                f"retryable={error.retryable}"
            )
        except ProtocolError as e:
            detail = f"(unreadable error payload: {e})"
        return ViolationError(
            "control plane reported an error", detail, CLOSE_NORMAL, envelope.type
        )
    return ViolationError(
        "unexpected message type",
        f"{envelope.type} is not handled by this agent",
        CLOSE_POLICY,
        envelope.type,
    )


Handler = Callable[[Envelope], None]


class Session:
    """
    An active session.

    :param hello_id: the message id of the hello this session's hello_ack acked.
    :param send: writes one envelope to the connection.
    :param on_ack: told of every ``ack`` and ``agent.hello_ack`` (the last ack seen).
    :param hello_ack: the ``agent.hello_ack`` that made the session active
        (its directives are phase 2's, PROTOCOL §7.2).
    :param paused: whether the connection's transport asks us to stop
        writing (the peer does not read fast enough); see :meth:`when_drained`.
    """

    def __init__(
        self,
        hello_id: str,
        send: Callable[[Envelope], None],
        on_ack: Callable[[Envelope], None],
        *,
        hello_ack: Envelope | None = None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.hello_id = hello_id
        self.hello_ack = hello_ack
        self._send = send
        self._on_ack = on_ack
        self._paused = paused
        self._drain_waiters: list[Deferred[None]] = []
        self._waiters: dict[str, Deferred[Envelope]] = {}
        self.ended: str | None = None
        #: Told of each ``error`` with ``retryable: true`` (the connection stays).
        self.on_retryable_error: Callable[[Envelope, ErrorPayload], None] = (
            lambda envelope, error: None
        )
        #: Message type -> handler.  A type not here breaks the phase-1 rule.
        self.handlers: dict[str, Handler] = {
            ACK: self._ack,
            AGENT_HELLO_ACK: self._ack,
            ERROR: self._error,
        }

    def handle(self, envelope: Envelope) -> None:
        """
        Dispatch one validated inbound envelope.

        :raises ViolationError: the envelope ends the connection.
        """
        handler = self.handlers.get(envelope.type)
        if handler is None:
            raise violation_for(envelope)
        handler(envelope)

    def send(self, envelope: Envelope) -> None:
        """Send one envelope on this session's connection."""
        if self.ended is not None:
            raise SessionEndedError(self.ended)
        self._send(envelope)

    def send_expecting_ack(self, envelope: Envelope) -> Deferred[Envelope]:
        """
        Send ``envelope``; the Deferred fires with the ``ack`` that acks its
        ``message_id``, or fails with :class:`SessionEndedError`.

        :raises SessionEndedError: the session has ended (or is closing).
        :raises ValueError: an ack for this message id is awaited already.
        """
        if self.ended is not None:
            raise SessionEndedError(self.ended)
        if envelope.message_id in self._waiters:
            raise ValueError(f"already waiting for the ack of {envelope.message_id!r}")

        def forget(_: Deferred[Envelope]) -> None:
            self._waiters.pop(envelope.message_id, None)

        self._send(envelope)  # first: a send that raises leaves no waiter behind
        d: Deferred[Envelope] = Deferred(forget)
        self._waiters[envelope.message_id] = d
        return d

    @property
    def paused(self) -> bool:
        """Whether the transport's buffer is full: a bulk sender waits for :meth:`when_drained`."""
        return self._paused()

    def when_drained(self) -> Deferred[None]:
        """Fires when the transport drains (at once when it is not paused);
        fails with :class:`SessionEndedError` if the session ends first."""
        if self.ended is not None:
            return fail(SessionEndedError(self.ended))
        if not self._paused():
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._drain_waiters.remove(d))
        self._drain_waiters.append(d)
        return d

    def drained(self) -> None:
        """The transport asks for more: wake the bulk senders."""
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    @property
    def waiting(self) -> int:
        """How many sent messages still wait for their ack."""
        return len(self._waiters)

    def end(self, reason: str) -> None:
        """The connection is ending: fail every waiter (once)."""
        if self.ended is not None:
            return
        self.ended = reason
        waiters, self._waiters = self._waiters, {}
        for d in waiters.values():
            d.errback(SessionEndedError(reason))
        drains, self._drain_waiters = self._drain_waiters, []
        for drain in drains:
            drain.errback(SessionEndedError(reason))

    def _ack(self, envelope: Envelope) -> None:
        self._on_ack(envelope)
        if envelope.type == ACK:
            # parse_envelope has validated the ack payload.
            d = self._waiters.pop(envelope.payload["acked_message_id"], None)
            if d is not None:
                d.callback(envelope)

    def _error(self, envelope: Envelope) -> None:
        # PROTOCOL §7.5: a retryable error keeps the connection; any other
        # (or an unreadable one) ends it, as in phase 1.
        try:
            error = ErrorPayload.from_dict(envelope.payload)
        except ProtocolError:
            raise violation_for(envelope) from None
        if not error.retryable:
            raise violation_for(envelope)
        self.on_retryable_error(envelope, error)


class SessionListener(Protocol):
    """Something that outlives sessions (an outbox, say) and acts on their start and end."""

    def session_started(self, session: Session) -> None:
        """A session became active (flush here)."""

    def session_ended(self, session: Session, reason: str) -> None:
        """The session ended; its waiters have failed already."""
