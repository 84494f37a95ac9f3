"""The agent's settings: environment variables and command-line options.

One immutable ``Settings`` is built by ``load_settings`` from two sources:

* the environment, read *leniently* as the reference agent reads it
  (PROTOCOL §4): an empty value means the default, an unparsable value logs a
  warning and uses the default, a value out of range logs a warning and is
  clamped to the nearest bound.  An operator's existing environment therefore
  behaves the same here as with the Go agent;
* overrides from command-line options, read *strictly*: a value someone just
  typed that cannot be used raises ``ConfigError`` naming the option and what
  it accepts, instead of being quietly replaced.

``SETTINGS`` describes every variable once (name, meaning, default, range,
option name); the README table, the twistd options and the parsing here are
all driven by it.  The table lives in ``hostlink_tw._config_table`` and the
per-variable parsing rules in ``hostlink_tw._config_reader``; this module
puts them together and is the public interface.

Three kinds of environment value are refused rather than replaced, because
guessing would hide the mistake: a ``HOSTLINK_WS_CA_FILE`` that holds no
readable certificate and a gateway URL (given or derived) that the client
cannot dial (either leaves an agent that never connects), and a
``HOSTLINK_TASK_WORKDIR`` that is not a directory (running tasks somewhere
else instead could do harm there).  ``load_settings`` does not
raise for them: they are kept in ``Settings.errors``, each one line, so that
an embedding application gets a ``Settings`` it can hand to
``HostlinkService`` (which logs them and stays ``misconfigured``), and
``twistd hostlink`` turns them into a usage error with ``Settings.check``.

Everything here is a plain function of its arguments: no reactor, and the only
I/O is reading the CA file named by ``HOSTLINK_WS_CA_FILE`` and looking at the
directory named by ``HOSTLINK_TASK_WORKDIR``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.logger import Logger

from hostlink_tw._config_reader import ConfigError, Reader
from hostlink_tw._config_table import SETTINGS, SettingSpec
from hostlink_tw._config_table import spec as _spec
from hostlink_tw.duration import parse_go_duration

# Protocol §3, where the agent connects: the URL rules live in hostlink_tw.wire.urls.
from hostlink_tw.wire.urls import derive_ws_url, gateway_url_problem

__all__ = [
    "SETTINGS",
    "ConfigError",
    "SettingSpec",
    "Settings",
    "check_server_endpoint",
    "derive_ws_url",
    "gateway_url_problem",
    "load_settings",
]

_log = Logger()

# PROTOCOL §1 fixes the state file's name inside the state directory.
_AGENT_STATE_FILENAME = "agent.json"
# PROTOCOL §8.7: the local task store's default file, in the state directory too.
_LOCAL_STORE_FILENAME = "task_store.db"


def _default_duration(env: str) -> float:
    return parse_go_duration(_spec(env).default)


def _default_integer(env: str) -> int:
    return int(_spec(env).default)


def check_server_endpoint(description: str) -> None:
    """
    Check a Twisted server endpoint description (``tcp:9920:interface=127.0.0.1``,
    ``ssl:8443:privateKey=…``) without listening.

    :raises ConfigError: one line naming the description and the problem.
    """
    # Imported here: parsing an endpoint needs the reactor's endpoint
    # plugins, which the rest of this module does not.
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    except Exception as e:  # noqa: BLE001 - every parse problem is a configuration error
        raise ConfigError(f"{description!r} is not a server endpoint: {e}") from None


@dataclass(frozen=True)
class Settings:
    """Everything the agent is configured with; durations are in seconds.

    Build it with ``load_settings``.  Every field has the documented default,
    so ``Settings()`` equals ``load_settings({})`` and tests can name only the
    fields they care about (note that ``ws_url`` is not re-derived when only
    ``control_plane_url`` is given, nor ``private_key_path`` and
    ``local_store_path`` when only ``state_path`` is).
    """

    enabled: bool = False
    ws_url: str = field(
        default_factory=lambda: derive_ws_url(_spec("SH_CONTROL_PLANE_URL").default)
    )
    control_plane_url: str = _spec("SH_CONTROL_PLANE_URL").default
    reconnect_min: float = _default_duration("HOSTLINK_WS_RECONNECT_MIN")
    reconnect_max: float = _default_duration("HOSTLINK_WS_RECONNECT_MAX")
    ping_interval: float = _default_duration("HOSTLINK_WS_PING_INTERVAL")
    pong_timeout: float = _default_duration("HOSTLINK_WS_PONG_TIMEOUT")
    hello_timeout: float = _default_duration("HOSTLINK_WS_HELLO_TIMEOUT")
    handshake_timeout: float = _default_duration("HOSTLINK_WS_HANDSHAKE_TIMEOUT")
    max_message_bytes: int = int(_spec("HOSTLINK_WS_MAX_MESSAGE_BYTES").default)
    ca_file: str | None = None
    reconnect_jitter: str = _spec("HOSTLINK_WS_RECONNECT_JITTER").default
    status_listen: str | None = None
    state_path: str = _spec("HOSTLINK_STATE_PATH").default
    private_key_path: str = os.path.join(_spec("HOSTLINK_STATE_PATH").default, "agent.key")
    # Phase 2: tasks (PROTOCOL §10).
    delivery_enabled: bool = False
    results_enabled: bool = False
    polling_fallback_threshold: float = _default_duration("HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD")
    task_poll_interval: float = _default_duration("HOSTLINK_TASK_POLL_INTERVAL")
    heartbeat_interval: float = _default_duration("HOSTLINK_HEARTBEAT_INTERVAL")
    output_flush_interval: float = _default_duration("HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL")
    output_flush_threshold: int = _default_integer("HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD")
    local_store_path: str = os.path.join(
        _spec("HOSTLINK_STATE_PATH").default, _LOCAL_STORE_FILENAME
    )
    spool_cap_bytes: int = _default_integer("HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES")
    terminal_reserve_bytes: int = _default_integer("HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES")
    store_retention: float = _default_duration("HOSTLINK_LOCAL_STORE_RETENTION")
    task_queue_limit: int = _default_integer("HOSTLINK_TASK_QUEUE_LIMIT")
    task_concurrency: int = _default_integer("HOSTLINK_TASK_CONCURRENCY")
    task_timeout: float = _default_duration("HOSTLINK_TASK_TIMEOUT")
    """Seconds; 0 means no time limit."""
    task_kill_grace: float = _default_duration("HOSTLINK_TASK_KILL_GRACE")
    task_output_limit_bytes: int = _default_integer("HOSTLINK_TASK_OUTPUT_LIMIT_BYTES")
    task_final_output_bytes: int = _default_integer("HOSTLINK_TASK_FINAL_OUTPUT_BYTES")
    task_workdir: str | None = None
    """``None``: tasks run in the agent's working directory."""
    errors: tuple[str, ...] = ()
    """Environment values refused by ``load_settings``, one line each: the
    uplink cannot run with them (see the module docstring)."""

    def check(self) -> None:
        """Raise ``ConfigError`` (one line) if ``errors`` is not empty."""
        if self.errors:
            raise ConfigError("; ".join(self.errors))

    @property
    def agent_state_file(self) -> str:
        """The agent state file, ``agent.json`` inside ``state_path``."""
        return os.path.join(self.state_path, _AGENT_STATE_FILENAME)


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    log: Logger | None = None,
) -> Settings:
    """Build ``Settings`` from the environment and command-line overrides.

    :param environ: the environment (default ``os.environ``), read leniently:
        empty means the default, unparsable warns and uses the default, out
        of range warns and clamps; a positive whole number (PROTOCOL §10)
        that is zero or less warns and uses the default.
        ``HOSTLINK_WS_RECONNECT_MAX`` below ``HOSTLINK_WS_RECONNECT_MIN``
        warns and is raised to it.  A spool cap below the terminal reserve
        plus twice the output flush threshold warns once and both take their
        defaults.
    :param overrides: raw option values keyed by environment variable name
        (see ``SettingSpec.env``); they win over ``environ`` and are read
        strictly.  An empty override means "unset" for the optional settings
        (``HOSTLINK_WS_URL``, ``HOSTLINK_WS_CA_FILE``,
        ``HOSTLINK_WS_STATUS_LISTEN``, ``HOSTLINK_TASK_WORKDIR``) and is an
        error for the others.
    :param log: where warnings go; each is a warning-level event with the
        fields ``variable``, ``value`` (the text given), ``used`` (the value used,
        as text) and ``reason``.

    ``HOSTLINK_WS_CA_FILE``, when set from either source, must be a readable
    file holding at least one PEM certificate, the gateway URL
    (``HOSTLINK_WS_URL``, or the one derived from ``SH_CONTROL_PLANE_URL``)
    must pass ``gateway_url_problem``, and ``HOSTLINK_TASK_WORKDIR``, when
    set, must be a directory the agent can enter.  From an override, an
    unusable one raises ``ConfigError``; from the environment it is not
    replaced by a default either (ignoring a CA file would silently trust
    fewer CAs; a URL the client cannot dial leaves an agent that never
    connects; tasks run elsewhere could do harm there): it is
    recorded in ``Settings.errors`` without raising and without logging, so
    that whoever uses the settings reports it once.  Call ``Settings.check``
    to raise them.

    ``HOSTLINK_WS_STATUS_LISTEN`` is kept as text: checking an endpoint
    description needs the reactor's endpoint parsers, which run where the
    status page is started.

    ``HOSTLINK_LOCAL_STORE_PATH`` unset is ``task_store.db`` inside the
    state directory (``HOSTLINK_STATE_PATH``), as for the Go agent.

    :raises ConfigError: for an unusable override or an unknown override name.
    """
    reader = Reader(
        os.environ if environ is None else environ,
        {} if overrides is None else overrides,
        _log if log is None else log,
    )
    control_plane_url = reader.text("SH_CONTROL_PLANE_URL")
    ws_url = reader.optional("HOSTLINK_WS_URL")
    if ws_url is None:
        ws_url = derive_ws_url(control_plane_url, reader.log)
        reader.check_gateway_url("SH_CONTROL_PLANE_URL", ws_url, control_plane_url)
    else:
        reader.check_gateway_url("HOSTLINK_WS_URL", ws_url, ws_url)
    reconnect_min = reader.duration("HOSTLINK_WS_RECONNECT_MIN")
    reconnect_max = reader.duration("HOSTLINK_WS_RECONNECT_MAX")
    if reconnect_max < reconnect_min:
        reconnect_max = reader.raise_to_minimum(
            "HOSTLINK_WS_RECONNECT_MAX", reconnect_max, "HOSTLINK_WS_RECONNECT_MIN", reconnect_min
        )
    state_path = reader.text("HOSTLINK_STATE_PATH")
    key_path = reader.text("HOSTLINK_PRIVATE_KEY_PATH")
    if key_path == _spec("HOSTLINK_PRIVATE_KEY_PATH").default:  # unset: follow the state path
        from hostlink_tw.agent.identity import default_private_key_path

        key_path = default_private_key_path(state_path, reader.log)
    store_path = reader.text("HOSTLINK_LOCAL_STORE_PATH")
    if store_path == _spec("HOSTLINK_LOCAL_STORE_PATH").default:  # unset: in the state path
        store_path = os.path.join(state_path, _LOCAL_STORE_FILENAME)
    flush_threshold = reader.integer("HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD")
    spool_cap, terminal_reserve = reader.spool(
        reader.integer("HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES"),
        reader.integer("HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES"),
        flush_threshold,
    )
    return Settings(
        enabled=reader.flag("HOSTLINK_WS_ENABLED"),
        ws_url=ws_url,
        control_plane_url=control_plane_url,
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        ping_interval=reader.duration("HOSTLINK_WS_PING_INTERVAL"),
        pong_timeout=reader.duration("HOSTLINK_WS_PONG_TIMEOUT"),
        hello_timeout=reader.duration("HOSTLINK_WS_HELLO_TIMEOUT"),
        handshake_timeout=reader.duration("HOSTLINK_WS_HANDSHAKE_TIMEOUT"),
        max_message_bytes=reader.integer("HOSTLINK_WS_MAX_MESSAGE_BYTES"),
        ca_file=reader.optional("HOSTLINK_WS_CA_FILE"),
        reconnect_jitter=reader.choice("HOSTLINK_WS_RECONNECT_JITTER"),
        status_listen=reader.optional("HOSTLINK_WS_STATUS_LISTEN"),
        state_path=state_path,
        private_key_path=key_path,
        delivery_enabled=reader.flag("HOSTLINK_WS_DELIVERY_ENABLED"),
        results_enabled=reader.flag("HOSTLINK_WS_RESULTS_ENABLED"),
        polling_fallback_threshold=reader.duration("HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD"),
        task_poll_interval=reader.duration("HOSTLINK_TASK_POLL_INTERVAL"),
        heartbeat_interval=reader.duration("HOSTLINK_HEARTBEAT_INTERVAL"),
        output_flush_interval=reader.duration("HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL"),
        output_flush_threshold=flush_threshold,
        local_store_path=store_path,
        spool_cap_bytes=spool_cap,
        terminal_reserve_bytes=terminal_reserve,
        store_retention=reader.duration("HOSTLINK_LOCAL_STORE_RETENTION"),
        task_queue_limit=reader.integer("HOSTLINK_TASK_QUEUE_LIMIT"),
        task_concurrency=reader.integer("HOSTLINK_TASK_CONCURRENCY"),
        task_timeout=reader.duration("HOSTLINK_TASK_TIMEOUT"),
        task_kill_grace=reader.duration("HOSTLINK_TASK_KILL_GRACE"),
        task_output_limit_bytes=reader.integer("HOSTLINK_TASK_OUTPUT_LIMIT_BYTES"),
        task_final_output_bytes=reader.integer("HOSTLINK_TASK_FINAL_OUTPUT_BYTES"),
        task_workdir=reader.optional("HOSTLINK_TASK_WORKDIR"),
        errors=tuple(reader.errors),
    )
