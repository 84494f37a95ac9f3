"""
The interfaces between the agent's pieces.

:class:`ConnectionOwner`
    what a :class:`~hostlink_tw.agent.connection.HostlinkClientProtocol`
    reports to: its :class:`~hostlink_tw.agent.attempt.Attempt`.
:class:`AttemptHost`
    what an attempt needs of the client that owns it.
:class:`TaskHandler`
    what the client asks of the task engine (phase 2): the hello's payload
    and every ``task.deliver``, with a :class:`Channel` to answer on.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.events import ClientEvent
from hostlink_tw.agent.machine import StateMachine
from hostlink_tw.agent.settings import ClientSettings
from hostlink_tw.protocol import Envelope

if TYPE_CHECKING:
    from hostlink_tw.agent.attempt import Attempt
    from hostlink_tw.agent.connection import HostlinkClientProtocol
    from hostlink_tw.agent.session import Session

__all__ = ["AttemptHost", "Channel", "ConnectionOwner", "TaskHandler"]


class ConnectionOwner(Protocol):
    """What a :class:`HostlinkClientProtocol` reports to: its attempt."""

    def sign_upgrade(self) -> Mapping[str, str]: ...
    def proxy_authorization(self) -> str | None: ...
    def connection_made(self, proto: HostlinkClientProtocol) -> None: ...
    def hook_failed(
        self, proto: HostlinkClientProtocol, step: str, error: BaseException
    ) -> None: ...
    def write_blocked(self, proto: HostlinkClientProtocol, unsent: int) -> None: ...
    def write_resumed(self, proto: HostlinkClientProtocol) -> None: ...
    def message_begun(self, proto: HostlinkClientProtocol) -> None: ...
    def message_done(self, proto: HostlinkClientProtocol) -> None: ...
    def too_many_frames(self, proto: HostlinkClientProtocol, frames: int) -> None: ...
    def bad_head(self, proto: HostlinkClientProtocol, reason: str, data: bytes) -> None: ...
    def proxy_refused(self, proto: HostlinkClientProtocol, reason: str) -> None: ...
    def upgrade_failed(
        self, proto: HostlinkClientProtocol, status: int | None, phrase: str,
        headers: Mapping[str, str], body: bytes, reason: str,
    ) -> None: ...
    def opened(self, proto: HostlinkClientProtocol) -> None: ...
    def message(self, proto: HostlinkClientProtocol, payload: bytes, is_binary: bool) -> None: ...
    def pong(self, proto: HostlinkClientProtocol, payload: bytes) -> None: ...
    def closing(
        self, proto: HostlinkClientProtocol, code: int | None, reason: str, *, by_agent: bool,
        by_library: bool,
    ) -> None: ...
    def peer_closing(
        self, proto: HostlinkClientProtocol, code: int | None, reason: str
    ) -> None: ...
    def connection_lost(self, proto: HostlinkClientProtocol, reason: Failure) -> None: ...



class AttemptHost(Protocol):
    """What an :class:`Attempt` needs of the client that owns it."""

    settings: ClientSettings
    agent_id: str
    log: Logger
    close_timeout: float

    @property
    def clock(self) -> IReactorTime: ...
    @property
    def machine(self) -> StateMachine: ...
    @property
    def display_url(self) -> str: ...
    @property
    def tls_host(self) -> str: ...

    def log_fields(self) -> dict[str, Any]: ...
    def handling(self) -> AbstractContextManager[None]: ...
    def emit(self, event: ClientEvent) -> None: ...
    def sign_upgrade(self) -> Mapping[str, str]: ...
    def proxy_authorization(self) -> str | None: ...
    def ack_received(self, envelope: Envelope) -> None: ...
    def session_activated(self, attempt: Attempt, session: Session) -> None: ...
    def connection_opened(self, at: float) -> None: ...
    def report_connect_failed(self, connector: Any, reason: Failure) -> None: ...
    @property
    def tasks(self) -> TaskHandler | None: ...


class Channel(Protocol):
    """One connection, as the task engine answers on it (before or during its session)."""

    def send_if_open(self, envelope: Envelope) -> bool:
        """Send when this connection is still the current, open one; else False."""


class TaskHandler(Protocol):
    """What the client asks of the task engine (PROTOCOL §7.1, §7.3)."""

    def hello_payload(self) -> Deferred[dict[str, Any]]:
        """The ``agent.hello`` payload, taken when the hello is built; never fails."""

    def delivered(self, envelope: Envelope, channel: Channel) -> None:
        """A ``task.deliver`` arrived on ``channel`` (before or after its hello_ack).

        :raises ViolationError: the deliver breaks the protocol (the
            connection ends).
        """
