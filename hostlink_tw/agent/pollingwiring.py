"""
The HTTP paths wired to a client and its task engine (PROTOCOL §9):
:func:`build_polling` and :class:`HTTPPaths`.

* A :class:`~hostlink_tw.agent.httpapi.ControlPlaneAPI` on
  ``SH_CONTROL_PLANE_URL`` with the session's TLS trust (the system store
  plus ``HOSTLINK_WS_CA_FILE``) and proxy variables, signing each request
  with the agent's key.
* A :class:`~hostlink_tw.agent.polling.PollingCoordinator` fed by the
  sessions: a session's start with its hello_ack's ``delivery_enabled`` (as
  the engine read it), its end.
* A :class:`~hostlink_tw.agent.poller.Poller` whose tasks go to
  :meth:`TaskEngine.offer <hostlink_tw.agent.tasks.TaskEngine.offer>`, and
  whose every answer lets the engine retry owed reports (and, while polling
  runs, release attempts held since a restart).

Polling is not tied to the local delivery flag: §9.3 says it runs unless a
session delivers, so an agent with ``HOSTLINK_WS_DELIVERY_ENABLED`` off
polls all the time, as the Go agent does.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hostlink_tw.agent.httpapi import ControlPlaneAPI
from hostlink_tw.agent.poller import Poller
from hostlink_tw.agent.polling import PollingCoordinator
from hostlink_tw.agent.session import Session
from hostlink_tw.agent.tasks import TaskEngine

__all__ = ["HTTPPaths", "build_polling", "split_control_plane"]

_log = Logger(namespace="hostlink_tw.poller")


class HTTPPaths:
    """
    The API, coordinator and poller of one client; a session listener.

    Register it with the client *after* the engine (it reads the hello_ack's
    ``delivery_enabled`` the engine took).
    """

    def __init__(self, api: ControlPlaneAPI, engine: TaskEngine, *, reactor: Any,
                 local_delivery: bool, threshold: float, poll_interval: float,
                 heartbeat_interval: float) -> None:
        self.api = api
        #: The task engine the tasks go to (its reporter's counts are shown).
        self.engine = engine
        self.coordinator = PollingCoordinator(reactor, local_delivery=local_delivery,
                                              threshold=threshold,
                                              on_change=self._changed)
        self.poller = Poller(api, self.coordinator, clock=reactor,
                             poll_interval=poll_interval,
                             heartbeat_interval=heartbeat_interval, offer=engine.offer,
                             on_answer=self._answered)
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Start polling once the engine's store is open (offers need it)."""

        def go(_: object) -> None:
            if not self._stopped and not self._started:
                self._started = True
                self.poller.start()

        self.engine.when_ready().addCallback(go)

    def stop(self) -> Deferred[None]:
        """Stop the loops and the fallback timer, then close the connections."""
        self._stopped = True
        self.poller.stop()
        self.coordinator.stop()
        try:
            return self.api.close()
        except Exception:  # noqa: BLE001 - closing must not fail the stop
            _log.failure("closing the control plane's HTTP connections failed")
            return succeed(None)

    def _changed(self, polling: bool) -> None:
        self.poller.polling_changed(polling)

    def _answered(self) -> None:
        self.engine.control_plane_answered(self.coordinator.polling)

    # -- SessionListener -------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        """A session is active: does it deliver (§9.3)?"""
        if self._stopped:
            return
        self.coordinator.session_active(self.engine.peer_delivery_enabled)

    def session_ended(self, session: Session, reason: str) -> None:
        """The session ended: polling resumes after the threshold."""
        if self._stopped:
            return  # the client closes its session after the poller stopped: no timer
        self.coordinator.session_ended()


def split_control_plane(control_plane_url: str, ws_url: str) -> str | None:
    """
    A warning when the HTTP paths and the session go to different hosts.

    ``HOSTLINK_WS_URL`` set alone leaves ``SH_CONTROL_PLANE_URL`` at its
    production default, so heartbeats and polls would leave for
    ``api.selfhost.dev`` while the session goes elsewhere: legitimate with a
    separate gateway host, but usually a forgotten variable.
    """
    http_host = urlsplit(control_plane_url).hostname
    ws_host = urlsplit(ws_url).hostname
    if http_host is None or ws_host is None or http_host == ws_host:
        return None
    return (f"heartbeats and polling go to {http_host} (SH_CONTROL_PLANE_URL) while the "
            f"session goes to {ws_host} (HOSTLINK_WS_URL); set SH_CONTROL_PLANE_URL if "
            "both are the same control plane")


def build_polling(settings: Any, signer: Any, engine: TaskEngine, client: Any,
                  reactor: Any, environ: Any = None) -> HTTPPaths:
    """The HTTP paths of ``client`` from the settings, registered as its
    session listener; not started.

    :raises ValueError: ``SH_CONTROL_PLANE_URL`` is not an http(s) URL.
    """
    split = split_control_plane(settings.control_plane_url, settings.ws_url)
    if split is not None:
        _log.warn("{message}", message=split)
    api = ControlPlaneAPI(settings.control_plane_url, signer, reactor=reactor,
                          ca_file=settings.ca_file,
                          environ=os.environ if environ is None else environ)
    paths = HTTPPaths(api, engine, reactor=reactor,
                      local_delivery=settings.delivery_enabled,
                      threshold=settings.polling_fallback_threshold,
                      poll_interval=settings.task_poll_interval,
                      heartbeat_interval=settings.heartbeat_interval)
    engine.attach_api(api)
    client.add_session_listener(paths)
    return paths
