"""
Open sessions: one :class:`Session` per authenticated WebSocket, and the
:class:`SessionRegistry` that holds them by agent id.

The registry keeps at most one session per agent (a newer one replaces the
older, which is closed with 4001) and the waiters of the in-process API:
:meth:`SessionRegistry.wait_active` (the hello was acked) and
:meth:`SessionRegistry.wait_message` (an envelope arrived).  The gateway
(:mod:`hostlink_tw.controlplane.gateway`) tells it what happens; it never
reaches into a connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hostlink_tw.wire.envelope import Envelope, format_sent_at
from hostlink_tw.wire.vocabulary import CLOSE_NORMAL, CLOSE_REPLACED

__all__ = ["NoSessionError", "Session", "SessionConnection", "SessionRegistry"]

log = Logger()


class NoSessionError(KeyError):
    """The agent has no open session on this control plane."""

    def __str__(self) -> str:
        return f"no open session for agent {self.args[0]!r}"


class SessionConnection(Protocol):
    """What a :class:`Session` needs of its connection (the gateway's protocol)."""

    def send_frame(self, data: bytes, *, is_binary: bool) -> None:
        """Send one message frame."""

    def close_with(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with any code."""

    def abort(self) -> None:
        """Drop the TCP connection at once."""


class Session:
    """
    One open WebSocket session of an authenticated agent.

    Counters and timestamps are what ``/status`` reports.  ``received`` keeps
    the last inbound envelopes, for tests, only while the control plane's
    ``record_messages`` is set, and only that many bytes of them
    (:meth:`record`, called by the test layer).
    """

    def __init__(
        self, protocol: SessionConnection, agent_id: str, remote: str, now: float
    ) -> None:
        self._protocol = protocol
        self.agent_id = agent_id
        self.remote = remote
        self.connected_since = now
        self.last_message_at: float | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.pings_received = 0
        self.active = False
        self.active_since: float | None = None
        self.hello_message_id: str | None = None
        self.received: deque[Envelope] = deque()
        self._received_sizes: deque[int] = deque()
        self._received_bytes = 0
        #: The most bytes ever waiting in this connection's send buffers.
        self.peak_send_buffer = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = False
        self._closed_waiters: list[Deferred[int | None]] = []

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.active else "open")
        return f"<Session agent_id={self.agent_id!r} remote={self.remote} {state}>"

    def send_envelope(self, envelope: Envelope) -> None:
        """Send one envelope as a text frame (not validated: tests may send bad ones)."""
        self.send_text(envelope.to_json())

    def send_text(self, text: str) -> None:
        """Send a raw text frame."""
        self._protocol.send_frame(text.encode("utf-8"), is_binary=False)

    def send_binary(self, data: bytes) -> None:
        """Send a raw binary frame."""
        self._protocol.send_frame(data, is_binary=True)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> Deferred[int | None]:
        """
        Start the closing handshake with any code (1001, 1008, 4xxx… are
        all allowed here) and fire with the close code once the connection
        is gone.
        """
        self._protocol.close_with(code, reason)
        return self.when_closed()

    def abort(self) -> Deferred[int | None]:
        """Drop the TCP connection without a close frame; fire when it is gone."""
        self._protocol.abort()
        return self.when_closed()

    def when_closed(self) -> Deferred[int | None]:
        """Fire with the close code once the connection is gone."""
        if self.closed:
            return defer.succeed(self.close_code)
        d: Deferred[int | None] = Deferred()
        self._closed_waiters.append(d)
        return d

    def snapshot(self) -> dict[str, Any]:
        """The JSON-able state ``/status`` shows."""
        return {
            "agent_id": self.agent_id,
            "remote": self.remote,
            "active": self.active,
            "connected_since": format_sent_at(self.connected_since),
            "last_message_at": (
                None if self.last_message_at is None else format_sent_at(self.last_message_at)
            ),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
        }

    def record(self, envelope: Envelope, size: int, limit: int) -> None:
        """Keep an inbound envelope of ``size`` bytes, the oldest going past ``limit`` bytes."""
        if limit <= 0 or size > limit:
            return
        self.received.append(envelope)
        self._received_sizes.append(size)
        self._received_bytes += size
        while self._received_bytes > limit:
            self.received.popleft()
            self._received_bytes -= self._received_sizes.popleft()

    def ended(self, code: int | None, reason: str | None) -> None:
        """The connection is gone (called by the gateway): fire the close waiters."""
        self.closed = True
        self.active = False
        self.close_code = code
        self.close_reason = reason
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(code)


class SessionRegistry:
    """The open sessions, one per agent, and who waits for what on them."""

    def __init__(self, reactor: Any) -> None:
        """:param reactor: Runs the waiters' timeouts."""
        self._reactor = reactor
        self._sessions: dict[str, Session] = {}
        self._active_waiters: dict[str, list[Deferred[Session]]] = {}
        self._message_waiters: list[tuple[str, str | None, Deferred[Envelope]]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        """The open sessions (one per agent), oldest first."""
        return sorted(self._sessions.values(), key=lambda s: s.connected_since)

    def get(self, agent_id: str) -> Session:
        """
        The agent's open session.

        :raises NoSessionError: It has none.
        """
        session = self._sessions.get(agent_id)
        if session is None:
            raise NoSessionError(agent_id)
        return session

    def wait_active(
        self, agent_id: str, *, new: bool = False, timeout: float | None = None
    ) -> Deferred[Session]:
        """
        Fire with the agent's session once its hello is acked.

        :param new: Wait for a session that becomes active after this call,
            even if one is active now (after a reconnect).
        :param timeout: Seconds, then fail with :class:`defer.TimeoutError`.
        """
        current = self._sessions.get(agent_id)
        if not new and current is not None and current.active:
            return defer.succeed(current)
        d: Deferred[Session] = Deferred()
        waiters = self._active_waiters.setdefault(agent_id, [])
        waiters.append(d)

        def forget(result: object) -> object:
            if d in waiters:
                waiters.remove(d)
            return result

        d.addBoth(forget)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        return d

    def wait_message(
        self, agent_id: str, message_type: str | None = None, *, timeout: float | None = None
    ) -> Deferred[Envelope]:
        """Fire with the next valid envelope from the agent (of that type, if given)."""
        d: Deferred[Envelope] = Deferred()
        entry = (agent_id, message_type, d)
        self._message_waiters.append(entry)

        def forget(result: object) -> object:
            if entry in self._message_waiters:
                self._message_waiters.remove(entry)
            return result

        d.addBoth(forget)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        return d

    def cancel_waiters(self) -> None:
        """Cancel every waiter (the control plane is stopping)."""
        for waiters in self._active_waiters.values():
            for waiter in list(waiters):
                waiter.cancel()
        self._active_waiters.clear()
        for _, _, message_waiter in list(self._message_waiters):
            message_waiter.cancel()
        self._message_waiters.clear()

    # -- what the gateway reports -------------------------------------------------

    def opened(self, session: Session) -> None:
        """A WebSocket was accepted: it is the agent's session now."""
        previous = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        log.info(
            "session started agent_id={agent_id} remote={remote}",
            agent_id=session.agent_id,
            remote=session.remote,
        )
        if previous is not None and not previous.closed:
            log.info(
                "session replaced agent_id={agent_id} old_remote={old} new_remote={new}",
                agent_id=session.agent_id,
                old=previous.remote,
                new=session.remote,
            )
            previous.close(CLOSE_REPLACED, "replaced")

    def activated(self, session: Session) -> None:
        """The session's hello was acked."""
        for d in list(self._active_waiters.get(session.agent_id, [])):
            d.callback(session)

    def closed(self, session: Session) -> None:
        """The session's connection is gone."""
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]

    def message_received(self, session: Session, envelope: Envelope) -> None:
        """A valid envelope arrived (and was handled)."""
        for agent_id, message_type, d in list(self._message_waiters):
            if agent_id == session.agent_id and message_type in (None, envelope.type):
                d.callback(envelope)
