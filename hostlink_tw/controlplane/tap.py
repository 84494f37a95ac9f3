"""
twistd support for the reference control plane:
``twistd -n hostlink-controlplane --agents agents.json``.

The plugin in ``twisted/plugins/hostlink_controlplane_plugin.py`` points
here; :class:`Options` parses the command line and :func:`makeService` builds a
:class:`ControlPlaneService`, which listens, polls the agents file, and re-reads it
on SIGHUP.
"""

from __future__ import annotations

import functools
import re
import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from hostlink_tw._files import FileTooLargeError, NotRegularFileError, read_regular_file
from hostlink_tw._listen import listen_failure
from hostlink_tw._twistd import PluginOptions
from hostlink_tw.config import ConfigError, check_server_endpoint
from hostlink_tw.controlplane.agents import AgentsFileError, load_agents_file
from hostlink_tw.controlplane.operatortoken import (
    OperatorTokenError,
    load_or_create_token,
    token_file_beside,
)
from hostlink_tw.controlplane.plane import ControlPlane
from hostlink_tw.controlplane.replay import NonceStore, ReplayStoreError, database_beside
from hostlink_tw.controlplane.settings import (
    DEFAULT_DELIVERY_WINDOW,
    DEFAULT_HANDSHAKE_TIMEOUT,
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
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
)
from hostlink_tw.controlplane.taskdb import TaskStoreError, tasks_database_beside
from hostlink_tw.controlplane.taskstore import TaskStore
from hostlink_tw.duration import DurationError, format_duration, parse_go_duration

__all__ = ["ControlPlaneService", "Options", "makeService"]

log = Logger()

DEFAULT_DAEMON_LISTEN = "tcp:8080:interface=127.0.0.1"
#: The operator listener: ``GET /status`` and the operator API.
DEFAULT_DAEMON_OPERATOR_LISTEN = "tcp:8081:interface=127.0.0.1"
#: The value of ``--operator-listen`` / ``--database`` / ``--tasks-database``
#: that turns them off.
OFF = "none"

# (option, attribute, default seconds, help)
_DURATIONS: tuple[tuple[str, str, float, str], ...] = (
    ("max-skew", "max_skew", DEFAULT_MAX_SKEW,
     "How far a signed X-Timestamp may be from this clock."),
    ("handshake-timeout", "handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT,
     "Time from TCP connect until a connection must be an accepted WebSocket, "
     "whatever it sends meanwhile (0s: no limit)."),
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
     "Concurrent WebSocket sessions; above it, upgrades get HTTP 503."),
    ("max-pending-connections", "max_pending_connections", DEFAULT_MAX_PENDING_CONNECTIONS,
     "Concurrent connections not yet an accepted WebSocket; a new one closes the oldest."),
    ("max-send-buffer-bytes", "max_send_buffer_bytes", DEFAULT_MAX_SEND_BUFFER_BYTES,
     "Bytes that may wait to be sent to a peer that does not read; above it, abort."),
    ("nonce-cache-size", "nonce_cache_size", DEFAULT_NONCE_CACHE_SIZE,
     "Most nonces remembered for replay protection; when full, upgrades get HTTP 503."),
    ("nonce-quota", "nonce_quota", DEFAULT_NONCE_QUOTA,
     "Accepted upgrades per agent inside the replay window; above it that agent gets 429."),
    ("max-pending-tasks", "max_pending_tasks", DEFAULT_MAX_PENDING_TASKS,
     "Unfinished tasks one agent may have; more are refused."),
    ("max-command-bytes", "max_command_bytes", DEFAULT_MAX_COMMAND_BYTES,
     "Longest task command, in UTF-8 bytes."),
    ("max-output-bytes", "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES,
     "Task output stored per attempt and stream; the rest is dropped, the task flagged."),
    ("delivery-window", "delivery_window", DEFAULT_DELIVERY_WINDOW,
     "Task attempts delivered to one agent and not started yet, at most."),
)

_COUNT = re.compile(r"[0-9]+", re.ASCII)


