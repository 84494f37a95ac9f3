"""
HostlinkService: the agent uplink as a Twisted service.

Add it to any Twisted application::

    from hostlink_tw.config import load_settings
    from hostlink_tw.service import HostlinkService

    HostlinkService(load_settings()).setServiceParent(application)

Neither ``load_settings()`` nor ``startService`` raises or blocks because of
configuration or identity: everything that can go wrong is logged in one
clear line and the rest of the application runs on.  Settings refused from
the environment (``Settings.errors``: an unreadable ``HOSTLINK_WS_CA_FILE``,
a gateway URL the client cannot dial) are one error line at start, and the
service then stays ``misconfigured`` without connecting.  Unlike the
reference agent, a missing or broken identity is not final: the service
looks again on the reconnect backoff and starts the client by itself once
``hostlink-tw init`` (or whatever provisions the host) has written
``agent.json`` and the key.

Phase 2 (tasks, PROTOCOL §7–§8): with the client comes a
:class:`~hostlink_tw.agent.tasks.TaskEngine` and its
:class:`~hostlink_tw.agent.runner.TaskRunner`, a child service.  The local
store is opened when delivery or results are enabled, or when a store file
is already there (its unacked results are still owed to the control plane);
tasks that come by polling are taken in only then (§9.2: recorded first).
On ``stopService`` the runner is stopped first: running process groups are
killed and their ``interrupted`` finals recorded and, while the session is
up, sent — within the kill grace plus 2 s — before the client closes.

The HTTP paths (§9, :mod:`~hostlink_tw.agent.pollingwiring`) start with the
client: the heartbeat always, the poll whenever no session delivers tasks.
They are stopped first on ``stopService``, so nothing new is taken in while
the runner stops; then their connections are closed.
"""

from __future__ import annotations

import platform
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.copyright import version as twisted_version
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw import __version__
from hostlink_tw.agent.identity import load_agent_state, load_private_key
from hostlink_tw.agent.runner import TaskRunner
from hostlink_tw.agent.tasks import TaskEngine, build_tasks
from hostlink_tw.backoff import Backoff
from hostlink_tw.client import ClientEvent, HostlinkClient, Observers
from hostlink_tw.config import Settings
from hostlink_tw.identity import IdentityError
from hostlink_tw.safetext import escape_control, redact_url
from hostlink_tw.signing import RequestSigner, SigningError

if TYPE_CHECKING:
    from hostlink_tw.agent.pollingwiring import HTTPPaths

__all__ = ["HostlinkService"]

_log = Logger(namespace="hostlink_tw.service")

ENABLE_HINT = "set HOSTLINK_WS_ENABLED=true (or pass --enable to twistd hostlink)"


