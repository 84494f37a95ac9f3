"""
``twistd hostlink``: command-line options and service construction.

Every setting of :data:`hostlink_tw.config.SETTINGS` is an option whose help
names its environment variable and default.  Options override the
environment; a bad value is a usage error with a one-line message (under
twistd: that line and a pointer to ``--help``, not the whole option list).

twistd stops on SIGTERM by stopping the services (the client sends its close
frame and waits a short bound for the handshake) and then, as Twisted does,
re-raises the signal: the exit status is "killed by SIGTERM", which systemd
counts as a clean stop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from hostlink_tw import __version__
from hostlink_tw._twistd import PluginOptions
from hostlink_tw.config import (
    SETTINGS,
    ConfigError,
    Settings,
    SettingSpec,
    check_server_endpoint,
    load_settings,
)

__all__ = ["Options", "SettingError", "makeService"]

# A flag takes no value, so its help says what it does; the setting's
# meaning describes the values its environment variable accepts.
_FLAG_HELP = {
    "enable": "turn the WebSocket uplink on",
    "enable-delivery": "accept task.deliver over the session",
    "enable-results": "send task output and finals over the session",
}


class SettingError(usage.UsageError):
    """A setting's value (from an option or the environment) is unusable."""


def _help(meaning: str, env: str, default: str, accepted: str) -> str:
    text = f"{meaning} [env {env}; default {default}"
    if accepted:
        text += f"; {accepted}"
    return text + "]"


def _flag_help(spec: SettingSpec) -> str:
    what = _FLAG_HELP.get(spec.option)
    if what is None:
        return _help(spec.meaning, spec.env, spec.default, spec.range)
    return f"{what} [env {spec.env}=true (also 1 or yes, any case); default {spec.default}]"


class Options(PluginOptions):
    """Options of ``twistd hostlink``, generated from the settings table."""

    command = "hostlink"
    listed = "setting"
    # Every usage error is one line and a pointer to --help (unknown options
    # too, as for the control plane): the option list buried the error.

    synopsis = "[options]"
    longdesc = (
        f"hostlink_tw {__version__}: "
        "keep this host's authenticated WebSocket session to its Hostlink control plane. "
        "Each option overrides the environment variable named in its help."
    )
    optFlags = [[spec.option, None, _flag_help(spec)] for spec in SETTINGS if spec.kind == "flag"]
    optParameters = [
        [spec.option, None, None, _help(spec.meaning, spec.env, spec.default, spec.range)]
        for spec in SETTINGS
        if spec.kind != "flag"
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.environ = os.environ if environ is None else environ
        self.settings: Settings | None = None

    def overrides(self) -> dict[str, str]:
        """The options given, keyed by the environment variable they override."""
        given: dict[str, str] = {}
        for spec in SETTINGS:
            value = self[spec.option]
            if spec.kind == "flag":
                if value:
                    given[spec.env] = "true"
            elif value is not None:
                given[spec.env] = value
        return given

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self.environ, self.overrides())
            self.settings.check()  # refused environment values: usage errors here too
        except ConfigError as e:
            raise SettingError(str(e)) from None
        if self.settings.status_listen:
            try:
                check_server_endpoint(self.settings.status_listen)
            except ConfigError as e:
                raise SettingError(
                    f"--status-listen (HOSTLINK_WS_STATUS_LISTEN): {e}"
                ) from None


def makeService(options: Options) -> IService:
    """The HostlinkService for ``options`` (imported late: twistd --help stays fast)."""
    from hostlink_tw.service import HostlinkService

    settings = options.settings
    if settings is None:  # parseOptions() was not called
        raise usage.UsageError("options were not parsed")
    service: Any = HostlinkService(settings)
    return service  # type: ignore[no-any-return]
