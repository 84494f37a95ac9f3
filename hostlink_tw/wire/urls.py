"""
Where the agent connects (protocol §3): the gateway URL derived from the
control plane's base URL, and what makes a gateway URL one the client can
dial.  Parsing follows Go's ``url.Parse`` where it refuses input.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

from twisted.logger import Logger

from hostlink_tw.safetext import redact_url
from hostlink_tw.wire.vocabulary import GATEWAY_PATH

__all__ = ["derive_ws_url", "gateway_url_problem", "split_url"]

_log = Logger(namespace="hostlink_tw.config")


def derive_ws_url(control_plane_url: str, log: Logger | None = None) -> str:
    """The gateway URL for a control plane base URL (PROTOCOL §3).

    The scheme ``https`` becomes ``wss`` and ``http`` becomes ``ws`` (any other
    scheme is kept), and ``/api/v1/agents/ws`` is joined onto the existing
    path, whatever trailing slashes it has::

        https://api.selfhost.dev      -> wss://api.selfhost.dev/api/v1/agents/ws
        https://cp.example/base/      -> wss://cp.example/base/api/v1/agents/ws
        http://cp.example:8080?x=1#y  -> ws://cp.example:8080/api/v1/agents/ws?x=1

    A query is kept, after the new path: a deployment behind a gateway that
    routes on it needs it on the upgrade too.  A fragment is dropped: RFC 6455
    forbids fragments in WebSocket URLs.

    A URL that cannot be parsed (bad brackets, a port that is not a number
    from 0 to 65535, a bad ``%`` escape, whitespace or control characters) is
    logged as a warning and the path is appended to it as text (PROTOCOL §3),
    after dropping its trailing slashes.
    """
    parts = split_url(control_plane_url)
    if parts is None:
        used = control_plane_url.rstrip("/") + GATEWAY_PATH
        # Redacted: an operator's URL may carry a password or a token, and
        # escaped: it may carry the control characters that made it unparsable.
        (log or _log).warn(
            "SH_CONTROL_PLANE_URL='{value}' cannot be parsed as a URL; "
            "using '{used}' as the WebSocket URL",
            variable="SH_CONTROL_PLANE_URL",
            value=redact_url(control_plane_url),
            used=redact_url(used),
            reason="unparsable URL",
        )
        return used
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + GATEWAY_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


_BAD_URL_CHARACTERS = re.compile(r"[\x00-\x20\x7f]")
_BAD_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def split_url(text: str) -> SplitResult | None:
    """Split *text* as a URL, or return ``None`` where Go's parser would fail."""
    if _BAD_URL_CHARACTERS.search(text) or _BAD_PERCENT_ESCAPE.search(text):
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        return None
    return parts


def gateway_url_problem(url: str) -> str | None:
    """Why the client could not dial the gateway URL *url*, or ``None`` if it can.

    Mirrors what Autobahn's ``parse_url`` and our client need: a parsable
    URL, scheme ``ws`` or ``wss``, a host, a port from 1 to 65535 and no
    fragment.  A host named ``unix`` (in any case) is refused too: Autobahn
    takes ``ws://unix:/path`` for a UNIX socket, not a host.
    """
    parts = split_url(url)
    if parts is None:
        try:
            raw = urlsplit(url)
        except ValueError:
            return "cannot be parsed as a URL"
        try:
            raw.port  # noqa: B018 - raises for a port out of range
        except ValueError:
            return "cannot be parsed as a URL: its port is not a number from 1 to 65535"
        return "cannot be parsed as a URL"
    if parts.scheme not in ("ws", "wss"):
        return "is not a ws:// or wss:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.hostname == "unix":
        return "names the host 'unix', which Autobahn takes for a UNIX socket path, not a host"
    if parts.port == 0:
        return "has port 0"
    if parts.fragment:
        # "(not shown)": messages show URLs redacted, without their fragment.
        return "has a #fragment (not shown), which WebSocket URLs cannot have"
    return None
