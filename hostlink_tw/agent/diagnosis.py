"""
Why a connection attempt ended, and what to tell the operator.

Pure functions, no reactor: the hint for a refused upgrade (its HTTP status,
its de-chunked and shortened body), and the classified cause of a failed
connect (the name does not resolve, nothing listens, no answer, a plain port
where TLS was expected) with what to check.  The client uses them for its
log lines; :class:`Escalation` decides when a run of failed attempts
deserves a warning, once per cause.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.python.failure import Failure

from hostlink_tw.agent.events import EndReason
from hostlink_tw.agent.session import FRAME_PREVIEW_CHARS
from hostlink_tw.safetext import escape_control
from hostlink_tw.tls import describe_tls_failure, is_tls_failure
from hostlink_tw.wire.vocabulary import GATEWAY_PATH

__all__ = [
    "ESCALATE_AFTER_ATTEMPTS",
    "ESCALATE_AFTER_SECONDS",
    "Cause",
    "Escalation",
    "REPLACED_SESSIONS",
    "REPLACED_WINDOW",
    "Replacements",
    "classify",
    "end_reason",
    "dechunk",
    "describe_reason",
    "refusal_hint",
    "shorten_body",
]

_HINTS = {
    401: (
        "the control plane did not accept the signed upgrade: check that this host's "
        "clock is right (timestamps more than 300 s off are refused) and that the agent's "
        "public key is registered for this agent id"
    ),
    403: "the control plane refuses this agent: is it registered and allowed?",
    404: (
        f"nothing answers at this URL's path: the gateway is {GATEWAY_PATH} under the "
        "control plane URL (check HOSTLINK_WS_URL, or set SH_CONTROL_PLANE_URL and let "
        "the agent derive it)"
    ),
}
_HINT_5XX = "the control plane has a problem; retrying with backoff"

#: Consecutive failed attempts before the cause is worth a warning.
ESCALATE_AFTER_ATTEMPTS = 3
#: ... or this long without a session, whichever comes first.
ESCALATE_AFTER_SECONDS = 60.0

_BODY_CHARS = 200

#: Sessions ended by ``4001 replaced`` within :data:`REPLACED_WINDOW` seconds
#: that mean another process or host uses this agent's identity.
REPLACED_SESSIONS = 3
REPLACED_WINDOW = 60.0


# A 401's body, when the control plane says which check failed: the hint for that one.
_401_HINTS = (
    ("unknown agent", "the control plane does not know this agent id: add the agent's public "
                      "key to it ('hostlink-tw identity show' prints its agents-file line)"),
    ("invalid signature", "the control plane has another public key for this agent id: "
                          "register this agent's key ('hostlink-tw identity show')"),
)


def refusal_hint(status: int, body: str = "") -> str:
    """What an operator should check for an upgrade refused with ``status`` (and ``body``)."""
    if status == 401:
        for needle, hint in _401_HINTS:
            if needle in body.lower():
                return hint
    if status in _HINTS:
        return _HINTS[status]
    if 500 <= status <= 599:
        return _HINT_5XX
    return "retrying with backoff"


def dechunk(body: bytes) -> bytes:
    """
    The data of an HTTP/1.1 chunked body, as far as it is there and well
    formed (a refusal body is shown, never trusted).
    """
    out = bytearray()
    rest = body
    while rest:
        line, sep, after = rest.partition(b"\r\n")
        if not sep:
            break
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size <= 0:
            break
        out += after[:size]
        rest = after[size + 2 :]
    return bytes(out)


def shorten_body(headers: Mapping[str, str], body: bytes) -> str:
    """A refusal body for one log line: de-chunked, tags and runs of white space removed."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = dechunk(body)
    text = body[: _BODY_CHARS * 8].decode("utf-8", "replace")
    text = re.sub(r"<[^>]{0,200}>", " ", text)
    text = " ".join(text.split())
    return text[:_BODY_CHARS] + ("…" if len(text) > _BODY_CHARS else "")


def describe_reason(reason: Failure) -> str:
    """How a TCP connection or connect ended, in a few words."""
    value = reason.value
    if isinstance(value, ConnectionDone):
        return "connection closed"
    if isinstance(value, ConnectError):
        # e.g. "Connection was refused by other side: 111: Connection refused."
        return str(value).strip() or type(value).__name__
    return f"{type(value).__name__}: {value}".strip()


def end_reason(
    proto: Any, noted: EndReason | None, reason: Failure, tls_host: str,
    refused_status: int | None, *, stopping: bool,
) -> tuple[EndReason, bool, bool]:
    """
    Why an attempt ended: the reason noted while it ran, else what the
    transport's end says (TLS, the peer's close frame, lost, never connected).

    :param proto: the attempt's protocol when its WebSocket opened, else None.
    :returns: the :class:`EndReason` (with the close code and HTTP status),
        whether the close handshake finished, and whether TLS failed.
    """
    code: int | None = None
    clean = False
    remote = getattr(proto, "remoteCloseCode", None)
    if proto is not None:
        clean = bool(getattr(proto, "wasClean", False))
        code = remote if remote is not None else getattr(proto, "localCloseCode", None)
    tls = is_tls_failure(reason)
    end = noted
    if end is None:
        if tls:
            end = EndReason("tls", f"TLS failed: {describe_tls_failure(reason, tls_host)}")
        elif remote is not None and not proto.closedByMe:
            text = escape_control(proto.remoteCloseReason or "", FRAME_PREVIEW_CHARS)
            end = EndReason(
                "closed_by_peer", f"closed by control plane: code={remote} reason={text}".strip()
            )
        elif proto is not None:
            end = EndReason("lost", f"connection lost: {describe_reason(reason)}")
        else:
            end = EndReason("connect_failed", f"connection failed: {describe_reason(reason)}")
    return EndReason(end.kind, end.text, code, refused_status, not stopping), clean, tls


