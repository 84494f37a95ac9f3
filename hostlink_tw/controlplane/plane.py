"""
:class:`ControlPlane`: the reference control plane assembled, and
:func:`start_control_plane`, its in-process entry point.

It owns the pieces and their lifetime: the authorized agents
(:mod:`~hostlink_tw.controlplane.agents`), the replay memory
(:mod:`~hostlink_tw.controlplane.replay`), the gateway and its listener
(:mod:`~hostlink_tw.controlplane.gateway`), the sessions
(:mod:`~hostlink_tw.controlplane.sessions`), the tasks
(:mod:`~hostlink_tw.controlplane.tasks`, in their own SQLite file), the operator listener
(:mod:`~hostlink_tw.controlplane.web`) and the test layer installed on the
gateway (:mod:`~hostlink_tw.controlplane.testlayer`), whose knobs it exposes
under their documented names.  :meth:`ControlPlane.stop` undoes all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.controlplane.agents import AgentsFileError, AuthorizedAgents
from hostlink_tw.controlplane.gateway import GatewayFactory
from hostlink_tw.controlplane.operatorapi import OperatorAPI, max_request_bytes
from hostlink_tw.controlplane.replay import NonceCache, NonceStore, database_beside
from hostlink_tw.controlplane.sessions import Session, SessionRegistry
from hostlink_tw.controlplane.settings import (
    DEFAULT_DELIVERY_WINDOW,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_COMMAND_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_MAX_PENDING_TASKS,
    DEFAULT_MAX_SEND_BUFFER_BYTES,
    DEFAULT_MAX_SKEW,
    DEFAULT_NONCE_CACHE_SIZE,
    DEFAULT_NONCE_QUOTA,
    DEFAULT_OPERATOR_LISTEN,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
    ControlPlaneSettings,
)
from hostlink_tw.controlplane.taskdb import TaskStoreError, tasks_database_beside
from hostlink_tw.controlplane.taskmodel import TaskRecord
from hostlink_tw.controlplane.tasks import TaskService
from hostlink_tw.controlplane.taskstore import TaskStore
from hostlink_tw.controlplane.testlayer import TestControls
from hostlink_tw.controlplane.upgrade import ConnectionAttempt, UpgradeAuthenticator
from hostlink_tw.controlplane.web import is_loopback, operator_factory
from hostlink_tw.wire.envelope import Envelope
from hostlink_tw.wire.vocabulary import CLOSE_NORMAL, GATEWAY_PATH

__all__ = ["ControlPlane", "start_control_plane"]

log = Logger()


def _base_url(address: Any, scheme: str) -> str:
    """``scheme://host:port`` of a listening port's address, wildcards as loopback."""
    host = str(getattr(address, "host", "127.0.0.1"))
    if host in ("0.0.0.0", ""):  # noqa: S104 - describing, not binding
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{address.port}"