class Options(PluginOptions):
    """
    Command line of ``twistd hostlink-controlplane``.  Under twistd, every
    usage error (a bad value, a missing ``--agents``, an unknown option) is
    one line and a pointer to ``--help``; used alone, it is raised.
    """

    command = "hostlink-controlplane"

    synopsis = "[options] --agents FILE"
    longdesc = (
        "Reference Hostlink control plane: serves the agent WebSocket gateway at "
        "/api/v1/agents/ws (signed upgrades, agent.hello -> agent.hello_ack), plus "
        "GET /healthz, on one Twisted endpoint (tcp: or ssl:); GET /status (every "
        "session, with agent ids and addresses) and the operator API (/operator/v1/: "
        "tasks and agents, bearer token from operator.token) on a separate operator "
        "endpoint, loopback by default. "
        "Authorized agents come from a JSON file mapping agent id to public key "
        "(standard base64 of the PKIX DER encoding, or PEM); it is re-read when it "
        "changes and on SIGHUP. The replay window is kept in controlplane.db beside "
        "it, tasks and their output in tasks.db. Durations use Go syntax (300ms, 5s, 2m)."
    )
    optParameters = [
        ["listen", None, DEFAULT_DAEMON_LISTEN,
         "Twisted server endpoint, e.g. tcp:8080:interface=127.0.0.1 or "
         "ssl:8443:privateKey=key.pem:certKey=cert.pem (listen backlog: "
         "Twisted's 50 unless the endpoint says backlog=N)."],
        ["operator-listen", None, DEFAULT_DAEMON_OPERATOR_LISTEN,
         "Endpoint of the operator listener (GET /status and the operator API), or "
         "'none'. Keep it on loopback: it lists every agent id and address, and the "
         "API runs commands on agents."],
        ["operator-token-file", None, None,
         "File of the operator API's bearer token (default: operator.token beside the "
         "agents file); created with a new random token, mode 0600, if missing; refused "
         "if group or others can read it."],
        ["agents", None, None, "JSON file: agent id -> public key (required)."],
        ["database", None, None,
         "SQLite file of the replay window (default: controlplane.db beside the "
         "agents file; 'none': memory only, replays accepted after a restart)."],
        ["tasks-database", None, None,
         "SQLite file of tasks and their output (default: tasks.db beside the agents "
         "file; 'none': memory only, tasks forgotten on restart)."],
    ] + [
        [name, None, format_duration(default), text] for name, _, default, text in _DURATIONS
    ] + [
        [name, None, str(default), text] for name, _, default, text in _COUNTS
    ]
    optFlags = [
        ["no-delivery", None,
         "Never deliver tasks over sessions (every hello_ack says delivery_enabled false)."],
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
        database = (self["database"] or "").strip()
        if database.lower() == OFF:
            settings["database"] = False
        else:
            if database:
                settings["database"] = database
            self._check_database(database or database_beside(self["agents"]))
        tasks_database = (self["tasks-database"] or "").strip()
        if tasks_database.lower() == OFF:
            settings["tasks_database"] = False
        else:
            if tasks_database:
                settings["tasks_database"] = tasks_database
            self._check_tasks_database(tasks_database or tasks_database_beside(self["agents"]))
        settings["delivery_enabled"] = not self["no-delivery"]
        self["listen"] = self["listen"].strip()
        self._check_listen("listen", self["listen"])
        operator = (self["operator-listen"] or "").strip()
        self["operator-listen"] = None if operator.lower() in (OFF, "") else operator
        #: The operator API's bearer token (None without an operator listener).
        self.operator_token: str | None = None
        #: Where it is kept, and whether this start wrote it.
        self.operator_token_file: str | None = None
        self.operator_token_created = False
        if self["operator-listen"] is not None:
            self._check_listen("operator-listen", self["operator-listen"])
            path = (self["operator-token-file"] or "").strip() or token_file_beside(
                self["agents"]
            )
            try:
                token, created = load_or_create_token(path)
            except OperatorTokenError as e:
                raise usage.UsageError(f"--operator-token-file: {e}") from None
            self.operator_token, self.operator_token_created = token, created
            self.operator_token_file = path
        self.settings = settings

    @staticmethod
    def _check_database(path: str) -> None:
        # Opened (and created) now, so a bad path is a usage error, not a
        # traceback from makeService.
        try:
            NonceStore(path, reactor=None).close()
        except ReplayStoreError as e:
            raise usage.UsageError(f"--database: {e}") from None

    @staticmethod
    def _check_tasks_database(path: str) -> None:
        # As --database: a bad path is a usage error now.
        try:
            TaskStore(path).close()
        except TaskStoreError as e:
            raise usage.UsageError(f"--tasks-database: {e}") from None

    @staticmethod
    def _check_listen(option: str, description: str) -> None:
        _check_endpoint_files(option, description)
        try:
            check_server_endpoint(description)
        except ConfigError as e:
            raise usage.UsageError(f"--{option} {e}") from None


class ControlPlaneService(Service):
    """
    Runs a :class:`ControlPlane` under twistd: listens on start (before privileges
    are dropped), re-reads the agents file on SIGHUP, stops cleanly.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        listen: str,
        operator_listen: str | None = None,
        operator_token: str | None = None,
    ) -> None:
        """
        :param operator_listen: The operator listener's endpoint (None: none).
        :param operator_token: Serve the operator API there, behind this bearer token.
        """
        self.control_plane = control_plane
        self.listen = listen
        self.operator_listen = operator_listen
        self.operator_token = operator_token
        self._previous_sighup: Any = None
        self._sighup_installed = False

    def privilegedStartService(self) -> None:
        """
        Bind the ports.  An endpoint that cannot listen (a busy or
        privileged port, an address not on this host, a port out of range,
        a unix socket in a missing directory) stops twistd with one line
        naming the option, the endpoint and what to do, instead of a
        traceback.
        """
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen("listen", self.listen, self.control_plane.listen)
        if self.operator_listen is not None:
            self._listen(
                "operator-listen",
                self.operator_listen,
                functools.partial(
                    self.control_plane.listen_operator, token=self.operator_token
                ),
            )

    @staticmethod
    def _listen(option: str, description: str, listen: Any) -> None:
        failures: list[Failure] = []
        try:
            listen(description).addErrback(failures.append)
        except Exception:  # noqa: BLE001 - an endpoint that fails before its Deferred
            failures.append(Failure())  # type: ignore[no-untyped-call]
        if not failures:
            return
        # SystemExit with a message: twistd ends with that one line (status
        # 1); an exception would print its whole traceback.  Every failure,
        # not only CannotListenError: a port out of range is an
        # OverflowError, a unix socket in a missing directory an OSError.
        raise SystemExit(
            f"hostlink-controlplane: --{option} {description}: "
            f"{listen_failure(failures[0].value, f'--{option}')}"
        )

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


# The files an ssl: endpoint reads (Twisted reads them, blocking, while the
# description is parsed): key, certificate, chain, DH parameters.
_ENDPOINT_FILE_KEYS = ("privateKey", "certKey", "extraCertChain", "dhParameters")
# Arguments are separated by ":" unless escaped as "\:".
_ENDPOINT_SEPARATOR = re.compile(r"(?<!\\):")


def _check_endpoint_files(option: str, description: str) -> None:
    """
    Refuse an endpoint whose TLS files are not regular files, before Twisted
    opens them with a blocking open: a FIFO there would hang the start.
    """
    for argument in _ENDPOINT_SEPARATOR.split(description)[1:]:
        key, found, value = argument.partition("=")
        if not found or key.strip() not in _ENDPOINT_FILE_KEYS:
            continue
        path = value.replace("\\:", ":")
        try:
            read_regular_file(path, _MAX_ENDPOINT_FILE_BYTES)
        except (NotRegularFileError, FileTooLargeError, IsADirectoryError) as e:
            raise usage.UsageError(f"--{option} {key}={path}: {e.strerror}") from None
        except OSError:
            continue  # missing or unreadable: Twisted's own error names it


_MAX_ENDPOINT_FILE_BYTES = 1 << 20


def makeService(options: Options, reactor: Any = None) -> ControlPlaneService:
    """Build the service twistd runs from parsed :class:`Options`."""
    try:
        control_plane = ControlPlane(reactor=reactor, **options.settings)
    except (AgentsFileError, ReplayStoreError, TaskStoreError) as e:
        # Checked by Options already; changed since: still one line.
        raise SystemExit(f"hostlink-controlplane: {e}") from None
    return ControlPlaneService(
        control_plane, options["listen"], options["operator-listen"], options.operator_token
    )
