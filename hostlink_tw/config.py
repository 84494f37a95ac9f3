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
all driven by it.

Two kinds of environment value are refused rather than replaced, because
guessing would hide the mistake and leave an agent that never connects: a
``HOSTLINK_WS_CA_FILE`` that holds no readable certificate, and a gateway URL
(given or derived) that the client cannot dial.  ``load_settings`` does not
raise for them: they are kept in ``Settings.errors``, each one line, so that
an embedding application gets a ``Settings`` it can hand to
``HostlinkService`` (which logs them and stays ``misconfigured``), and
``twistd hostlink`` turns them into a usage error with ``Settings.check``.

Everything here is a plain function of its arguments: no reactor, and the only
I/O is reading the CA file named by ``HOSTLINK_WS_CA_FILE``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from twisted.logger import Logger

from hostlink_tw.duration import DurationError, format_duration, parse_go_duration
from hostlink_tw.safetext import redact_url

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

# Protocol §3, where the agent connects: the URL rules live in hostlink_tw.wire.urls.
from hostlink_tw.wire.urls import derive_ws_url, gateway_url_problem, split_url  # noqa: E402

# PROTOCOL §1 fixes the state file's name inside the state directory.
_AGENT_STATE_FILENAME = "agent.json"

_TRUE = frozenset({"true", "1", "yes"})
# Values that disable the flag without a warning.  Anything else outside _TRUE
# disables it too (PROTOCOL §4) but is reported, since "on" or "ture" was
# surely meant to enable it.
_FALSE = frozenset({"", "false", "0", "no", "off"})

_Kind = Literal[
    "flag", "url", "ws-url", "duration", "bytes", "path", "ca-file", "choice", "endpoint"
]
_Number = TypeVar("_Number", int, float)


class ConfigError(ValueError):
    """A setting that cannot be used.

    Raised by ``load_settings`` for any unusable command-line override, and
    by ``Settings.check`` for the environment values ``load_settings`` refused
    (see ``Settings.errors``).  The message is one line naming the option or
    variable, the value and what would be accepted.
    """


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
    kind: _Kind
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

_SPECS: dict[str, SettingSpec] = {spec.env: spec for spec in SETTINGS}


def _spec(env: str) -> SettingSpec:
    return _SPECS[env]


