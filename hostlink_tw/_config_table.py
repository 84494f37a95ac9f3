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
    "flag", "url", "ws-url", "duration", "bytes", "path", "ca-file", "choice", "endpoint"
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
    :ivar kind: how the value is parsed.
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
)

_SPECS: dict[str, SettingSpec] = {item.env: item for item in SETTINGS}


def spec(env: str) -> SettingSpec:
    """The spec of the variable *env* (a ``KeyError`` for an unknown one)."""
    return _SPECS[env]


def known(env: str) -> bool:
    """Whether *env* is one of :data:`SETTINGS`."""
    return env in _SPECS