class Replacements:
    """
    Sessions the control plane replaced (close 4001) because the same agent
    id connected again: :data:`REPLACED_SESSIONS` of them within
    :data:`REPLACED_WINDOW` seconds mean another process or host uses this
    identity.
    """

    def __init__(self) -> None:
        self._at: deque[float] = deque(maxlen=REPLACED_SESSIONS * 4)
        self._warned = False

    def streak(self, now: float) -> bool:
        """Whether sessions are being replaced again and again now."""
        while self._at and now - self._at[0] > REPLACED_WINDOW:
            self._at.popleft()
        return len(self._at) >= REPLACED_SESSIONS

    def replaced(self, now: float) -> bool:
        """One more replaced session: whether to warn (once per streak)."""
        self._at.append(now)
        if self.streak(now) and not self._warned:
            self._warned = True
            return True
        return False

    def other_end(self, now: float) -> None:
        """A session ended otherwise: a later streak is news again."""
        if not self.streak(now):
            self._warned = False

    @property
    def count(self) -> int:
        """Replaced sessions within the window, as of the last look."""
        return len(self._at)


@dataclass(frozen=True)
class Cause:
    """The classified cause of a failed connect, and what to check."""

    kind: str
    hint: str


# OpenSSL's words when the other side answers a ClientHello with plain text.
_PLAIN_PORT = ("wrong version number", "http request", "packet length too long",
               "unknown protocol", "record layer failure")


def classify(value: BaseException | None, end_kind: str, end_text: str, host: str,
             port: int, *, secure: bool = False, tcp_connected: bool = False) -> Cause:
    """
    The cause of an attempt that ended without a session, for the escalated
    warning: the exception that ended it when there is one, else the end
    reason's kind.

    :param secure: the URL is ``wss://``.
    :param tcp_connected: TCP was up before the attempt ended (so it ended in
        TLS or the upgrade).
    """
    where = f"{host}:{port}"
    if isinstance(value, DNSLookupError):
        return Cause("dns", f"the host name {host} does not resolve: check the URL "
                            "(HOSTLINK_WS_URL or SH_CONTROL_PLANE_URL) and this host's DNS")
    if isinstance(value, ConnectionRefusedError):
        return Cause("refused", f"nothing listens on {where}: check the port in the URL "
                                "and that the control plane runs")
    if isinstance(value, (TimeoutError, TCPTimedOutError)) or end_kind == "timeout":
        return Cause("timeout", f"no answer from {where} in time: a firewall or a proxy "
                                "may drop the traffic")
    if isinstance(value, NoRouteError):
        return Cause("unreachable", f"no route to {host}: check this host's network")
    if end_kind == "tls" and any(w in end_text.lower() for w in _PLAIN_PORT):
        return Cause("plain_port", f"{where} does not speak TLS: use ws:// for a plain "
                                   "port, or the control plane's TLS port for wss://")
    if end_kind == "tls":
        # Logged with its reason at error level on every attempt already.
        return Cause("tls", "")
    if end_kind == "connect_failed" and tcp_connected:
        if secure:
            return Cause("plain_port", f"{where} accepted TCP but no TLS handshake finished: "
                                       "if it is a plain port, use ws://")
        return Cause("tls_port", f"{where} closed the connection before answering the "
                                 "upgrade: if it expects TLS, use wss://")
    if end_kind == "refused":
        return Cause("refused_upgrade", "the control plane refuses the upgrade (see above)")
    return Cause(end_kind, "retrying with backoff")


class Escalation:
    """
    When failed attempts deserve a warning: after
    :data:`ESCALATE_AFTER_ATTEMPTS` consecutive ones or
    :data:`ESCALATE_AFTER_SECONDS` without a session, once per cause; quiet
    again until the cause changes or a session becomes active.
    """

    def __init__(self) -> None:
        self._since: float | None = None
        self._warned: str | None = None

    def session_active(self) -> None:
        """A session is up: the next failure starts a new run."""
        self._since = None
        self._warned = None

    def failed(self, cause: Cause, attempts: int, now: float) -> bool:
        """One more failed attempt: whether to warn about ``cause`` now."""
        if self._since is None:
            self._since = now
        due = attempts >= ESCALATE_AFTER_ATTEMPTS or now - self._since >= ESCALATE_AFTER_SECONDS
        if not due or cause.kind == self._warned:
            return False
        self._warned = cause.kind
        return True

    def failing_for(self, now: float) -> float:
        """Seconds since the first failure of this run."""
        return 0.0 if self._since is None else now - self._since