class HostlinkService(MultiService):
    """
    Keeps this host's WebSocket session to its control plane while running.

    :param settings: the agent's configuration.
    :param reactor: the reactor to run on (the global one by default).
    :param rng: jitter source for the identity re-checks and the client.
    :param log: where log events go.
    :param client_factory: builds the client once the identity is loaded
        (``HostlinkClient`` by default; tests and embedders may wrap it).

    The service is also the status source of the local status endpoint:
    :meth:`snapshot` and :meth:`add_observer` work before the client exists
    (identity missing, flag off) and forward to it afterwards.
    """

    name = "hostlink"

    def __init__(
        self,
        settings: Settings,
        *,
        reactor: Any = None,
        rng: random.Random | None = None,
        log: Logger | None = None,
        client_factory: Callable[..., HostlinkClient] = HostlinkClient,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings
        self.reactor = reactor
        self.log = log if log is not None else _log
        self._rng = rng
        self._client_factory = client_factory
        self.client: HostlinkClient | None = None
        #: The task engine and runner, made with the client (phase 2).
        self.tasks: TaskEngine | None = None
        self.runner: TaskRunner | None = None
        #: The HTTP paths (§9: poll, heartbeat, reports), made with the client.
        self.http: HTTPPaths | None = None
        self._unsubscribe_client: Callable[[], None] | None = None
        self._identity_problem: str | None = None
        self._config_problem: str | None = None
        self._next_check: DelayedCall | None = None
        self._checks = Backoff(
            settings.reconnect_min, settings.reconnect_max, settings.reconnect_jitter, rng
        )
        self._observers = Observers(self.log)
        if settings.status_listen:
            self._add_status_page(settings.status_listen)

    def _add_status_page(self, endpoint: str) -> None:
        # Imported only when asked for: prometheus_client and twisted.web
        # cost a noticeable share of start-up time (docs/performance.rst).
        from hostlink_tw.status import exposed_interface, make_status_service

        try:
            status, self.metrics = make_status_service(endpoint, self, self.reactor)
        except Exception as e:  # noqa: BLE001 - a bad endpoint must not take the agent down
            self.log.error(
                "status page not started: {endpoint!r} is not a server endpoint: {error}",
                endpoint=endpoint,
                error=str(e),
            )
            return
        status.setName("status")  # type: ignore[no-untyped-call]
        status.setServiceParent(self)  # type: ignore[no-untyped-call]
        exposed = exposed_interface(status.endpoint)
        if exposed is not None:
            # Issue 10 item 16: the page is unauthenticated and names this
            # agent, its control plane and its failures.
            self.log.warn(
                "status page {endpoint!r} listens on {address}, not only on loopback: "
                "anyone who can reach it reads this agent's id, URL and state; "
                "add interface=127.0.0.1 unless that is intended",
                endpoint=endpoint,
                address=exposed,
            )

    # -- IService ------------------------------------------------------------------

    def startService(self) -> None:
        """Start the children and, behind the feature flag, the client (asynchronously)."""
        # The agent's first line (before the status page's): what a bug report needs.
        self.log.info(
            "hostlink_tw {version} (Twisted {twisted}, Python {python})",
            version=__version__,
            twisted=twisted_version,
            python=platform.python_version(),
        )
        super().startService()  # type: ignore[no-untyped-call]
        if self.settings.errors:
            # Refused settings do not fix themselves: one line, no client, no retries.
            self._config_problem = "; ".join(self.settings.errors)
            self.log.error(
                "Hostlink WebSocket uplink not started: {error}", error=self._config_problem
            )
            return
        if not self.settings.enabled:
            self.log.info(
                "Hostlink WebSocket uplink is disabled; to enable it, {hint}", hint=ENABLE_HINT
            )
            return
        self._next_check = self.reactor.callLater(0, self._start_client)

    def stopService(self) -> Deferred[None]:
        """
        Stop the client (close 1000, no timers left); fires when all is closed.

        A later ``startService`` starts afresh: identity read again, a new client.
        """
        if self._next_check is not None and self._next_check.active():
            self._next_check.cancel()
        self._next_check = None
        self._checks.reset()
        self._identity_problem = self._config_problem = None
        client, self.client = self.client, None
        engine, self.tasks = self.tasks, None
        runner, self.runner = self.runner, None
        http, self.http = self.http, None
        # The poller before anything: no task is taken in while stopping.
        closed_http = http.stop() if http is not None else succeed(None)
        # Then tasks: their interrupted finals go out before the close frame.
        first = self._stop_tasks(engine, runner)

        def stop_client(_: object) -> Deferred[Any]:
            waits: list[Deferred[Any]] = []
            if client is not None:
                unsubscribe, self._unsubscribe_client = self._unsubscribe_client, None
                stopped = client.stop()
                if unsubscribe is not None:
                    # After the stop: its last events (inactive, closed) still count.
                    stopped.addBoth(lambda result: (unsubscribe(), result)[1])
                waits.append(stopped)
            stopped_children = super(HostlinkService, self).stopService()  # type: ignore[no-untyped-call]
            if stopped_children is not None:
                waits.append(stopped_children)
            waits.append(closed_http)
            return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

        def close_store(result: object) -> Deferred[Any]:
            if engine is None:
                return succeed(result)
            return engine.close().addBoth(lambda _: result)

        done = first.addCallback(stop_client).addBoth(close_store)
        return done.addCallback(lambda _: None)

    def _stop_tasks(self, engine: TaskEngine | None, runner: TaskRunner | None) -> Deferred[Any]:
        if engine is None or runner is None:
            return succeed(None)
        work: Deferred[Any] = runner.stopService()
        work.addCallback(lambda _: engine.pending_writes())
        work.addCallback(lambda _: engine.outbox.when_idle())
        # §8.8: all within the kill grace plus 2 s; what is not sent by then
        # is replayed after the next start.  The work itself is not cancelled
        # (the runner's own stop must complete); we only stop waiting.
        done: Deferred[Any] = Deferred()

        def late() -> None:
            self.log.warn("stopping tasks: not everything was sent in time; "
                          "it is replayed after the next start")
            done.callback(None)

        timer = self.reactor.callLater(self.settings.task_kill_grace + 2.0, late)

        def finished(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("stopping tasks failed", result)
            if timer.active():
                timer.cancel()
                done.callback(None)

        work.addBoth(finished)

        def disown(result: object) -> object:
            if runner.parent is not None:
                runner.disownServiceParent()  # type: ignore[no-untyped-call]
            return result

        return done.addBoth(disown)

    # -- identity and client -------------------------------------------------------

    def _start_client(self) -> None:
        self._next_check = None
        if not self.running or self.client is not None:
            return
        settings = self.settings
        try:
            # Both loaders know both paths, so every hint names the identity
            # this agent uses ('hostlink-tw init --state-path … --private-key-path …').
            state = load_agent_state(
                settings.state_path, private_key_path=settings.private_key_path
            )
            key = load_private_key(settings.private_key_path, state_path=settings.state_path)
            signer = RequestSigner.from_key(key, state.agent_id)
        except (IdentityError, SigningError) as e:
            # Escaped: paths and ids come from the environment and from files.
            self._wait_for_identity(escape_control(str(e)))
            return
        try:
            client = self._client_factory(settings, signer, reactor=self.reactor, rng=self._rng)
        except ValueError as e:
            # A configuration the client cannot use does not fix itself.
            self._config_problem = escape_control(str(e))
            self.log.error(
                "Hostlink WebSocket uplink not started: {error}", error=self._config_problem
            )
            return
        self._identity_problem = None
        self.client = client
        self._start_tasks(client, signer)
        self._unsubscribe_client = client.add_observer(self._observers.notify)
        self.log.info(
            "Hostlink WebSocket uplink starting agent_id={agent_id} url={url}",
            agent_id=client.agent_id,
            url=redact_url(client.snapshot()["url"]),  # query values too, not only user info
        )
        client.start()
        if self.http is not None:
            self.http.start()

    def _start_tasks(self, client: HostlinkClient, signer: RequestSigner) -> None:
        """The task engine and runner for this client (PROTOCOL §7–§8), and
        the HTTP paths that bring tasks when no session delivers them (§9)."""
        engine, runner = build_tasks(self.settings, client, self.reactor)
        runner.setServiceParent(self)
        self.tasks, self.runner = engine, runner
        if not engine.uses_store:
            # Both flags off and nothing owed: no task can run here, so the
            # HTTP paths would only mark tasks taken that never run.
            self.log.info(
                "task polling off: HOSTLINK_WS_DELIVERY_ENABLED and HOSTLINK_WS_RESULTS_ENABLED "
                "are both off"
            )
        else:
            # Imported here: twisted.web.client costs about 80 ms of every
            # start, and an agent without tasks never polls.
            from hostlink_tw.agent.pollingwiring import build_polling

            try:
                self.http = build_polling(self.settings, signer, engine, client, self.reactor)
            except ValueError as e:
                self.log.error("task polling not started: {error}",
                               error=escape_control(str(e)))
        engine.start()

    def _wait_for_identity(self, problem: str) -> None:
        delay = self._checks.next_delay()
        if problem != self._identity_problem:
            # One error line per distinct problem, not one per re-check.
            self.log.error(
                "Hostlink WebSocket uplink waiting for this agent's identity: {problem}"
                " (checking again in {delay:.1f}s, then on the reconnect backoff)",
                problem=problem,
                delay=delay,
            )
        self._identity_problem = problem
        self._next_check = self.reactor.callLater(delay, self._start_client)

    # -- status source -------------------------------------------------------------

    def add_observer(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Receive the client's events, including those of a client started later."""
        return self._observers.add(observer)

    def snapshot(self) -> dict[str, Any]:
        """The client's state, or why there is no client yet."""
        if self.client is not None:
            return self.client.snapshot()
        if self._config_problem is not None:
            state = "misconfigured"
        elif not self.settings.enabled:
            state = "disabled"
        elif self._identity_problem is not None:
            state = "waiting_for_identity"
        else:
            state = "starting" if self.running else "stopped"
        retry = self._next_check
        return {
            "state": state,
            "active": False,
            "agent_id": None,
            "url": redact_url(self.settings.ws_url),
            "connected_since": None,
            "last_ack": None,
            "last_ack_at": None,
            "attempts": 0,
            "last_failure": self._config_problem or self._identity_problem,
            "next_retry_at": retry.getTime() if retry is not None and retry.active() else None,
            "current_delay": None,
        }
