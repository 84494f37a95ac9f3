"""
:class:`HostlinkClient`: the agent's connection to the control plane, kept
up until :meth:`~HostlinkClient.stop`.

The client owns everything about a connection: the state machine
(:mod:`~hostlink_tw.agent.machine`) and the timers each state owns, the
attempt record (why it ended, the HTTP status of a refusal), the keepalive,
and the :class:`~hostlink_tw.agent.session.Session` once the hello is acked.
The Autobahn protocol reports its inputs here; the factory is Twisted's
reconnect loop, connected once by :meth:`~HostlinkClient.start`.

Timing rules (keepalive, hello, handshake and close timeouts, retry delays)
run on ``callLater`` of the injected reactor.  Autobahn's own timers run on
txaio's batched loop, which rounds deadlines to buckets, and are all off.

How a message travels: TCP bytes → Autobahn's framing (bounded by
``MAX_MESSAGE_BYTES``) → ``HostlinkClientProtocol.onMessage`` →
:meth:`HostlinkClient.message` (validated by
:func:`~hostlink_tw.protocol.parse_envelope` against the agent's id) → the
hello_ack check before the session, or the session's dispatch table after
it; answers go back through :meth:`Session.send`, which writes one JSON
text frame.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.connection import HostlinkClientProtocol
from hostlink_tw.agent.events import (
    AttemptEnded,
    AttemptStarted,
    ClientEvent,
    Connected,
    EndReason,
    MessageIn,
    MessageOut,
    Observers,
    PingSent,
    PongReceived,
    Refused,
    RetryScheduled,
    SessionActive,
    SessionInactive,
    Stopped,
)
from hostlink_tw.agent.factory import HostlinkClientFactory
from hostlink_tw.agent.keepalive import Keepalive
from hostlink_tw.agent.machine import ClientState, StateMachine, cancel_call
from hostlink_tw.agent.session import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_UNSUPPORTED_DATA,
    FRAME_PREVIEW_CHARS,
    Session,
    SessionListener,
    ViolationError,
    violation_for,
)
from hostlink_tw.agent.settings import ClientSettings
from hostlink_tw.backoff import Backoff, BackoffPolicy
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    Envelope,
    ProtocolError,
    make_envelope,
    parse_envelope,
)
from hostlink_tw.proxy import Proxy, UnsupportedProxyError, proxy_for
from hostlink_tw.signing import RequestSigner
from hostlink_tw.tls import TLSConfigError, client_tls_options, describe_tls_failure, is_tls_failure

__all__ = ["CLOSE_TIMEOUT", "HostlinkClient", "redact_url"]

#: How long a close handshake may take (ours, the peer's, or stop()'s)
#: before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0

_HINTS = {
    401: (
        "the control plane did not accept the signed upgrade: check that this host's "
        "clock is right (timestamps more than 300 s off are refused) and that the agent's "
        "public key is registered for this agent id"
    ),
    403: "the control plane refuses this agent: is it registered and allowed?",
}
_HINT_5XX = "the control plane has a problem; retrying with backoff"

S = ClientState


def redact_url(url: str) -> str:
    """``url`` without user info (``user:password@``), for log lines and status."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def preview(payload: bytes) -> str:
    """The first :data:`FRAME_PREVIEW_CHARS` characters of a frame, quoted."""
    text = payload[: FRAME_PREVIEW_CHARS * 4].decode("utf-8", "replace")
    return repr(text[:FRAME_PREVIEW_CHARS])


def _describe_reason(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ConnectionDone):
        return "connection closed"
    if isinstance(value, ConnectError):
        # e.g. "Connection was refused by other side: 111: Connection refused."
        return str(value).strip() or type(value).__name__
    return f"{type(value).__name__}: {value}".strip()