def _default_duration(env: str) -> float:
    return parse_go_duration(_spec(env).default)


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
    ``control_plane_url`` is given).
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
        of range warns and clamps.  ``HOSTLINK_WS_RECONNECT_MAX`` below
        ``HOSTLINK_WS_RECONNECT_MIN`` warns and is raised to it.
    :param overrides: raw option values keyed by environment variable name
        (see ``SettingSpec.env``); they win over ``environ`` and are read
        strictly.  An empty override means "unset" for the optional settings
        (``HOSTLINK_WS_URL``, ``HOSTLINK_WS_CA_FILE``,
        ``HOSTLINK_WS_STATUS_LISTEN``) and is an error for the others.
    :param log: where warnings go; each is a warning-level event with the
        fields ``variable``, ``value`` (the text given), ``used`` (the value used,
        as text) and ``reason``.

    ``HOSTLINK_WS_CA_FILE``, when set from either source, must be a readable
    file holding at least one PEM certificate, and the gateway URL
    (``HOSTLINK_WS_URL``, or the one derived from ``SH_CONTROL_PLANE_URL``)
    must pass ``gateway_url_problem``.  From an override, an unusable one
    raises ``ConfigError``; from the environment it is not replaced by a
    default either (ignoring a CA file would silently trust fewer CAs; a URL
    the client cannot dial leaves an agent that never connects): it is
    recorded in ``Settings.errors`` without raising and without logging, so
    that whoever uses the settings reports it once.  Call ``Settings.check``
    to raise them.

    ``HOSTLINK_WS_STATUS_LISTEN`` is kept as text: checking an endpoint
    description needs the reactor's endpoint parsers, which run where the
    status page is started.

    :raises ConfigError: for an unusable override or an unknown override name.
    """
    reader = _Reader(
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
        errors=tuple(reader.errors),
    )


class _Reader:
    """Reads one setting at a time, from an override (strict) or the environment.

    Each method takes the variable's name, looks its ``SettingSpec`` up for the
    default and bounds, and returns the typed value, warning or raising as the
    source demands.
    """

    def __init__(self, environ: Mapping[str, str], overrides: Mapping[str, str], log: Logger):
        unknown = sorted(set(overrides) - set(_SPECS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in overrides")
        self._environ = environ
        self._overrides = overrides
        self.log = log
        self.errors: list[str] = []

    def refuse(self, env: str, message: str) -> None:
        """An unusable value of *env*: raise for an override, record it otherwise."""
        spec = _spec(env)
        if env in self._overrides:
            raise ConfigError(f"--{spec.option} ({spec.env}): {message}")
        self.errors.append(f"{spec.env}: {message}")

    def check_gateway_url(self, env: str, url: str, given: str) -> None:
        """Refuse a gateway URL the client cannot dial, with the hint for *env*."""
        problem = gateway_url_problem(url)
        if problem is None:
            return
        if env == "HOSTLINK_WS_URL":
            hint = (
                "use the gateway's host name or address"
                if problem.startswith("names the host")
                else "use ws:// or wss://, or unset it and set SH_CONTROL_PLANE_URL to derive it"
            )
            self.refuse(env, f"{redact_url(url)!r} {problem}; {hint}")
        else:
            self.refuse(
                env,
                f"{redact_url(given)!r} gives the gateway URL {redact_url(url)!r}, which "
                f"{problem}; use an https:// or http:// URL with a host, or set HOSTLINK_WS_URL",
            )

    def _get(self, env: str, *kinds: _Kind) -> tuple[SettingSpec, str, bool]:
        """The spec, the raw text and whether it came from an override."""
        spec = _spec(env)
        # A mismatch is a bug in load_settings, not a user error.
        assert spec.kind in kinds, (env, spec.kind, kinds)
        if env in self._overrides:
            return spec, self._overrides[env], True
        return spec, self._environ.get(env, ""), False

    def _warn(self, spec: SettingSpec, value: str, used: str, reason: str) -> None:
        self.log.warn(
            "{variable}={value!r} {reason}; using {used}",
            variable=spec.env,
            value=value,
            used=used,
            reason=reason,
        )

    def flag(self, env: str) -> bool:
        """A feature flag: ``true``, ``1`` or ``yes``, in any case, enable it."""
        spec, raw, strict = self._get(env, "flag")
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word not in _FALSE or (strict and not word):
            if strict:
                accepted = "true, 1, yes, false, 0, no"
                raise _strict_error(spec, raw, "is not a yes/no value", accepted)
            self._warn(spec, raw, "disabled", "is not one of true, 1, yes")
        return False

    def duration(self, env: str) -> float:
        """A Go duration within the spec's bounds, in seconds."""
        spec, raw, strict = self._get(env, "duration")
        low, high = parse_go_duration(spec.minimum), parse_go_duration(spec.maximum)
        if raw == "" and not strict:
            return parse_go_duration(spec.default)
        try:
            value = parse_go_duration(raw)
        except DurationError as error:
            if strict:
                problem = "is not a Go duration such as 300ms, 1.5s or 2m"
                raise _strict_error(spec, raw, problem) from error
            self._warn(spec, raw, spec.default, "is not a Go duration such as 300ms, 1.5s or 2m")
            return parse_go_duration(spec.default)
        return self._bounded(spec, raw, strict, value, low, high)

    def integer(self, env: str) -> int:
        """A decimal integer within the spec's bounds."""
        spec, raw, strict = self._get(env, "bytes")
        low, high = int(spec.minimum), int(spec.maximum)
        if raw == "" and not strict:
            return int(spec.default)
        # int() alone would also take "1_000", " 5" and non-ASCII digits.
        if re.fullmatch(r"[-+]?[0-9]+", raw, re.ASCII) is None:
            if strict:
                raise _strict_error(spec, raw, "is not a whole number of bytes")
            self._warn(spec, raw, spec.default, "is not a whole number")
            return int(spec.default)
        return self._bounded(spec, raw, strict, int(raw), low, high)

    def _bounded(
        self,
        spec: SettingSpec,
        raw: str,
        strict: bool,
        value: _Number,
        low: _Number,
        high: _Number,
    ) -> _Number:
        """*value* if within [low, high]; otherwise clamp with a warning, or raise."""
        if low <= value <= high:
            return value
        if strict:
            raise _strict_error(spec, raw, "is out of range")
        bound, text = (low, spec.minimum) if value < low else (high, spec.maximum)
        self._warn(spec, raw, text, f"is outside {spec.range}")
        return bound

    def raise_to_minimum(
        self, env: str, value: float, minimum_env: str, minimum: float
    ) -> float:
        """Resolve a ceiling below its floor: raise it, or refuse an override."""
        spec, raw, strict = self._get(env, "duration")
        if strict:
            raise ConfigError(
                f"--{spec.option} ({spec.env}): {raw!r} is below "
                f"{minimum_env} ({_show_duration(minimum)}); "
                f"accepted: {_show_duration(minimum)} \u2013 {spec.maximum}"
            )
        self.log.warn(
            "{variable}={value!r} is below {minimum_variable}; using {used}",
            variable=spec.env,
            value=raw if raw else spec.default,
            used=_show_duration(minimum),
            reason=f"below {minimum_env}",
            minimum_variable=minimum_env,
        )
        return minimum

    def text(self, env: str) -> str:
        """A URL or path: empty means the default; an override must not be empty."""
        spec, raw, strict = self._get(env, "url", "path")
        if spec.kind == "url":
            # URLs are trimmed as HOSTLINK_WS_URL is (PROTOCOL §3); paths are taken as given.
            raw = raw.strip()
        if not strict:
            return raw or spec.default
        if not raw:
            raise _strict_error(spec, raw, "is empty")
        if spec.kind == "url":
            parts = split_url(raw)
            if parts is None or not parts.scheme or not parts.netloc:
                raise _strict_error(spec, raw, "is not an absolute URL", "e.g. https://cp.example")
        return raw

    def optional(self, env: str) -> str | None:
        """A setting that may be unset: the gateway URL, the CA file, the status endpoint."""
        spec, raw, _ = self._get(env, "ws-url", "ca-file", "endpoint")
        if spec.kind == "ca-file":
            # A path may legitimately start or end with a space: only empty is unset.
            if raw == "":
                return None
            problem = _ca_file_problem(raw)
            if problem is not None:
                self.refuse(env, problem)
            return raw
        value = raw.strip()
        # The gateway URL is checked by load_settings, given or derived alike.
        return value or None

    def choice(self, env: str) -> str:
        """One of the spec's choices, in any case; anything else means the default."""
        spec, raw, strict = self._get(env, "choice")
        word = raw.strip().lower()
        if word in spec.choices:
            return word
        if strict:
            raise _strict_error(spec, raw, "is not a known choice")
        if word:
            self._warn(spec, raw, spec.default, f"is not one of {spec.range}")
        return spec.default


def _show_duration(seconds: float) -> str:
    """Go's form without its trailing zero units: ``5m``, not ``5m0s``, as in ``SETTINGS``."""
    text = re.sub(r"([hm])0s$", r"\1", format_duration(seconds))
    return re.sub(r"h0m$", "h", text)


def _strict_error(spec: SettingSpec, raw: str, problem: str, accepted: str = "") -> ConfigError:
    """The one-line error for an unusable command-line value."""
    accepted = accepted or spec.range
    suffix = f"; accepted: {accepted}" if accepted else ""
    return ConfigError(f"--{spec.option} ({spec.env}): {raw!r} {problem}{suffix}")


def _ca_file_problem(path: str) -> str | None:
    """Why *path* cannot be used as a CA file, or ``None``."""
    # The client's own reader, so start-up refuses exactly what it would.
    from hostlink_tw.tls import TLSConfigError, read_ca_file

    try:
        read_ca_file(path)
    except TLSConfigError as error:
        return f"{error}; point it at a PEM file of CA certificates, or unset it"
    return None