class ControlPlane:
    """
    The reference control plane: gateway, session table and test controls.

    Create it, then :meth:`listen`; or use :func:`start_control_plane`.  The
    attributes ``answer_pings``, ``withhold_hello_ack`` and
    ``record_messages`` may be changed at any time.
    """

    def __init__(
        self,
        agents: Mapping[str, RSAPublicKey | str] | None = None,
        *,
        agents_file: str | None = None,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
        max_skew: float = DEFAULT_MAX_SKEW,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS,
        nonce_cache_size: int = DEFAULT_NONCE_CACHE_SIZE,
        nonce_quota: int = DEFAULT_NONCE_QUOTA,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        database: str | bool = True,
        max_send_buffer_bytes: int = DEFAULT_MAX_SEND_BUFFER_BYTES,
        record_messages: int = 0,
        tasks_database: str | bool = True,
        delivery_enabled: bool = True,
        max_pending_tasks: int = DEFAULT_MAX_PENDING_TASKS,
        max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        delivery_window: int = DEFAULT_DELIVERY_WINDOW,
    ) -> None:
        """
        :param agents: Agent id → public key (:class:`RSAPublicKey`, or base64
            of PKIX DER, or PEM).  Merged under the file's entries when both
            are given.
        :param agents_file: JSON file of the same mapping; re-read when its
            size or modification time changes (polled every
            ``reload_interval`` seconds; 0 disables polling) and on
            :meth:`reload_agents`.
        :param reactor: Defaults to the global reactor.
        :param clock: Wall-clock Unix time, for timestamps and the nonce window.
        :param max_skew: Seconds a signed timestamp may differ from ``clock()``.
        :param max_message_bytes: Larger inbound messages close with 1009.
        :param handshake_timeout: Seconds from TCP connect until the
            connection must be an accepted WebSocket, whatever it sends
            meanwhile (0 disables: tests only).
        :param ping_interval: Our keepalive ping period (0: no pings).
        :param ping_timeout: Seconds to wait for the pong before dropping.
        :param max_connections: Concurrent WebSocket sessions; above it,
            upgrades get 503.
        :param max_pending_connections: Concurrent connections that are not
            (yet) an accepted WebSocket; a new one closes the oldest.
        :param nonce_cache_size: Hard cap of the replay memory; when full,
            new upgrades get 503.
        :param nonce_quota: Accepted upgrades one agent may have inside the
            replay window; above it that agent (and only it) gets 429.
        :param database: The control plane's SQLite file, where the replay
            window survives a restart (:class:`NonceStore`): a path; ``True``
            (the default) for ``controlplane.db`` beside ``agents_file``, or
            memory only when there is no agents file; ``False`` for memory
            only.
        :param max_send_buffer_bytes: Bytes that may wait to be sent on one
            connection (its peer not reading) before it is aborted.
        :param record_messages: Bytes of inbound envelopes each session
            keeps in :attr:`Session.received` (for tests; 0, the default,
            keeps none).  May be changed at any time.
        :param tasks_database: The tasks' SQLite file, where tasks and their
            output survive a restart: a path; ``True`` (the default) for
            ``tasks.db`` beside ``agents_file``, or memory only when there is
            no agents file; ``False`` for memory only.
        :param delivery_enabled: Deliver tasks over sessions (the hello_ack's
            ``delivery_enabled``); False keeps every task pending.
        :param max_pending_tasks: Unfinished tasks one agent may have; more
            are refused.
        :param max_command_bytes: The longest command (UTF-8 bytes).
        :param max_output_bytes: Output stored per attempt and stream; the
            rest is dropped and the task flagged truncated.
        :param delivery_window: Attempts delivered to one agent and not
            started yet, at most.
        :raises AgentsFileError: The agents or the file are unusable.
        :raises ReplayStoreError: The database cannot be used.
        :raises TaskStoreError: The tasks' database cannot be used.
        :raises ValueError: An option is out of range.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        #: The limits and timings in force.
        self.settings = ControlPlaneSettings(
            max_skew=max_skew,
            max_message_bytes=max_message_bytes,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_connections=max_connections,
            max_pending_connections=max_pending_connections,
            nonce_cache_size=nonce_cache_size,
            nonce_quota=nonce_quota,
            reload_interval=reload_interval,
            max_send_buffer_bytes=max_send_buffer_bytes,
            delivery_enabled=delivery_enabled,
            max_pending_tasks=max_pending_tasks,
            max_command_bytes=max_command_bytes,
            max_output_bytes=max_output_bytes,
            delivery_window=delivery_window,
        )
        self.reactor = reactor
        self.clock = clock
        self.agents_file = agents_file
        self._agents = AuthorizedAgents(agents, agents_file, reactor, self.settings.reload_interval)
        nonces = NonceCache(
            self.settings.max_skew, self.settings.nonce_cache_size, self.settings.nonce_quota
        )
        #: The SQLite file of the replay window, or None (memory only).
        self.database: str | None = None
        if isinstance(database, str):
            self.database = database
        elif database and agents_file is not None:
            self.database = database_beside(agents_file)
        #: The tasks' SQLite file (``":memory:"`` without one).
        self.tasks_database = ":memory:"
        if isinstance(tasks_database, str):
            self.tasks_database = tasks_database
        elif tasks_database and agents_file is not None:
            self.tasks_database = tasks_database_beside(agents_file)
        task_store = TaskStore(self.tasks_database)
        store: NonceStore | None = None
        if self.database is not None:
            try:
                store = NonceStore(self.database, reactor)
                for agent_id, nonce, expires in store.load(clock()):
                    nonces.remember(agent_id, nonce, expires)
            except BaseException:
                task_store.close()
                if store is not None:
                    store.close()
                raise
        self._authenticator = UpgradeAuthenticator(
            self._agents, nonces, store, clock, self.settings.max_skew
        )
        self._sessions = SessionRegistry(reactor)
        #: The test layer on the gateway (its knobs are also exposed here).
        self.controls = TestControls(reactor, record_messages=record_messages)
        self._gateway = GatewayFactory(
            self.settings,
            self._authenticator,
            self._sessions,
            self.controls,
            clock=clock,
            reactor=reactor,
        )
        #: The tasks (:class:`~hostlink_tw.controlplane.tasks.TaskService`).
        self.tasks = TaskService(
            task_store,
            self._sessions,
            self.settings,
            clock=clock,
            reactor=reactor,
            agents=self._agents.snapshot,
            gate=self.controls,
        )
        self._gateway.handlers.attach_tasks(self.tasks)
        self.controls.attach_tasks(self.tasks)
        #: Every TCP connection of the gateway listener.
        self.connections = self._gateway.connections
        self._operator = operator_factory(self.status, reactor)
        # Twisted's IListeningPort; Any because mypy cannot see zope interfaces.
        self._port: Any = None
        self._operator_port: Any = None
        self._secure = False
        self._stop_result: Deferred[None] | None = None

    # -- lifetime ---------------------------------------------------------------

    def listen(self, description: str = DEFAULT_LISTEN) -> Deferred[ControlPlane]:
        """
        Start listening on a Twisted server endpoint description (``tcp:…``,
        ``ssl:…``); fire with this control plane once the port is bound.
        """
        if self._port is not None:
            raise RuntimeError("this control plane is already listening")
        self._secure = description.split(":", 1)[0].strip().lower() in ("ssl", "tls")
        endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        d: Deferred[Any] = endpoint.listen(self.connections)

        def listening(port: Any) -> ControlPlane:
            self._port = port
            self._agents.start_polling()
            log.info(
                "control plane listening on {url} ({count} agents authorized)",
                url=self.ws_url,
                count=len(self._agents),
            )
            return self

        return d.addCallback(listening)

    @property
    def port(self) -> int:
        """The TCP port we listen on."""
        if self._port is None:
            raise RuntimeError("the control plane is not listening")
        return int(self._port.getHost().port)

    @property
    def url(self) -> str:
        """The base HTTP URL (``http://127.0.0.1:port`` or ``https://…``)."""
        if self._port is None:
            raise RuntimeError("the control plane is not listening")
        return _base_url(self._port.getHost(), "https" if self._secure else "http")

    @property
    def ws_url(self) -> str:
        """The agent gateway URL (what ``HOSTLINK_WS_URL`` should be)."""
        return "ws" + self.url[len("http") :] + GATEWAY_PATH

    def listen_operator(
        self, description: str = DEFAULT_OPERATOR_LISTEN, *, token: str | None = None
    ) -> Deferred[ControlPlane]:
        """
        Serve ``GET /status`` (every session: agent id, remote address,
        counters) on its own listener, apart from the gateway, which anyone
        who can reach an agent's control plane can reach.  Bind it to
        loopback (the default) unless the network in between is trusted:
        a warning is logged when it is not.

        :param token: Also serve the operator API
            (:mod:`~hostlink_tw.controlplane.operatorapi`) there, to requests
            that present this bearer token.
        """
        if self._operator_port is not None:
            raise RuntimeError("the operator listener is already open")
        if token is not None:
            self._operator.serve_api(
                OperatorAPI(self, token), max_request_bytes(self.settings.max_command_bytes)
            )
        endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        d: Deferred[Any] = endpoint.listen(self._operator)

        def listening(port: Any) -> ControlPlane:
            self._operator_port = port
            host = str(getattr(port.getHost(), "host", ""))
            log.info("operator status page on {url}/status", url=self.operator_url)
            if not is_loopback(host):
                log.warn(
                    "the operator status page listens on {host}, not loopback: anyone who "
                    "can reach it sees every agent id and address",
                    host=host or "?",
                )
            return self

        return d.addCallback(listening)

    @property
    def operator_url(self) -> str:
        """The operator listener's base URL (``http://127.0.0.1:port``); ``/status`` is there."""
        if self._operator_port is None:
            raise RuntimeError("the operator listener is not open")
        return _base_url(self._operator_port.getHost(), "http")

    def stop(self) -> Deferred[None]:
        """
        Stop listening, close every session with 1001, drop every other
        connection, and fire once all are gone (sessions that do not finish
        the closing handshake within a second are aborted).  Calling it
        again returns a Deferred for the same shutdown.
        """
        if self._stop_result is not None:
            return self._stop_chained(self._stop_result)
        self._agents.stop_polling()
        self.controls.stop()
        self.tasks.stop()
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
        if self._operator_port is not None:
            waits.append(defer.maybeDeferred(self._operator_port.stopListening))
            for connection in list(self._operator.protocols):
                connection.transport.abortConnection()
        waits.append(self._gateway.close_all())
        self._sessions.cancel_waiters()
        result = defer.gatherResults(waits, consumeErrors=True)

        def close_tasks(outcome: object) -> object:
            # After the connections: no message can reach the store any more.
            self.tasks.close()
            return outcome

        result.addBoth(close_tasks)
        store = self._authenticator.detach_store()
        if store is not None:
            # After the connections: an upgrade still being committed finishes first.
            result.addBoth(lambda outcome: store.close().addCallback(lambda _: outcome))
        stopped: Deferred[None] = result.addCallback(lambda _: None)
        self._stop_result = stopped
        return self._stop_chained(stopped)

    @staticmethod
    def _stop_chained(stopped: Deferred[None]) -> Deferred[None]:
        # Callers get their own Deferred, so one caller's callbacks cannot
        # change what the next caller of stop() sees.
        mine: Deferred[None] = Deferred()

        def chain(result: object) -> object:
            if isinstance(result, Failure):
                mine.errback(result)
            else:
                mine.callback(None)
            # Handed on to this caller; later callers see a finished stop.
            return None

        stopped.addBoth(chain)
        return mine

    # -- agents -----------------------------------------------------------------

    @property
    def agents(self) -> Mapping[str, RSAPublicKey]:
        """The authorized agents now in force."""
        return self._agents.snapshot()

    def set_agents(self, agents: Mapping[str, RSAPublicKey | str]) -> None:
        """Replace the in-memory agents (file entries stay on top); open sessions stay."""
        self._agents.set_static(agents)

    def reload_agents(self) -> bool:
        """
        Re-read the agents file now (what SIGHUP does).  Open sessions are
        kept, even of agents no longer listed.  On error the current set is
        kept and the reason logged.

        :returns: True if the new set is in force.
        """
        return self._agents.reload()

    def poll_agents_file(self) -> None:
        """Reload the agents file if its size, mtime or inode changed."""
        self._agents.poll()

    # -- sessions -----------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """The open sessions (one per agent), oldest first."""
        return self._sessions.all()

    def session(self, agent_id: str) -> Session:
        """
        The agent's open session.

        :raises NoSessionError: It has none.
        """
        return self._sessions.get(agent_id)

    def wait_active(
        self, agent_id: str, *, new: bool = False, timeout: float | None = None
    ) -> Deferred[Session]:
        """
        Fire with the agent's session once its hello is acked.

        :param new: Wait for a session that becomes active after this call,
            even if one is active now (after a reconnect).
        :param timeout: Seconds, then fail with :class:`defer.TimeoutError`.
        """
        return self._sessions.wait_active(agent_id, new=new, timeout=timeout)

    def wait_message(
        self, agent_id: str, message_type: str | None = None, *, timeout: float | None = None
    ) -> Deferred[Envelope]:
        """Fire with the next valid envelope from the agent (of that type, if given)."""
        return self._sessions.wait_message(agent_id, message_type, timeout=timeout)

    def send_envelope(self, agent_id: str, envelope: Envelope) -> None:
        """Send an envelope to the agent (not validated)."""
        self.session(agent_id).send_envelope(envelope)

    def send_text(self, agent_id: str, text: str) -> None:
        """Send a raw text frame to the agent."""
        self.session(agent_id).send_text(text)

    def send_binary(self, agent_id: str, data: bytes) -> None:
        """Send a raw binary frame to the agent."""
        self.session(agent_id).send_binary(data)

    def close(
        self, agent_id: str, code: int = CLOSE_NORMAL, reason: str = ""
    ) -> Deferred[int | None]:
        """Close the agent's session with any code; fire when it is gone."""
        return self.session(agent_id).close(code, reason)

    def abort(self, agent_id: str) -> Deferred[int | None]:
        """Drop the agent's TCP connection without a close frame."""
        return self.session(agent_id).abort()

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` returns."""
        return {
            "agents_authorized": len(self._agents),
            "connections": len(self.connections.protocols),
            "sessions": [s.snapshot() for s in self.sessions()],
        }

    # -- the test layer's knobs, under their documented names ------------------------

    @property
    def answer_pings(self) -> bool:
        """False: the control plane ignores pings (no pong), for keepalive tests."""
        return self.controls.answer_pings

    @answer_pings.setter
    def answer_pings(self, value: bool) -> None:
        self.controls.answer_pings = value

    @property
    def withhold_hello_ack(self) -> bool:
        """True: ``agent.hello`` is recorded but never acknowledged."""
        return self.controls.withhold_hello_ack

    @withhold_hello_ack.setter
    def withhold_hello_ack(self, value: bool) -> None:
        self.controls.withhold_hello_ack = value

    @property
    def record_messages(self) -> int:
        """Bytes of inbound envelopes kept per session (tests; 0: none)."""
        return self.controls.record_messages

    @record_messages.setter
    def record_messages(self, value: int) -> None:
        self.controls.record_messages = value

    @property
    def attempts(self) -> list[ConnectionAttempt]:
        """Every upgrade attempt, oldest first (tests only; never logged)."""
        return self.controls.attempts

    def refuse_upgrades(
        self, status: int = 503, *, duration: float | None = None, reason: str = ""
    ) -> None:
        """
        Refuse every upgrade with this HTTP status, for ``duration`` seconds
        or until :meth:`clear_refusal`.
        """
        self.controls.refuse_upgrades(status, duration=duration, reason=reason)

    def clear_refusal(self) -> None:
        """Accept upgrades again."""
        self.controls.clear_refusal()

    def stall_upgrades(self, *, duration: float | None = None) -> None:
        """
        Hold every new upgrade unanswered (the client's handshake timeout is
        the only way out) for ``duration`` seconds or until :meth:`clear_stall`.
        """
        self.controls.stall_upgrades(duration=duration)

    def clear_stall(self) -> None:
        """Stop stalling; held upgrades still connected proceed normally."""
        self.controls.clear_stall()

    @property
    def stalled_count(self) -> int:
        """How many upgrades are being held now."""
        return self.controls.stalled_count

    def hold_acks(self) -> None:
        """Withhold the acks of stored task messages (the agent's spool fills) until released."""
        self.controls.hold_acks()

    def release_acks(self) -> int:
        """Ack as usual again and send the withheld acks still deliverable; return how many."""
        return self.controls.release_acks()

    def redeliver(self, task_id: str) -> bool:
        """Send the task's ``task.deliver`` again, same attempt; False without a session."""
        return self.controls.redeliver(task_id)

    def new_attempt(self, task_id: str) -> TaskRecord:
        """Give the task a new ``execution_attempt_id`` (see :meth:`TaskService.new_attempt`)."""
        return self.controls.new_attempt(task_id)


def start_control_plane(
    agents: Mapping[str, RSAPublicKey | str],
    *,
    listen: str = DEFAULT_LISTEN,
    operator_listen: str | None = None,
    operator_token: str | None = None,
    reactor: Any = None,
    **options: Any,
) -> Deferred[ControlPlane]:
    """
    Build a :class:`ControlPlane` and listen; fire with it once the port is bound.

    :param agents: Agent id → public key (:class:`RSAPublicKey`, base64 PKIX DER, or PEM).
    :param listen: A Twisted server endpoint description; the default is an
        ephemeral port on 127.0.0.1 (read :attr:`ControlPlane.port` / ``ws_url``).
    :param operator_listen: Also open the operator listener (``/status``)
        there (:meth:`ControlPlane.listen_operator`); None: not opened.
    :param operator_token: With ``operator_listen``: serve the operator API
        there too, behind this bearer token.
    :param options: Keyword arguments of :class:`ControlPlane`.
    """
    try:
        control_plane = ControlPlane(agents, reactor=reactor, **options)
    except (AgentsFileError, TaskStoreError, ValueError):
        return defer.fail()
    d = control_plane.listen(listen)
    if operator_listen is not None:
        d.addCallback(lambda cp: cp.listen_operator(operator_listen, token=operator_token))
    return d