class _Attempt:
    """What one connection attempt has seen (the client's record of it)."""

    def __init__(self, number: int, connector: Any) -> None:
        self.number = number
        self.connector = connector
        self.proto: HostlinkClientProtocol | None = None
        #: The first reason this attempt ends; later ones are consequences.
        self.end: EndReason | None = None
        self.refused_status: int | None = None
        self.opened = False
        self.activated = False
        self.rejecting = False
        self.closing_timer = False
        self.hello_id: str | None = None
        self.keepalive: Keepalive | None = None
        self.session: Session | None = None
        self.over = False

    def note(self, kind: str, text: str, **more: Any) -> None:
        if self.end is None:
            self.end = EndReason(kind, text, **more)


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
        self._attempt: _Attempt | None = None
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
        self._queued: list[Callable[[], None]] = []
        self._depth = 0
        self._active_waiters: list[Deferred[None]] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._warned_plaintext = False

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
        with self._input():
            self._warn_plaintext_once()
            self.attempts = 0
            self._machine.set(S.CONNECTING, "starting")
            self._factory.continueTrying = 1
            self._factory.backoff.reset()
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
        with self._input():
            self.log.info("stopping agent_id={agent_id} url={url}", **self.log_fields())
            self._machine.set(S.STOPPING, "agent stopping")
            # RCF cancels the pending retry and stops a TCP connect in progress.
            self._factory.stopTrying()  # type: ignore[no-untyped-call]
            attempt = self._attempt
            if not self._in_state(S.STOPPING):
                return d  # stopTrying ended the attempt, which completed the stop
            if attempt is None or attempt.over:
                self._finish_stop()
            elif attempt.proto is not None:
                attempt.proto.close(CLOSE_NORMAL, "agent stopping")
                self._own_close_timer(attempt)
            # Else a TCP connect was in progress: stopTrying stopped it, and
            # the connector reports the end (Twisted's at once).
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

    def add_session_listener(self, listener: SessionListener) -> None:
        """Tell ``listener`` of every session's start and end from now on."""
        self._listeners.append(listener)

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

    @contextmanager
    def _input(self) -> Iterator[None]:
        """
        Handle one input (a call from outside, the protocol or a timer):
        events it causes reach observers once it is done, so an observer
        that calls back into the client (``stop()``, say) sees a completed
        transition, never one half made.
        """
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._deliver()

    def _deliver(self) -> None:
        while self._queued:
            tell = self._queued.pop(0)
            self._depth += 1
            try:
                tell()
            finally:
                self._depth -= 1

    def _later(self, tell: Callable[[], None]) -> None:
        """Run ``tell`` once the current input is done (in order with events)."""
        self._queued.append(tell)
        if self._depth == 0:
            self._deliver()

    def _emit(self, event: ClientEvent) -> None:
        self._later(lambda: self._observers.notify(event))

    def _fire(self, waiters: list[Deferred[None]]) -> None:
        for d in waiters:
            self._later(lambda d=d: d.callback(None))  # type: ignore[misc]

    def _state_changed(self, old: ClientState, new: ClientState, reason: str) -> None:
        if old is S.ACTIVE:
            self._emit(SessionInactive(reason=reason))

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
        with self._input():
            attempt = _Attempt(self.attempts + 1, connector)
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
            self._emit(AttemptStarted(attempt=attempt.number, url=self._display_url))
            call = self._clock.callLater(
                self.settings.handshake_timeout, self._handshake_timed_out, attempt
            )
            self._machine.own(cancel_call(call), {S.CONNECTING})
            try:
                if self._proxy_error is not None:
                    raise self._proxy_error
                if self._factory.isSecure and self._factory.contextFactory is None:
                    self._factory.contextFactory = client_tls_options(
                        self._factory.host, self.settings.ca_file
                    )
            except (TLSConfigError, OSError, ValueError) as e:
                self.log.error(
                    "cannot connect: {error} agent_id={agent_id} url={url}",
                    error=str(e),
                    **self.log_fields(),
                )
                attempt.note("setup_error", f"cannot connect: {e}")
                self._abandon_connect(attempt, str(e))
            except Exception as e:  # noqa: BLE001 - any setup error ends the attempt
                self._setup_failed(attempt, "attempt setup", e)
                self._abandon_connect(attempt, str(e))

    def attempt_ended(self, connector: Any, reason: Failure) -> None:
        """The attempt's TCP connect failed or its connection ended (called by the factory)."""
        attempt = self._attempt
        if attempt is None or attempt.over:
            self.log.debug("ignoring the end of a connection that was not ours")
            return
        with self._input():
            self._end_attempt(attempt, reason)

    def retry_scheduled(self, delay: float) -> None:
        """RCF scheduled the next attempt (called by the factory)."""
        with self._input():
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
            self._emit(RetryScheduled(delay=delay, at=at))

    # -- the connection's reports --------------------------------------------------

    def _current(self, proto: HostlinkClientProtocol) -> _Attempt | None:
        attempt = self._attempt
        if attempt is None or attempt.over or attempt.proto is not proto:
            return None
        return attempt

    def sign_upgrade(self) -> Mapping[str, str]:
        """Fresh signed headers for this connection's upgrade."""
        return self.signer.sign_headers()

    def proxy_authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value for CONNECT, if the proxy has credentials."""
        return self.proxy.authorization if self.proxy is not None else None

    def connection_made(self, proto: HostlinkClientProtocol) -> None:
        """TCP is up for the current attempt."""
        attempt = self._attempt
        if attempt is not None and not attempt.over:
            attempt.proto = proto

    def hook_failed(self, proto: HostlinkClientProtocol, step: str, error: BaseException) -> None:
        """Our own code raised in ``step``: end the attempt with one line."""
        attempt = self._attempt
        if attempt is None or attempt.over:
            return
        with self._input():
            self._setup_failed(attempt, step, error)

    def _setup_failed(self, attempt: _Attempt, step: str, error: BaseException) -> None:
        if step == "signing the upgrade request":
            text = f"cannot sign the upgrade request: {error}"
            self.log.error(
                "cannot sign the upgrade request: {error} agent_id={agent_id} url={url}",
                error=str(error),
                **self.log_fields(),
            )
        else:
            text = f"{step} failed: {type(error).__name__}: {error}"
            self.log.error(
                "ending this attempt: {reason} agent_id={agent_id} url={url}",
                reason=text,
                **self.log_fields(),
            )
        attempt.note("setup_error", text)

    def bad_head(self, proto: HostlinkClientProtocol, reason: str, data: bytes) -> None:
        """An HTTP response head we refuse to parse (too large, or unparsable)."""
        attempt = self._current(proto)
        if attempt is None:
            return
        self.log.warn(
            "{reason} response={preview} agent_id={agent_id} url={url}",
            reason=reason,
            preview=preview(data),
            **self.log_fields(),
        )
        attempt.note("protocol", reason)

    def proxy_refused(self, proto: HostlinkClientProtocol, reason: str) -> None:
        """The proxy refused the tunnel."""
        attempt = self._current(proto)
        if attempt is not None:
            attempt.note("refused", f"proxy refused the CONNECT tunnel: {reason}")

    def upgrade_failed(
        self, proto: HostlinkClientProtocol, status: int | None, phrase: str, body: bytes,
        reason: str,
    ) -> None:
        """The upgrade failed: a refusal with its HTTP status, or a broken answer."""
        attempt = self._current(proto)
        if attempt is None:
            return
        if status is not None and status != 101:
            attempt.refused_status = status
            detail = f"HTTP {status} {phrase}".strip()
            if body.strip():
                detail += f" {preview(body.strip())}"
            # A 4xx/5xx is a refusal; anything else (200, a redirect) is a
            # server that is not a Hostlink gateway at this URL.
            verb = "refused" if status >= 400 else "not accepted (expected 101)"
            attempt.note("refused", f"upgrade {verb}: {detail}", http_status=status)
        else:
            attempt.note("protocol", f"upgrade failed: {reason}")

    def opened(self, proto: HostlinkClientProtocol) -> None:
        """The upgrade succeeded: start the keepalive and the hello deadline, say hello."""
        attempt = self._current(proto)
        if attempt is None:
            return
        with self._input():
            attempt.opened = True
            self.connected_since = self._clock.seconds()
            self._machine.set(S.AWAITING_ACK, "connected")
            settings = self.settings
            keepalive = Keepalive(
                self._clock,
                settings.ping_interval,
                settings.pong_timeout,
                send_ping=proto.send_ping,
                on_ping=lambda n: self._emit(PingSent(sequence=n)),
                on_pong=lambda n: self._emit(PongReceived(sequence=n)),
                on_dead=lambda: self._pong_timed_out(attempt),
                log=self.log,
            )
            attempt.keepalive = keepalive
            self._machine.own(keepalive.stop, {S.AWAITING_ACK, S.ACTIVE})
            call = self._clock.callLater(settings.hello_timeout, self._hello_timed_out, attempt)
            self._machine.own(cancel_call(call), {S.AWAITING_ACK})
            self.log.info(
                "connected to {url}, sending agent.hello attempt={attempt} agent_id={agent_id}",
                attempt=attempt.number,
                **self.log_fields(),
            )
            self._emit(Connected(attempt=attempt.number, url=self._display_url))
        # The hello goes out once observers have seen the connection (one
        # of them may have stopped the client).
        if self._current(proto) is attempt and self.state is S.AWAITING_ACK:
            with self._input():
                hello = make_envelope(AGENT_HELLO, self.agent_id, {}, now=self._clock.seconds())
                attempt.hello_id = hello.message_id
                self._send(attempt, hello)

    def _send(self, attempt: _Attempt, envelope: Envelope) -> None:
        assert attempt.proto is not None
        attempt.proto.send_text(envelope.to_json())
        self._emit(MessageOut(type=envelope.type, message_id=envelope.message_id))

    def message(self, proto: HostlinkClientProtocol, payload: bytes, is_binary: bool) -> None:
        """
        Validate and dispatch one inbound message.  Nothing a frame contains
        may raise out of here: any problem ends the connection (and the
        client reconnects), with one log line saying why.
        """
        attempt = self._current(proto)
        if attempt is None or attempt.rejecting:
            return  # we are closing; the rest is noise
        with self._input():
            try:
                self._handle(attempt, payload, is_binary)
            except ViolationError as v:
                self._reject(attempt, v, payload)
            except Exception as e:  # noqa: BLE001 - a frame must never crash the agent
                self._reject(
                    attempt,
                    ViolationError("cannot handle frame", f"{type(e).__name__}: {e}",
                              CLOSE_INVALID_PAYLOAD, None),
                    payload,
                )

    def _handle(self, attempt: _Attempt, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            raise ViolationError(
                "binary frame", "the protocol uses text frames only", CLOSE_UNSUPPORTED_DATA, None
            )
        try:
            envelope = parse_envelope(payload, self.agent_id)
        except ProtocolError as e:
            raise ViolationError("invalid envelope", str(e), CLOSE_INVALID_PAYLOAD, None) from e
        self._emit(MessageIn(type=envelope.type, message_id=envelope.message_id))
        if attempt.session is not None:
            attempt.session.handle(envelope)
        elif envelope.type in (AGENT_HELLO_ACK, ACK):
            self._ack_received(envelope)
            if envelope.type == AGENT_HELLO_ACK:
                self._hello_acked(attempt, envelope)
        else:
            raise violation_for(envelope)

    def _ack_received(self, envelope: Envelope) -> None:
        self.last_ack = envelope
        self.last_ack_at = self._clock.seconds()

    def _hello_acked(self, attempt: _Attempt, envelope: Envelope) -> None:
        # parse_envelope has validated the ack payload.
        acked_message_id: str = envelope.payload["acked_message_id"]
        if self.state is not S.AWAITING_ACK:
            return
        if attempt.hello_id is None or acked_message_id != attempt.hello_id:
            self.log.warn(
                "ignoring agent.hello_ack for {acked_message_id}: our hello is {hello_id} "
                "agent_id={agent_id} url={url}",
                acked_message_id=acked_message_id[:FRAME_PREVIEW_CHARS],
                hello_id=attempt.hello_id,
                **self.log_fields(),
            )
            return
        attempt.activated = True
        session = Session(
            attempt.hello_id, lambda e: self._send(attempt, e), self._ack_received
        )
        attempt.session = session
        self._factory.resetDelay()
        self.attempts = 0
        self.last_failure = None
        self.last_end = None
        self._machine.set(S.ACTIVE, "active")
        self.log.info(
            "session active agent_id={agent_id} url={url} hello={hello_id}",
            hello_id=attempt.hello_id,
            **self.log_fields(),
        )
        self._emit(SessionActive(message_id=attempt.hello_id))
        for listener in list(self._listeners):
            self._later(lambda listener=listener: listener.session_started(session))  # type: ignore[misc]
        waiters, self._active_waiters = self._active_waiters, []
        self._fire(waiters)

    def _reject(self, attempt: _Attempt, violation: ViolationError, payload: bytes) -> None:
        """One log line about an offending frame, then close and reconnect."""
        attempt.rejecting = True
        attempt.note("protocol", f"{violation.problem}: {violation.detail}")
        self.log.warn(
            "closing connection: {problem} (type={msg_type}, reason={reason}, size={size}) "
            "frame={frame} agent_id={agent_id} url={url}",
            problem=violation.problem,
            msg_type=violation.msg_type,
            reason=violation.detail,
            size=len(payload),
            frame=preview(payload),
            close_code=violation.close_code,
            **self.log_fields(),
        )
        self._closing(attempt, f"{violation.problem}: {violation.detail}")
        if attempt.proto is not None:
            attempt.proto.close(violation.close_code, violation.problem)

    def pong(self, proto: HostlinkClientProtocol, payload: bytes) -> None:
        """A pong: the keepalive decides whether it answers one of our pings."""
        attempt = self._current(proto)
        if attempt is not None and attempt.keepalive is not None:
            with self._input():
                attempt.keepalive.pong(payload)

    def closing(
        self, proto: HostlinkClientProtocol, code: int | None, reason: str, *, by_agent: bool,
        by_library: bool,
    ) -> None:
        """
        A close frame went out (ours, an answer to the peer's, or Autobahn
        failing the connection): bound the close handshake.
        """
        attempt = self._current(proto)
        if attempt is None:
            return
        with self._input():
            if by_library and by_agent and not attempt.rejecting and attempt.end is None:
                # Autobahn failing the connection itself: a message over
                # MAX_MESSAGE_BYTES (1009), invalid UTF-8 (1007), a protocol
                # violation (1002).  Its own warning is muted; this is the line.
                self.log.warn(
                    "closing connection: {reason} close_code={close_code} "
                    "agent_id={agent_id} url={url}",
                    reason=reason,
                    close_code=code,
                    **self.log_fields(),
                )
            if code is not None and by_agent:
                attempt.note("closed_by_agent", f"closed by agent: code={code} reason={reason}",
                             close_code=code)
            self._closing(attempt, attempt.end.text if attempt.end else "closing")
            self._own_close_timer(attempt)

    def peer_closing(self, proto: HostlinkClientProtocol, code: int | None, reason: str) -> None:
        """The peer started the close handshake."""
        attempt = self._current(proto)
        if attempt is not None:
            attempt.note(
                "closed_by_peer",
                f"closed by control plane: code={code} reason={reason}".strip(),
                close_code=code,
            )

    def connection_lost(self, proto: HostlinkClientProtocol, reason: Failure) -> None:
        """The connection is gone; the factory reports the attempt's end next."""
        attempt = self._current(proto)
        if attempt is not None:
            attempt.lost_reason = reason  # type: ignore[attr-defined]

    # -- timers --------------------------------------------------------------------

    def _own_close_timer(self, attempt: _Attempt) -> None:
        if attempt.closing_timer:
            return
        attempt.closing_timer = True
        call = self._clock.callLater(self.close_timeout, self._close_timed_out, attempt)
        self._machine.own(cancel_call(call), {S.CLOSING, S.STOPPING})

    def _handshake_timed_out(self, attempt: _Attempt) -> None:
        if attempt.over:
            return
        with self._input():
            proto = attempt.proto
            if proto is None:
                phase = "name lookup or TCP connect"
            elif getattr(proto, "state", None) == proto.STATE_PROXY_CONNECTING:
                phase = "proxy CONNECT"
            else:
                phase = "TLS handshake or upgrade response"
            # Naming the phase tells an operator a hung resolver from a stalled
            # control plane.
            reason = (
                f"connect and upgrade not done within "
                f"{self.settings.handshake_timeout:g}s (stuck in {phase})"
            )
            self.log.warn(
                "giving up this attempt: {reason} agent_id={agent_id} url={url}",
                reason=reason,
                **self.log_fields(),
            )
            attempt.note("timeout", reason)
            if proto is not None:
                proto.abort(reason)
            else:
                self._abandon_connect(attempt, reason)

    def _hello_timed_out(self, attempt: _Attempt) -> None:
        if attempt.over or attempt.proto is None:
            return
        with self._input():
            reason = f"no agent.hello_ack within {self.settings.hello_timeout:g}s"
            attempt.note("timeout", reason)
            self.log.warn(
                "closing connection: {reason} agent_id={agent_id} url={url}",
                reason=reason,
                **self.log_fields(),
            )
            self._closing(attempt, reason)
            attempt.proto.close(CLOSE_NORMAL, "hello timeout")

    def _pong_timed_out(self, attempt: _Attempt) -> None:
        if attempt.over or attempt.proto is None:
            return
        with self._input():
            reason = f"no pong within {self.settings.pong_timeout:g}s"
            self.log.warn(
                "aborting connection: {reason} (dead peer) agent_id={agent_id} url={url}",
                reason=reason,
                **self.log_fields(),
            )
            attempt.note("timeout", reason)
            self._closing(attempt, reason)
            # A dead peer will not answer a close frame: abort the TCP connection.
            attempt.proto.abort(reason)

    def _close_timed_out(self, attempt: _Attempt) -> None:
        if attempt.over or attempt.proto is None:
            return
        reason = f"close handshake not finished within {self.close_timeout:g}s"
        attempt.note("timeout", reason)
        attempt.proto.abort(reason)

    # -- ending ----------------------------------------------------------------------

    def _closing(self, attempt: _Attempt, reason: str) -> None:
        if self.state in (S.CONNECTING, S.AWAITING_ACK, S.ACTIVE):
            self._machine.set(S.CLOSING, reason)

    def _abandon_connect(self, attempt: _Attempt, reason: str) -> None:
        """End an attempt that has no connection yet: stop the connector, or end it here."""
        try:
            attempt.connector.stopConnecting()
        except Exception:  # noqa: BLE001 - e.g. NotConnectingError: already over
            self.log.debug("stopConnecting failed")
        if not attempt.over:
            # The connector did not report the end (it was not connecting):
            # report it as RCF's loop would hear it.
            self._factory.clientConnectionFailed(
                attempt.connector, Failure(ConnectError(string=reason))  # type: ignore[no-untyped-call]
            )

    def _end_attempt(self, attempt: _Attempt, reason: Failure) -> None:
        attempt.over = True
        proto = attempt.proto
        lost: Failure | None = getattr(attempt, "lost_reason", None)
        if lost is not None:
            reason = lost
        self.connected_since = None
        code: int | None = None
        clean = False
        if proto is not None and attempt.opened:
            clean = bool(getattr(proto, "wasClean", False))
            if getattr(proto, "remoteCloseCode", None) is not None:
                code = proto.remoteCloseCode
            elif getattr(proto, "localCloseCode", None) is not None:
                code = proto.localCloseCode
        tls = is_tls_failure(reason)
        end = attempt.end
        if end is None:
            if tls:
                end = EndReason(
                    "tls", f"TLS failed: {describe_tls_failure(reason, self._factory.host)}"
                )
            elif (proto is not None and getattr(proto, "remoteCloseCode", None) is not None
                  and not proto.closedByMe):
                end = EndReason(
                    "closed_by_peer",
                    f"closed by control plane: code={proto.remoteCloseCode} "
                    f"reason={proto.remoteCloseReason or ''}".strip(),
                )
            elif attempt.opened:
                end = EndReason("lost", f"connection lost: {_describe_reason(reason)}")
            else:
                end = EndReason("connect_failed", f"connection failed: {_describe_reason(reason)}")
        stopping = self.state is S.STOPPING
        end = EndReason(end.kind, end.text, code, attempt.refused_status, not stopping)
        failure = end.text
        if attempt.session is not None:
            attempt.session.end(failure)
            for listener in list(self._listeners):
                listener.session_ended(attempt.session, failure)
        if attempt.refused_status is not None:
            status = attempt.refused_status
            hint = _HINTS.get(status) or (_HINT_5XX if 500 <= status <= 599 else "")
            # The reason names the status ("upgrade refused: HTTP 401 ...",
            # or "upgrade not accepted (expected 101): HTTP 200 OK").
            self.log.warn(
                "{reason}; {hint} agent_id={agent_id} url={url} attempt={attempt}",
                status=status,
                reason=failure,
                hint=hint or "retrying with backoff",
                attempt=self.attempts,
                **self.log_fields(),
            )
            self._emit(Refused(status=status, reason=failure))
        elif tls and not stopping:
            self.log.error(
                "{reason} (connecting to {url}) agent_id={agent_id} attempt={attempt}",
                reason=failure,
                attempt=self.attempts,
                **self.log_fields(),
            )
        else:
            # Losing an active session is news; another failed attempt during
            # an outage is not (the retry line follows anyway).
            emit = self.log.warn if attempt.activated and not stopping else self.log.info
            emit(
                "connection ended: {reason} close_code={close_code} "
                "agent_id={agent_id} url={url} attempt={attempt}",
                reason=failure,
                close_code=code,
                attempt=self.attempts,
                **self.log_fields(),
            )
        if not stopping:
            self.last_failure = failure
            self.last_end = end
            self._machine.set(S.CLOSING, failure)
        self._emit(AttemptEnded(end=end, clean=clean))
        if stopping:
            self._finish_stop()

    def _finish_stop(self) -> None:
        self.next_retry_at = None
        self.current_delay = None
        self.connected_since = None
        self._machine.set(S.STOPPED, "stopped")
        self.log.info("stopped agent_id={agent_id} url={url}", **self.log_fields())
        self._emit(Stopped())
        waiters, self._stop_waiters = self._stop_waiters, []
        self._fire(waiters)

