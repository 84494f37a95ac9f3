"""
twistd support for the reference control plane:
``twistd -n hostlink-controlplane --agents agents.json``.

The plugin in C{twisted/plugins/hostlink_controlplane_plugin.py} points
here; L{Options} parses the command line and L{makeService} builds a
L{ControlPlaneService}, which listens, polls the agents file, and re-reads it
on SIGHUP.
"""

from __future__ import annotations

import re
import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from hostlink_tw.config import ConfigError, check_server_endpoint
from hostlink_tw.controlplane import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_SKEW,
    DEFAULT_NONCE_CACHE_SIZE,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
    AgentsFileError,
    ControlPlane,
    load_agents_file,
)
from hostlink_tw.duration import DurationError, format_duration, parse_go_duration

__all__ = ["ControlPlaneService", "Options", "makeService"]

log = Logger()

DEFAULT_DAEMON_LISTEN = "tcp:8080:interface=127.0.0.1"

# (option, attribute, default seconds, help)
_DURATIONS: tuple[tuple[str, str, float, str], ...] = (
    ("max-skew", "max_skew", DEFAULT_MAX_SKEW,
     "How far a signed X-Timestamp may be from this clock."),
    ("handshake-timeout", "handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT,
     "Time a new connection has to send its request (0s: no limit)."),
    ("ping-interval", "ping_interval", DEFAULT_PING_INTERVAL,
     "Keepalive ping period towards agents (0s: no pings)."),
    ("ping-timeout", "ping_timeout", DEFAULT_PING_TIMEOUT,
     "Time to wait for a pong before dropping the connection."),
    ("reload-interval", "reload_interval", DEFAULT_RELOAD_INTERVAL,
     "How often to check the agents file for changes (0s: only on SIGHUP)."),
)

# (option, attribute, default, help)
_COUNTS: tuple[tuple[str, str, int, str], ...] = (
    ("max-message-bytes", "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES,
     "Largest inbound message; larger ones close the session with 1009."),
    ("max-connections", "max_connections", DEFAULT_MAX_CONNECTIONS,
     "Concurrent connections; above it, upgrades get HTTP 503."),
    ("nonce-cache-size", "nonce_cache_size", DEFAULT_NONCE_CACHE_SIZE,
     "Most nonces remembered for replay protection; when full, upgrades get HTTP 503."),
)

_COUNT = re.compile(r"[0-9]+", re.ASCII)


class Options(usage.Options):
    """Command line of C{twistd hostlink-controlplane}."""

    synopsis = "[options] --agents FILE"
    longdesc = (
        "Reference Hostlink control plane: serves the agent WebSocket gateway at "
        "/api/v1/agents/ws (signed upgrades, agent.hello -> agent.hello_ack), plus "
        "GET /healthz and GET /status, on one Twisted endpoint (tcp: or ssl:). "
        "Authorized agents come from a JSON file mapping agent id to public key "
        "(standard base64 of the PKIX DER encoding, or PEM); it is re-read when it "
        "changes and on SIGHUP. Durations use Go syntax (300ms, 5s, 2m)."
    )
    optParameters = [
        ["listen", None, DEFAULT_DAEMON_LISTEN,
         "Twisted server endpoint, e.g. tcp:8080:interface=127.0.0.1 or "
         "ssl:8443:privateKey=key.pem:certKey=cert.pem."],
        ["agents", None, None, "JSON file: agent id -> public key (required)."],
    ] + [
        [name, None, format_duration(default), text] for name, _, default, text in _DURATIONS
    ] + [
        [name, None, str(default), text] for name, _, default, text in _COUNTS
    ]

    def postOptions(self) -> None:
        """Check every value; a problem is a one-line usage error."""
        settings: dict[str, Any] = {}
        for name, attribute, _, _ in _DURATIONS:
            text = self[name]
            try:
                seconds = parse_go_duration(text)
            except DurationError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
            if seconds < 0:
                raise usage.UsageError(f"--{name}: must not be negative, got {text!r}")
            settings[attribute] = seconds
        for name, attribute, _, _ in _COUNTS:
            text = str(self[name]).strip()
            if not _COUNT.fullmatch(text) or int(text) < 1:
                raise usage.UsageError(
                    f"--{name}: must be a positive whole number, got {self[name]!r}"
                )
            settings[attribute] = int(text)
        if not self["agents"]:
            raise usage.UsageError("--agents FILE is required (JSON: agent id -> public key)")
        try:
            load_agents_file(self["agents"])
        except AgentsFileError as e:
            raise usage.UsageError(f"--agents: {e}") from None
        settings["agents_file"] = self["agents"]
        self["listen"] = self["listen"].strip()
        self._check_listen(self["listen"])
        self.settings = settings

    @staticmethod
    def _check_listen(description: str) -> None:
        try:
            check_server_endpoint(description)
        except ConfigError as e:
            raise usage.UsageError(f"--listen {e}") from None


class ControlPlaneService(Service):
    """
    Runs a L{ControlPlane} under twistd: listens on start (before privileges
    are dropped), re-reads the agents file on SIGHUP, stops cleanly.
    """

    def __init__(self, control_plane: ControlPlane, listen: str) -> None:
        self.control_plane = control_plane
        self.listen = listen
        self._previous_sighup: Any = None
        self._sighup_installed = False

    def privilegedStartService(self) -> None:
        """Bind the port; a failure to listen stops twistd with the error."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        failures: list[Failure] = []
        self.control_plane.listen(self.listen).addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        """Install the SIGHUP handler (chaining any previous one)."""
        super().startService()  # type: ignore[no-untyped-call]
        if self.control_plane.agents_file is None:
            return
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        self._sighup_installed = True

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # Signal context: hand the work to the reactor thread.
        self.control_plane.reactor.callFromThread(self._reload)
        previous = self._previous_sighup
        if callable(previous):
            previous(signum, frame)

    def _reload(self) -> None:
        log.info("SIGHUP: re-reading the agents file")
        self.control_plane.reload_agents()

    def stopService(self) -> Deferred[None]:
        """Restore the previous SIGHUP handler and stop the control plane."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sighup_installed:
            previous = self._previous_sighup
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            self._sighup_installed = False
        return self.control_plane.stop()


def makeService(options: Options, reactor: Any = None) -> ControlPlaneService:
    """Build the service twistd runs from parsed L{Options}."""
    control_plane = ControlPlane(reactor=reactor, **options.settings)
    return ControlPlaneService(control_plane, options["listen"])
