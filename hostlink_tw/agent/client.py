"""
:class:`HostlinkClient`: the agent's connection to the control plane, kept
up until :meth:`~HostlinkClient.stop`.

The client owns the state machine (:mod:`~hostlink_tw.agent.machine`),
delivers events, and connects the factory, Twisted's reconnect loop, once
in :meth:`~HostlinkClient.start`.  Each connection attempt is an
:class:`~hostlink_tw.agent.attempt.Attempt`: its protocol reports to it, and
it owns the attempt's deadlines, the keepalive and, once the hello is acked,
the :class:`~hostlink_tw.agent.session.Session`.

Timing rules (keepalive, hello, handshake and close timeouts, retry delays)
run on ``callLater`` of the injected reactor.  Autobahn's own timers run on
txaio's batched loop, which rounds deadlines to buckets, and are all off.

How a message travels: TCP bytes → Autobahn's framing (bounded by
``MAX_MESSAGE_BYTES``) → ``HostlinkClientProtocol.onMessage`` →
:meth:`Attempt.message` (validated by
:func:`~hostlink_tw.protocol.parse_envelope` against the agent's id) → the
hello_ack check before the session, or the session's dispatch table after
it; answers go back through :meth:`Session.send`, which writes one JSON
text frame.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.attempt import Attempt
from hostlink_tw.agent.events import (
    AttemptEnded,
    AttemptStarted,
    ClientEvent,
    EndReason,
    Observers,
    Refused,
    RetryScheduled,
    SessionActive,
    SessionInactive,
    Stopped,
)
from hostlink_tw.agent.factory import HostlinkClientFactory
from hostlink_tw.agent.interfaces import TaskHandler
from hostlink_tw.agent.machine import ClientState, StateMachine
from hostlink_tw.agent.reporting import EndReporter
from hostlink_tw.agent.session import (
    Session,
    SessionListener,
)
from hostlink_tw.agent.settings import ClientSettings
from hostlink_tw.backoff import Backoff, BackoffPolicy
from hostlink_tw.protocol import (
    Envelope,
)
from hostlink_tw.proxy import Proxy, UnsupportedProxyError, proxy_for
from hostlink_tw.safetext import redact_url
from hostlink_tw.signing import RequestSigner
from hostlink_tw.tls import TLSConfigError, client_tls_options

__all__ = ["CLOSE_TIMEOUT", "HostlinkClient", "redact_url"]

#: How long a close handshake may take (ours, the peer's, or stop()'s)
#: before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0

S = ClientState


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostlinkClient:
    """
    The agent's connection to the control plane, kept up until :meth:`stop`.

    :param settings: a :class:`hostlink_tw.config.Settings` (or anything with
        the attributes of :class:`ClientSettings`).
    :param signer: signs each upgrade; its ``agent_id`` is the agent's id.
    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``; the global
        reactor by default.
    :param rng: the source of jitter; inject a seeded one in tests.
    :param log: where log events go.
    :param environ: the environment for ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``;
        ``os.environ`` by default.
    :param close_timeout: how long a close handshake may take before the
        connection is aborted.
    :param backoff: the retry delays; by default a :class:`Backoff` from the
        settings' reconnect min/max/jitter.

    :raises ValueError: ``settings.ws_url`` is not a ``ws://``/``wss://`` URL,
        or the reconnect settings are unusable.

    State for callers (times are the reactor's ``seconds()``):

    :ivar url: the WebSocket URL (``snapshot()`` shows it without credentials).
    :ivar agent_id: the signer's agent id.
    :ivar state: the :class:`ClientState`.
    :ivar last_ack: the last ``agent.hello_ack`` or ``ack`` envelope received.
    :ivar last_ack_at: when it arrived.
    :ivar connected_since: when the current WebSocket opened; None without one.
    :ivar attempts: connection attempts since the last active session.
    :ivar last_failure: why the last connection or attempt ended (None once a
        session is active again).
    :ivar last_end: the same as an :class:`EndReason`.
    :ivar next_retry_at: when the pending retry is due; None when none is.
    :ivar current_delay: the delay of the pending retry; None when none is.
    :ivar proxy: the :class:`~hostlink_tw.proxy.Proxy` in use, or None.
    :ivar session: the active :class:`Session`, or None.
    """

    def __init__(
        self,
        settings: ClientSettings,
        signer: RequestSigner,
        *,
        reactor: Any = None,
        rng: random.Random | None = None,
        log: Logger | None = None,
        environ: Mapping[str, str] | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings
        self.signer = signer
        self.log = log if log is not None else Logger(namespace="hostlink_tw.client")
        self.close_timeout = close_timeout
        self.url = settings.ws_url
        self.agent_id = signer.agent_id
        self._display_url = redact_url(self.url)
        self._clock = cast(IReactorTime, reactor)
        self._tcp = cast(IReactorTCP, reactor)
        self._proxy_error: UnsupportedProxyError | None = None
        try:
            self.proxy: Proxy | None = proxy_for(
                self.url, os.environ if environ is None else environ
            )
        except UnsupportedProxyError as e:
            # Fail closed, as Go's dialer does for a proxy it cannot use:
            # connecting directly would bypass the operator's egress policy.
            self.proxy = None
            self._proxy_error = UnsupportedProxyError(
                f"{e}; not connecting around it (use an http:// proxy, or list the "
                "control plane's host in NO_PROXY to connect directly)"
            )
            self.log.error(
                "unusable proxy setting: {error} url={url}",
                error=str(self._proxy_error),
                url=self._display_url,
            )
        if backoff is None:
            backoff = Backoff(
                settings.reconnect_min, settings.reconnect_max, settings.reconnect_jitter, rng
            )
        self._factory = HostlinkClientFactory(
            self, self.url, backoff, reactor, self.proxy, settings.max_message_bytes
        )
        self._machine = StateMachine(self._state_changed)
        self._connector: Any = None
        self._attempt: Attempt | None = None
        self.last_ack: Envelope | None = None
        self.last_ack_at: float | None = None
        self.connected_since: float | None = None
        self.attempts = 0
        self.last_failure: str | None = None
        self.last_end: EndReason | None = None
        self.next_retry_at: float | None = None
        self.current_delay: float | None = None
        self._observers = Observers(self.log)
        self._listeners: list[SessionListener] = []
        #: Phase 2's task engine (set by the service); ``None``: a phase-1
        #: agent (an empty hello, and ``task.deliver`` ends the connection).
        self.tasks: TaskHandler | None = None
        self._queued: list[Callable[[], None]] = []
        self._depth = 0
        self._handling = _Handling(self)
        self._active_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._warned_plaintext = False
        self._reporter = EndReporter(self.log, self.log_fields)

    # -- public API ----------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The :class:`ClientState` now."""
        return self._machine.state

    @property
    def factory(self) -> HostlinkClientFactory:
        """The reconnecting factory (for tests and introspection)."""
        return self._factory

    @property
    def is_active(self) -> bool:
        """Whether a session is active (its hello acked and not ending)."""
        return self.state is S.ACTIVE

    @property
    def session(self) -> Session | None:
        """The active session, if there is one."""
        attempt = self._attempt
        return attempt.session if attempt is not None and self.is_active else None

    @property
    def hello_id(self) -> str | None:
        """The message id of the current connection's hello, once sent."""
        return self._attempt.hello_id if self._attempt is not None else None

    @property
    def attempt_in_progress(self) -> bool:
        """Whether an attempt (TCP connect or connection) is in progress."""
        return self._attempt is not None and not self._attempt.over

    def start(self) -> None:
        """
        Connect, and keep reconnecting until :meth:`stop`.  A no-op while
        running or stopping; after a completed ``stop()`` it starts afresh.
        """
        if self.state not in (S.IDLE, S.STOPPED):
            return
        with self.handling():
            self._warn_plaintext_once()
            self.attempts = 0
            self._machine.set(S.CONNECTING, "starting")
            self._factory.resume()
        # Outside the input above: the attempt's own input (startedConnecting)
        # delivers its events while the connector is still connecting, so an
        # observer's stop() stops it before it dials.
        if self._connector is None:
            proxy = self.proxy
            host, port = (
                (proxy.host, proxy.port) if proxy is not None
                else (self._factory.host, self._factory.port)
            )
            # The TCP connect timeout is only a backstop: our handshake timer
            # bounds connect + proxy + TLS + upgrade together.
            self._connector = self._tcp.connectTCP(
                host, port, self._factory, timeout=self.settings.handshake_timeout + 1
            )
        else:
            self._connector.connect()

    def stop(self) -> Deferred[None]:
        """
        Close the connection and stop reconnecting.

        An open session gets a close frame (1000) and :attr:`close_timeout`
        to finish the close handshake before the TCP connection is aborted;
        a connection still being set up is aborted; a pending retry is
        cancelled.  The Deferred fires when the connection is gone and no
        timer of the client is left in the reactor.  Safe in every state and
        when called again (every call's Deferred fires then).
        """
        if self.state in (S.IDLE, S.STOPPED):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self.state is S.STOPPING:
            return d
        with self.handling():
            self.log.info("stopping agent_id={agent_id} url={url}", **self.log_fields())
            self._machine.set(S.STOPPING, "agent stopping")
            # RCF cancels the pending retry and stops a TCP connect in progress.
            self._factory.stopTrying()  # type: ignore[no-untyped-call]
            attempt = self._attempt
            if not self._in_state(S.STOPPING):
                return d  # stopTrying ended the attempt, which completed the stop
            if attempt is None or attempt.over:
                self._finish_stop()
            else:
                attempt.stop()
            # Without a connection, a TCP connect was in progress: stopTrying
            # stopped it, and the connector reports the end (Twisted's at once).
        return d

    def when_active(self) -> Deferred[None]:
        """
        A Deferred that fires (with None) when a session is active: at once
        if one is, otherwise when the next one becomes active.  Cancel it to
        stop waiting; a stopped client does not fire it until started again.
        """
        if self.is_active:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            if d in self._active_waiters:
                self._active_waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._active_waiters.append(d)
        return d

    def add_observer(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """
        Call ``observer`` with every :class:`ClientEvent` from now on.

        Returns a function that unsubscribes it.  An observer that raises is
        logged and otherwise ignored.
        """
        return self._observers.add(observer)

    def add_session_listener(self, listener: SessionListener) -> Callable[[], None]:
        """
        Tell ``listener`` of every session's start and end from now on, once
        the input that caused it is handled; returns its unsubscriber.  A
        listener that raises is logged and otherwise ignored.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def snapshot(self) -> dict[str, Any]:
        """The client's state as JSON-able values (for the status endpoint)."""
        last_ack = None
        if self.last_ack is not None:
            last_ack = {
                "type": self.last_ack.type,
                "message_id": self.last_ack.message_id,
                "acked_message_id": self.last_ack.payload.get("acked_message_id"),
            }
        return {
            "state": self.state.value,
            "active": self.is_active,
            "agent_id": self.agent_id,
            "url": self._display_url,
            "proxy": self.proxy.display if self.proxy is not None else None,
            "connected_since": self.connected_since,
            "last_ack": last_ack,
            "last_ack_at": self.last_ack_at,
            "attempts": self.attempts,
            "last_failure": self.last_failure,
            "next_retry_at": self.next_retry_at,
            "current_delay": self.current_delay,
        }

    def log_fields(self) -> dict[str, Any]:
        """The fields every log line of the client carries."""
        return {"agent_id": self.agent_id, "url": self._display_url}

    # -- events --------------------------------------------------------------------

    def _in_state(self, state: ClientState) -> bool:
        # A method, not an inline test: callbacks may have changed the state
        # since the caller last looked (mypy's narrowing cannot see that).
        return self.state is state

    def handling(self) -> _Handling:
        """
        Handle one input (a call from outside, the protocol or a timer):
        events it causes reach observers once it is done, so an observer
        that calls back into the client (``stop()``, say) sees a completed
        transition, never one half made.  (A context manager; one object,
        reused: every inbound message passes here.)
        """
        return self._handling

    def enter_input(self) -> None:
        """An input starts (see :meth:`handling`)."""
        self._depth += 1

    def leave_input(self) -> None:
        """An input ends: at the outermost, what it caused is delivered."""
        self._depth -= 1
        if self._depth == 0:
            self._deliver()

    def _deliver(self) -> None:
        while self._queued:
            tell = self._queued.pop(0)
            self._depth += 1
            try:
                tell()
            except Exception:  # noqa: BLE001 - a listener must not break the client
                self.log.failure("a session listener failed")
            finally:
                self._depth -= 1

    def later(self, tell: Callable[[], None]) -> None:
        """Run ``tell`` once the current input is done (in order with events)."""
        self._queued.append(tell)
        if self._depth == 0:
            self._deliver()

    def emit(self, event: ClientEvent) -> None:
        """Tell the observers of ``event`` once the current input is handled."""
        if self._observers:
            self.later(lambda: self._observers.notify(event))

    def _fire(self, waiters: list[Deferred[None]]) -> None:
        for d in waiters:
            self.later(lambda d=d: None if d.called else d.callback(None))  # type: ignore[misc]

    def _state_changed(self, old: ClientState, new: ClientState, reason: str) -> None:
        if old is S.ACTIVE:
            # Closing or stopping: the session sends no more and its waiters fail now.
            attempt = self._attempt
            if attempt is not None and attempt.session is not None:
                attempt.session.end(reason)
            self.emit(SessionInactive(reason=reason))

    def _warn_plaintext_once(self) -> None:
        if self._warned_plaintext or self._factory.isSecure:
            return
        if _is_loopback_host(self._factory.host):
            return
        self._warned_plaintext = True
        self.log.warn(
            "{url} is not encrypted: the signed upgrade headers (agent id, timestamp, nonce, "
            "signature) and every message travel in clear text; use wss:// "
            "agent_id={agent_id}",
            **self.log_fields(),
        )

    # -- the factory's reports -------------------------------------------------------

    def attempt_started(self, connector: Any) -> None:
        """A connection attempt begins (called by the factory)."""
        self._factory.connector = connector
        with self.handling():
            attempt = Attempt(self, self.attempts + 1, connector)
            self._attempt = attempt
            self.attempts = attempt.number
            self.next_retry_at = None
            self.current_delay = None
            self._machine.set(S.CONNECTING, "connecting")
            via = f" via proxy {self.proxy.display}" if self.proxy is not None else ""
            self.log.info(
                "connecting to {url}{via} attempt={attempt} agent_id={agent_id}",
                via=via,
                attempt=attempt.number,
                **self.log_fields(),
            )
            self.emit(AttemptStarted(attempt=attempt.number, url=self._display_url))
            attempt.begin()
            try:
                if self._proxy_error is not None:
                    raise self._proxy_error
                if self._factory.isSecure and self._factory.contextFactory is None:
                    self._factory.contextFactory = client_tls_options(
                        self._factory.host, self.settings.ca_file
                    )
            except (TLSConfigError, OSError, ValueError) as e:
                attempt.setup_failed("connecting", e)
                attempt.abandon_connect(str(e))
            except Exception as e:  # noqa: BLE001 - any setup error ends the attempt
                attempt.setup_failed("attempt setup", e)
                attempt.abandon_connect(str(e))

    @property
    def attempt(self) -> Attempt | None:
        """The current (or last) attempt: the owner of its connection's reports."""
        return self._attempt

    def attempt_ended(self, connector: Any, reason: Failure) -> None:
        """The attempt's TCP connect failed or its connection ended (called by the factory)."""
        attempt = self._attempt
        if attempt is None or attempt.over:
            self.log.debug("ignoring the end of a connection that was not ours")
            return
        with self.handling():
            self._end_attempt(attempt, reason)

    def retry_scheduled(self, delay: float) -> None:
        """RCF scheduled the next attempt (called by the factory)."""
        with self.handling():
            at = self._clock.seconds() + delay
            self.current_delay = delay
            self.next_retry_at = at
            self._machine.set(S.WAITING, self.last_failure or "waiting")
            self.log.info(
                "reconnecting in {delay:.2f}s agent_id={agent_id} url={url} attempt={attempt}",
                delay=delay,
                attempt=self.attempts + 1,
                **self.log_fields(),
            )
            self.emit(RetryScheduled(delay=delay, at=at))

    # -- what an attempt asks of the client (AttemptHost) ----------------------------

    @property
    def clock(self) -> IReactorTime:
        """The reactor every timer of the client runs on."""
        return self._clock

    @property
    def machine(self) -> StateMachine:
        """The connection's state machine."""
        return self._machine

    @property
    def display_url(self) -> str:
        """The URL without credentials, for log lines and events."""
        return self._display_url

    @property
    def tls_host(self) -> str:
        """The host name TLS verifies."""
        return str(self._factory.host)

    def sign_upgrade(self) -> Mapping[str, str]:
        """Fresh signed headers for one upgrade."""
        return self.signer.sign_headers()

    def proxy_authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value for CONNECT, if the proxy has credentials."""
        return self.proxy.authorization if self.proxy is not None else None

    def ack_received(self, envelope: Envelope) -> None:
        """An ``ack`` or ``agent.hello_ack`` arrived: the last ack seen."""
        self.last_ack = envelope
        self.last_ack_at = self._clock.seconds()

    def connection_opened(self, at: float) -> None:
        """The current attempt's WebSocket opened at reactor time ``at``."""
        self.connected_since = at

    def report_connect_failed(self, connector: Any, reason: Failure) -> None:
        """End an attempt whose connector did not report its end, as RCF's loop hears it."""
        self._factory.clientConnectionFailed(connector, reason)

    def session_activated(self, attempt: Attempt, session: Session) -> None:
        """The attempt's hello was acked: the session is active."""
        self._reporter.session_active()
        if self._reporter.keep_backoff(self._clock.seconds()):
            # Another agent with this identity keeps replacing our sessions:
            # the backoff keeps growing so that the pair settles.
            attempt.backoff_kept = True
        else:
            self._factory.resetDelay()
        self.attempts = 0
        self.last_failure = None
        self.last_end = None
        self._machine.set(S.ACTIVE, "active")
        self.log.info(
            "session active agent_id={agent_id} url={url} hello={hello_id}",
            hello_id=session.hello_id,
            **self.log_fields(),
        )
        self.emit(SessionActive(message_id=session.hello_id))
        for listener in list(self._listeners):
            self.later(lambda listener=listener: listener.session_started(session))  # type: ignore[misc]
        waiters, self._active_waiters = self._active_waiters, []
        self._fire(waiters)

    # -- ending ----------------------------------------------------------------------

    def _end_attempt(self, attempt: Attempt, reason: Failure) -> None:
        stopping = self._in_state(S.STOPPING)
        end, clean, tls = attempt.finish(reason, stopping=stopping)
        self.connected_since = None
        failure = end.text
        session = attempt.session
        if session is not None:
            for listener in list(self._listeners):
                self.later(
                    lambda listener=listener: listener.session_ended(session, failure)  # type: ignore[misc]
                )
        # The attempt's own number: a session's end comes after the count was reset.
        self._reporter.ended(attempt, end, tls, stopping=stopping, attempts=attempt.number)
        if attempt.refused_status is not None:
            self.emit(Refused(status=attempt.refused_status, reason=failure))
        if not stopping:
            self.last_failure = failure
            self.last_end = end
            if self._reporter.run_of_ends(
                attempt, end, attempts=self.attempts, now=self._clock.seconds(),
                host=self._factory.host, port=self._factory.port,
                secure=bool(self._factory.isSecure),
            ):
                self._factory.resetDelay()
            self._machine.set(S.CLOSING, failure)
        self.emit(AttemptEnded(end=end, clean=clean))
        if stopping:
            self._finish_stop()

    def _finish_stop(self) -> None:
        self.next_retry_at = None
        self.current_delay = None
        self.connected_since = None
        self._machine.set(S.STOPPED, "stopped")
        self.log.info("stopped agent_id={agent_id} url={url}", **self.log_fields())
        self.emit(Stopped())
        waiters, self._stop_waiters = self._stop_waiters, []
        self._fire(waiters)


class _Handling:
    """The context manager of :meth:`HostlinkClient.handling`."""

    __slots__ = ("_client",)

    def __init__(self, client: HostlinkClient) -> None:
        self._client = client

    def __enter__(self) -> None:
        self._client.enter_input()

    def __exit__(self, *exc: object) -> None:
        self._client.leave_input()
