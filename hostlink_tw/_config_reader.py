"""Reading one setting from an override (strictly) or the environment (leniently).

The rules are those of :mod:`hostlink_tw.config`'s docstring: PROTOCOL §4 for
the environment (empty means the default, unparsable warns and uses the
default, out of range warns and clamps) and a one-line :class:`ConfigError`
for a command-line value that cannot be used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TypeVar

from twisted.logger import Logger

from hostlink_tw._config_table import Kind, SettingSpec, known
from hostlink_tw._config_table import spec as _spec
from hostlink_tw.duration import DurationError, format_duration, parse_go_duration
from hostlink_tw.safetext import redact_url
from hostlink_tw.wire.urls import gateway_url_problem, split_url

__all__ = ["ConfigError", "Reader", "show_duration"]

_TRUE = frozenset({"true", "1", "yes"})
# Values that disable the flag without a warning.  Anything else outside _TRUE
# disables it too (PROTOCOL §4) but is reported, since "on" or "ture" was
# surely meant to enable it.
_FALSE = frozenset({"", "false", "0", "no", "off"})

_Number = TypeVar("_Number", int, float)

# The Go agent reads a positive integer as an int64.
_INT64_MAX = (1 << 63) - 1


class ConfigError(ValueError):
    """A setting that cannot be used.

    Raised by ``load_settings`` for any unusable command-line override, and
    by ``Settings.check`` for the environment values ``load_settings`` refused
    (see ``Settings.errors``).  The message is one line naming the option or
    variable, the value and what would be accepted.
    """


class Reader:
    """Reads one setting at a time, from an override (strict) or the environment.

    Each method takes the variable's name, looks its ``SettingSpec`` up for the
    default and bounds, and returns the typed value, warning or raising as the
    source demands.
    """

    def __init__(self, environ: Mapping[str, str], overrides: Mapping[str, str], log: Logger):
        unknown = sorted(name for name in overrides if not known(name))
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

    def _get(self, env: str, *kinds: Kind) -> tuple[SettingSpec, str, bool]:
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
        """A decimal integer within the spec's bounds.

        A ``"positive"`` setting follows PROTOCOL §10: zero or less warns and
        means the default, as past the 64-bit range when it has no maximum
        (the Go agent's ``strconv.ParseInt`` refuses it).
        """
        spec, raw, strict = self._get(env, "bytes", "positive")
        if raw == "" and not strict:
            return int(spec.default)
        value = _whole_number(raw)
        if value is None:
            if strict:
                noun = "whole number of bytes" if spec.kind == "bytes" else "whole number"
                raise _strict_error(spec, raw, f"is not a {noun}", _accepted(spec))
            self._warn(spec, raw, spec.default, "is not a whole number")
            return int(spec.default)
        if spec.kind == "positive" and not spec.maximum and value > _INT64_MAX:
            if strict:
                raise _strict_error(spec, raw, "is out of range", _accepted(spec))
            self._warn(spec, raw, spec.default, f"is larger than {_INT64_MAX}")
            return int(spec.default)
        if spec.kind == "positive" and value <= 0:
            if strict:
                raise _strict_error(spec, raw, "is not a positive whole number", _accepted(spec))
            self._warn(spec, raw, spec.default, "is not a positive whole number")
            return int(spec.default)
        if not spec.maximum:
            return value
        return self._bounded(spec, raw, strict, value, int(spec.minimum), int(spec.maximum))

    def spool(self, cap: int, reserve: int, threshold: int) -> tuple[int, int]:
        """The spool cap and terminal reserve, checked against each other.

        PROTOCOL §10: the reserve fits in the cap, and the cap leaves room
        for two output chunks beside it.  When they do not, the environment's
        pair is replaced by both defaults with one warning (the defaults
        always fit, the threshold being at most 1 MiB); an option in the
        mix is a ``ConfigError`` instead.
        """
        need = reserve + 2 * threshold
        if cap >= need:
            return cap, reserve
        names = (
            "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES",
            "HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES",
            "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD",
        )
        cap_spec, reserve_spec = _spec(names[0]), _spec(names[1])
        problem = (
            f"{cap_spec.env} ({cap}) is below {reserve_spec.env} ({reserve}) plus twice "
            f"{names[2]} ({threshold}) = {need}"
        )
        for env in names:
            if env in self._overrides:
                option = _spec(env).option
                raise ConfigError(f"--{option} ({env}): {problem}")
        used = f"{cap_spec.default} and {reserve_spec.default}"
        self.log.warn(
            "{problem}; using the defaults {used} for {variable} and {reserve_variable}",
            problem=problem,
            variable=cap_spec.env,
            value=self._environ.get(cap_spec.env, "") or cap_spec.default,
            used=used,
            reason=f"below {reserve_spec.env} plus twice {names[2]}",
            reserve_variable=reserve_spec.env,
        )
        return int(cap_spec.default), int(reserve_spec.default)

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
                f"{minimum_env} ({show_duration(minimum)}); "
                f"accepted: {show_duration(minimum)} \u2013 {spec.maximum}"
            )
        self.log.warn(
            "{variable}={value!r} is below {minimum_variable}; using {used}",
            variable=spec.env,
            value=raw if raw else spec.default,
            used=show_duration(minimum),
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
        """A setting that may be unset: the gateway URL, the CA file, the status
        endpoint, the task working directory."""
        spec, raw, _ = self._get(env, "ws-url", "ca-file", "endpoint", "directory")
        if spec.kind in ("ca-file", "directory"):
            # A path may legitimately start or end with a space: only empty is unset.
            if raw == "":
                return None
            check = _ca_file_problem if spec.kind == "ca-file" else _directory_problem
            problem = check(raw)
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


def show_duration(seconds: float) -> str:
    """Go's form without its trailing zero units: ``5m``, not ``5m0s``, as in ``SETTINGS``."""
    text = re.sub(r"([hm])0s$", r"\1", format_duration(seconds))
    return re.sub(r"h0m$", "h", text)


def _whole_number(raw: str) -> int | None:
    """An optionally signed run of ASCII digits as an int, or ``None``.

    ``int()`` alone would also take ``"1_000"``, ``" 5"`` and non-ASCII
    digits, and raises past 4300 digits: a number longer than any bound
    stands for one just past the 64-bit range, with its sign.
    """
    match = re.fullmatch(r"([-+]?)0*([0-9]+)", raw, re.ASCII)
    if match is None:
        return None
    sign, digits = match.groups()
    value = int(digits) if len(digits) <= 20 else 1 << 64
    return -value if sign == "-" else value


def _accepted(spec: SettingSpec) -> str:
    """What a whole-number setting accepts, for its strict error."""
    if spec.maximum:
        return spec.range
    return f"1 \u2013 {_INT64_MAX}"


def _strict_error(spec: SettingSpec, raw: str, problem: str, accepted: str = "") -> ConfigError:
    """The one-line error for an unusable command-line value."""
    accepted = accepted or spec.range
    suffix = f"; accepted: {accepted}" if accepted else ""
    return ConfigError(f"--{spec.option} ({spec.env}): {raw!r} {problem}{suffix}")


def _directory_problem(path: str) -> str | None:
    """Why tasks cannot run in *path*, or ``None``."""
    if not os.path.isdir(path):
        problem = "is not an existing directory"
    elif not os.access(path, os.X_OK):
        problem = "is a directory this agent cannot enter"
    else:
        return None
    return f"{path!r} {problem}; create it, or unset it to run tasks in the agent's directory"


def _ca_file_problem(path: str) -> str | None:
    """Why *path* cannot be used as a CA file, or ``None``."""
    # The client's own reader, so start-up refuses exactly what it would.
    from hostlink_tw.tls import TLSConfigError, read_ca_file

    try:
        read_ca_file(path)
    except TLSConfigError as error:
        return f"{error}; point it at a PEM file of CA certificates, or unset it"
    return None
