"""
What the client tells its observers: typed events, and why a connection ended.

Every event is a :class:`ClientEvent` with a ``kind`` string and a read-only
``fields`` mapping (what the status page, the demo and JSON observers read);
each kind also has its own class with typed attributes, so code can match on
``isinstance(event, SessionActive)`` instead of strings.  Observers are told
after the transition that caused the event has completed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from twisted.logger import Logger

__all__ = [
    "AttemptEnded",
    "AttemptStarted",
    "ClientEvent",
    "Connected",
    "EndReason",
    "MessageIn",
    "MessageOut",
    "Observers",
    "PingSent",
    "PongReceived",
    "Refused",
    "RetryScheduled",
    "SessionActive",
    "SessionInactive",
    "Stopped",
]


@dataclass(frozen=True)
class EndReason:
    """
    Why a connection attempt or a session ended.

    :ivar kind: a short machine-readable word: ``connect_failed``,
        ``refused`` (the upgrade got an HTTP error), ``tls``, ``timeout``,
        ``protocol`` (the peer broke the protocol), ``closed_by_peer``,
        ``closed_by_agent``, ``lost`` (TCP ended without a close),
        ``setup_error`` (our own code failed while setting the attempt up).
        An attempt that ``stop()`` ended has one of these and
        ``retryable`` false.
    :ivar text: one line for people (log lines, ``/status``).
    :ivar close_code: the WebSocket close code received (or, failing that,
        sent); None without one.
    :ivar http_status: the HTTP status of a refused upgrade.
    :ivar retryable: whether the client tries again (every end but a stop).
    """

    kind: str
    text: str
    close_code: int | None = None
    http_status: int | None = None
    retryable: bool = True


class ClientEvent:
    """
    Something that happened to the client, for observers (status, metrics, tests).

    ``ClientEvent(kind, fields)`` builds a generic one; the subclasses below
    are what the client emits.  Their fields, by ``kind``:

    ``attempt`` (:class:`AttemptStarted`): ``attempt``, ``url``.
    ``connected`` (:class:`Connected`): the upgrade succeeded: ``attempt``, ``url``.
    ``refused`` (:class:`Refused`): ``status`` (HTTP), ``reason``.
    ``active`` (:class:`SessionActive`): ``message_id`` (of the acked hello).
    ``inactive`` (:class:`SessionInactive`): ``reason``.
    ``message_in`` / ``message_out``: ``type``, ``message_id``.
    ``closed`` (:class:`AttemptEnded`), exactly once per attempt: ``code``,
        ``reason``, ``clean``, and ``end`` (the :class:`EndReason`).
    ``ping`` / ``pong``: ``sequence`` (the ping's number on this connection).
    ``retry_scheduled``: ``delay`` (seconds), ``at`` (reactor time).
    ``stopped``: no fields.
    """

    __slots__ = ("fields", "kind")

    kind: str
    fields: Mapping[str, Any]

    def __init__(self, kind: str, fields: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "fields", MappingProxyType(dict(fields or {})))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __getattr__(self, name: str) -> Any:
        # Typed access to the fields (event.attempt, event.reason, ...).
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientEvent):
            return NotImplemented
        return self.kind == other.kind and dict(self.fields) == dict(other.fields)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.fields))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, fields={dict(self.fields)!r})"


class _Typed(ClientEvent):
    KIND: ClassVar[str] = ""

    def __init__(self, **fields: Any) -> None:
        super().__init__(self.KIND, fields)


class AttemptStarted(_Typed):
    """A connection attempt starts."""

    KIND = "attempt"
    attempt: int
    url: str

    def __init__(self, *, attempt: int, url: str) -> None:
        super().__init__(attempt=attempt, url=url)


class Connected(_Typed):
    """The WebSocket upgrade succeeded; the hello is on its way."""

    KIND = "connected"
    attempt: int
    url: str

    def __init__(self, *, attempt: int, url: str) -> None:
        super().__init__(attempt=attempt, url=url)


class Refused(_Typed):
    """The control plane answered the upgrade with an HTTP error."""

    KIND = "refused"
    status: int
    reason: str

    def __init__(self, *, status: int, reason: str) -> None:
        super().__init__(status=status, reason=reason)


class SessionActive(_Typed):
    """The hello was acked: the session is active."""

    KIND = "active"
    message_id: str

    def __init__(self, *, message_id: str) -> None:
        super().__init__(message_id=message_id)


class SessionInactive(_Typed):
    """An active session ended or is ending."""

    KIND = "inactive"
    reason: str

    def __init__(self, *, reason: str) -> None:
        super().__init__(reason=reason)


class MessageIn(_Typed):
    """A valid envelope arrived."""

    KIND = "message_in"
    type: str
    message_id: str

    def __init__(self, *, type: str, message_id: str) -> None:  # noqa: A002 - the wire name
        super().__init__(type=type, message_id=message_id)


class MessageOut(_Typed):
    """An envelope was sent."""

    KIND = "message_out"
    type: str
    message_id: str

    def __init__(self, *, type: str, message_id: str) -> None:  # noqa: A002 - the wire name
        super().__init__(type=type, message_id=message_id)


class AttemptEnded(_Typed):
    """An attempt or connection ended (exactly once per :class:`AttemptStarted`)."""

    KIND = "closed"
    code: int | None
    reason: str
    clean: bool
    end: EndReason

    def __init__(self, *, end: EndReason, clean: bool) -> None:
        super().__init__(code=end.close_code, reason=end.text, clean=clean, end=end)


class PingSent(_Typed):
    """A keepalive ping was sent."""

    KIND = "ping"
    sequence: int

    def __init__(self, *, sequence: int) -> None:
        super().__init__(sequence=sequence)


class PongReceived(_Typed):
    """The pong answering a ping (and every earlier one) arrived."""

    KIND = "pong"
    sequence: int

    def __init__(self, *, sequence: int) -> None:
        super().__init__(sequence=sequence)


class RetryScheduled(_Typed):
    """The next attempt is due in ``delay`` seconds, at reactor time ``at``."""

    KIND = "retry_scheduled"
    delay: float
    at: float

    def __init__(self, *, delay: float, at: float) -> None:
        super().__init__(delay=delay, at=at)


class Stopped(_Typed):
    """``stop()`` finished; nothing is left running."""

    KIND = "stopped"

    def __init__(self) -> None:
        super().__init__()


class Observers:
    """
    The observers of :class:`ClientEvent` s: subscribe, unsubscribe, notify.

    An observer that raises is logged and otherwise ignored: watching the
    client must never break it.
    """

    def __init__(self, log: Logger) -> None:
        self._log = log
        self._observers: list[Callable[[ClientEvent], None]] = []

    def add(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``observer`` with every event from now on; return its unsubscriber."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def __bool__(self) -> bool:
        """Whether anyone observes."""
        return bool(self._observers)

    def notify(self, event: ClientEvent) -> None:
        """Give ``event`` to every observer subscribed now."""
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # noqa: BLE001 - an observer must not break the client
                self._log.failure("client event observer failed on {kind}", kind=event.kind)
