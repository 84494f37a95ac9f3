"""The table of every agent setting: :data:`SETTINGS`.

Each variable is described once here (name, meaning, default, range, option
name); the README table, the ``twistd hostlink`` options and the parsing in
:mod:`hostlink_tw.config` are all driven by it.  Public through
:mod:`hostlink_tw.config`; this module only holds the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SETTINGS", "SettingSpec", "spec"]

Kind = Literal[
    "flag",
    "url",
    "ws-url",
    "duration",
    "bytes",
    "positive",
    "path",
    "directory",
    "ca-file",
    "choice",
    "endpoint",
]
"""How a setting's value is parsed (see ``hostlink_tw._config_reader.Reader``)."""


@dataclass(frozen=True)
class SettingSpec:
    """One configuration variable, described once for code and documentation.

    :ivar env: the environment variable, e.g. ``HOSTLINK_WS_RECONNECT_MIN``.
    :ivar attribute: the ``Settings`` attribute it sets.
    :ivar meaning: a short description for the README table and ``--help``.
    :ivar default: the default as documentation text (``"1s"``,
        ``"disabled"``); for durations, integers, paths, URLs and choices it
        is also the value used.
    :ivar option: the long command-line option, without dashes.
    :ivar kind: how the value is parsed: ``"bytes"`` is a whole number
        clamped to its bounds; ``"positive"`` is a whole number where zero or
        less means the default (PROTOCOL §10's positive integer), clamped to
        its bounds when it has them.
    :ivar minimum: the lower bound as text (a Go duration or an integer), or
        ``""`` when unbounded.
    :ivar maximum: the upper bound, likewise.
    :ivar choices: the accepted values of a ``"choice"`` setting.
    """

    env: str
    attribute: str
    meaning: str
    default: str
    option: str
    kind: Kind
    minimum: str = ""
    maximum: str = ""
    choices: tuple[str, ...] = ()

    @property
    def range(self) -> str:
        """The accepted values as documentation text, or ``""`` when any is."""
        if self.minimum or self.maximum:
            return f"{self.minimum} \u2013 {self.maximum}"
        if self.choices:
            return ", ".join(self.choices)
        if self.kind == "positive":
            return "positive"
        return ""


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        env="HOSTLINK_WS_ENABLED",
        attribute="enabled",
        meaning="feature flag: true, 1 or yes (any case) enable the WebSocket uplink",
        default="disabled",
        option="enable",
        kind="flag",
    ),
    SettingSpec(
        env="SH_CONTROL_PLANE_URL",
        attribute="control_plane_url",
        meaning="control plane base URL; the gateway URL is derived from it",
        default="https://api.selfhost.dev",
        option="control-plane-url",
        kind="url",
    ),
    SettingSpec(
        env="HOSTLINK_WS_URL",
        attribute="ws_url",
        meaning="gateway URL override (ws:// or wss://), used as is",
        default="derived from SH_CONTROL_PLANE_URL",
        option="url",
        kind="ws-url",
    ),
    SettingSpec(
        env="HOSTLINK_WS_RECONNECT_MIN",
        attribute="reconnect_min",
        meaning="first reconnect delay",
        default="1s",
        option="reconnect-min",
        kind="duration",
        minimum="100ms",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_WS_RECONNECT_MAX",
        attribute="reconnect_max",
        meaning="reconnect delay ceiling (raised to the minimum if below it)",
        default="5m",
        option="reconnect-max",
        kind="duration",
        minimum="1s",
        maximum="1h",
    ),
    SettingSpec(
        env="HOSTLINK_WS_PING_INTERVAL",
        attribute="ping_interval",
        meaning="keepalive ping period",
        default="30s",
        option="ping-interval",
        kind="duration",
        minimum="5s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_WS_PONG_TIMEOUT",
        attribute="pong_timeout",
        meaning="how long to wait for a pong before reconnecting",
        default="10s",
        option="pong-timeout",
        kind="duration",
        minimum="1s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_WS_HELLO_TIMEOUT",
        attribute="hello_timeout",
        meaning="how long to wait for agent.hello_ack before reconnecting",
        default="30s",
        option="hello-timeout",
        kind="duration",
        minimum="1s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_WS_HANDSHAKE_TIMEOUT",
        attribute="handshake_timeout",
        meaning="limit on connecting, TLS and the WebSocket upgrade together",
        default="30s",
        option="handshake-timeout",
        kind="duration",
        minimum="1s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_WS_MAX_MESSAGE_BYTES",
        attribute="max_message_bytes",
        meaning="largest inbound message accepted, in bytes",
        default="1048576",
        option="max-message-bytes",
        kind="bytes",
        minimum="1024",
        maximum="67108864",
    ),
    SettingSpec(
        env="HOSTLINK_WS_CA_FILE",
        attribute="ca_file",
        meaning="PEM file of extra trusted CA certificates (must exist and parse when set)",
        default="unset (system CAs only)",
        option="ca-file",
        kind="ca-file",
    ),
    SettingSpec(
        env="HOSTLINK_WS_RECONNECT_JITTER",
        attribute="reconnect_jitter",
        meaning="reconnect jitter: go (uniform \u00b125 %, as the Go agent) or full",
        default="go",
        option="reconnect-jitter",
        kind="choice",
        choices=("go", "full"),
    ),
    SettingSpec(
        env="HOSTLINK_WS_STATUS_LISTEN",
        attribute="status_listen",
        meaning="Twisted endpoint for the local status page, e.g. tcp:9920:interface=127.0.0.1",
        default="unset (no status page)",
        option="status-listen",
        kind="endpoint",
    ),
    SettingSpec(
        env="HOSTLINK_STATE_PATH",
        attribute="state_path",
        meaning="state directory holding agent.json",
        default="/var/lib/hostlink",
        option="state-path",
        kind="path",
    ),
    SettingSpec(
        env="HOSTLINK_PRIVATE_KEY_PATH",
        attribute="private_key_path",
        meaning="agent RSA private key (PEM)",
        # Resolved by agent.identity.default_private_key_path (Go-layout fallback).
        default="HOSTLINK_STATE_PATH/agent.key",
        option="private-key-path",
        kind="path",
    ),
    # Phase 2 (PROTOCOL §10), in its order.
    SettingSpec(
        env="HOSTLINK_WS_DELIVERY_ENABLED",
        attribute="delivery_enabled",
        meaning="feature flag: true, 1 or yes (any case) accept task.deliver over the session",
        default="disabled",
        option="enable-delivery",
        kind="flag",
    ),
    SettingSpec(
        env="HOSTLINK_WS_RESULTS_ENABLED",
        attribute="results_enabled",
        meaning="feature flag: true, 1 or yes (any case) send task output and finals over "
        "the session",
        default="disabled",
        option="enable-results",
        kind="flag",
    ),
    SettingSpec(
        env="HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD",
        attribute="polling_fallback_threshold",
        meaning="how long the session may be down before HTTP task polling resumes",
        default="30s",
        option="polling-fallback",
        kind="duration",
        minimum="0s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_POLL_INTERVAL",
        attribute="task_poll_interval",
        meaning="HTTP task poll period, while polling runs",
        default="10s",
        option="task-poll-interval",
        kind="duration",
        minimum="10ms",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_HEARTBEAT_INTERVAL",
        attribute="heartbeat_interval",
        meaning="HTTP heartbeat period",
        default="5s",
        option="heartbeat-interval",
        kind="duration",
        minimum="10ms",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL",
        attribute="output_flush_interval",
        meaning="longest a task's pending output waits before it is sent as a chunk",
        default="100ms",
        option="output-flush-interval",
        kind="duration",
        minimum="1ms",
        maximum="5s",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD",
        attribute="output_flush_threshold",
        meaning="size of a task output chunk, in bytes",
        default="16384",
        option="output-flush-threshold",
        kind="positive",
        minimum="1024",
        maximum="1048576",
    ),
    SettingSpec(
        env="HOSTLINK_LOCAL_STORE_PATH",
        attribute="local_store_path",
        meaning="SQLite file of the local task store",
        # Resolved by load_settings: task_store.db inside the state directory.
        default="HOSTLINK_STATE_PATH/task_store.db",
        option="local-store-path",
        kind="path",
    ),
    SettingSpec(
        env="HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES",
        attribute="spool_cap_bytes",
        meaning="most bytes of unacked task messages kept in the store; at least the "
        "terminal reserve plus twice the output flush threshold",
        default="67108864",
        option="spool-cap-bytes",
        kind="positive",
    ),
    SettingSpec(
        env="HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES",
        attribute="terminal_reserve_bytes",
        meaning="part of the spool cap kept for finals, in bytes",
        default="1048576",
        option="terminal-reserve-bytes",
        kind="positive",
    ),
    SettingSpec(
        env="HOSTLINK_LOCAL_STORE_RETENTION",
        attribute="store_retention",
        meaning="how long ended attempts and their finals are kept to answer re-deliveries",
        default="24h",
        option="store-retention",
        kind="duration",
        minimum="1m",
        maximum="720h",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_QUEUE_LIMIT",
        attribute="task_queue_limit",
        meaning="most received, not yet started attempts; more are refused (queue_full)",
        default="16",
        option="task-queue-limit",
        kind="positive",
        minimum="1",
        maximum="10000",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_CONCURRENCY",
        attribute="task_concurrency",
        meaning="attempts run at the same time",
        default="1",
        option="task-concurrency",
        kind="positive",
        minimum="1",
        maximum="64",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_TIMEOUT",
        attribute="task_timeout",
        meaning="time limit of one task; 0s means none",
        default="0s",
        option="task-timeout",
        kind="duration",
        minimum="0s",
        maximum="168h",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_KILL_GRACE",
        attribute="task_kill_grace",
        meaning="wait between SIGTERM and SIGKILL when a task is stopped",
        default="5s",
        option="task-kill-grace",
        kind="duration",
        minimum="0s",
        maximum="5m",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_OUTPUT_LIMIT_BYTES",
        attribute="task_output_limit_bytes",
        meaning="most bytes kept of each output stream of a task; the rest is discarded",
        default="67108864",
        option="task-output-limit-bytes",
        kind="positive",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_FINAL_OUTPUT_BYTES",
        attribute="task_final_output_bytes",
        meaning="most bytes of each stream's text in a final (the last ones)",
        default="262144",
        option="task-final-output-bytes",
        kind="bytes",
        minimum="0",
        maximum="1048576",
    ),
    SettingSpec(
        env="HOSTLINK_TASK_WORKDIR",
        attribute="task_workdir",
        meaning="working directory of tasks (must be an existing directory when set)",
        default="unset (the agent's working directory)",
        option="task-workdir",
        kind="directory",
    ),
)

_SPECS: dict[str, SettingSpec] = {item.env: item for item in SETTINGS}


def spec(env: str) -> SettingSpec:
    """The spec of the variable *env* (a ``KeyError`` for an unknown one)."""
    return _SPECS[env]


def known(env: str) -> bool:
    """Whether *env* is one of :data:`SETTINGS`."""
    return env in _SPECS
