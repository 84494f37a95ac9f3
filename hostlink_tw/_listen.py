"""Why a server endpoint could not listen, in one line with what to do (agent and control plane)."""

from __future__ import annotations

import errno
import ipaddress
import os

from twisted.internet.error import CannotListenError

__all__ = ["cannot_listen", "listen_failure"]

#: What a user can put in an endpoint; 0 (any free port) is not a mistake.
_PORTS = "ports are 1-65535"


def listen_failure(error: BaseException | None, setting: str) -> str:
    """
    Why an endpoint could not listen, and what to do, in one line: for
    :class:`CannotListenError` (:func:`cannot_listen`), a port out of range
    (``OverflowError``/``ValueError`` from ``bind``), a unix socket path that
    cannot be created (``OSError``, e.g. its directory is missing), and
    anything else as ``Type: message``.

    :param error: a failure's ``value`` (``None`` only if it has none).

    :param setting: where the operator chooses the endpoint, e.g.
        ``--listen`` or ``HOSTLINK_WS_STATUS_LISTEN``.
    """
    if isinstance(error, CannotListenError):
        return cannot_listen(error, setting)
    if isinstance(error, OverflowError) or (
        isinstance(error, ValueError) and "port" in str(error).lower()
    ):
        # bind() refuses 65536 and up, and negative numbers, this way.
        return f"port out of range ({_PORTS}): choose another port with {setting}"
    if isinstance(error, OSError):
        # A unix socket's lock file or socket: the path is the last file
        # named (a lock file is created as a symlink *to* the process id).
        path = error.filename2 if error.filename2 is not None else error.filename
        if isinstance(path, (str, bytes)):
            return _path_problem(_text(path), error, setting)
        return f"{error.strerror or error}: check the endpoint in {setting}"
    # One line even if the message has several.
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def cannot_listen(error: CannotListenError, setting: str) -> str:
    """
    Why a port cannot be bound, and what to do, in a few words.

    :param setting: where the operator chooses the port, e.g. ``--listen``
        or ``HOSTLINK_WS_STATUS_LISTEN``.
    """
    cause = error.socketError
    code = getattr(cause, "errno", None)
    port = error.port
    if isinstance(port, (str, bytes)):  # a unix socket's path
        if isinstance(cause, OSError):
            return _path_problem(_text(port), cause, setting)
        return f"cannot listen on {_text(port)}: {cause}"
    if code == errno.EADDRINUSE:
        return (
            f"port {port} is already in use by another process: stop that process, "
            f"or choose another port with {setting}"
        )
    if code == errno.EACCES:
        return (
            f"permission denied for port {port} (ports below 1024 need root or "
            f"CAP_NET_BIND_SERVICE): choose another port with {setting}"
        )
    if code == errno.EADDRNOTAVAIL:
        return (
            f"address {error.interface or '?'} is not on this host: "
            f"use one of its addresses in {setting}"
        )
    reason = getattr(cause, "strerror", None) or str(cause)
    return f"cannot listen on port {port}: {reason}"


def _path_problem(path: str, error: OSError, setting: str) -> str:
    directory = os.path.dirname(path) or "."
    if error.errno == errno.ENOENT and not os.path.isdir(directory):
        return (
            f"directory {directory} does not exist: create it, "
            f"or choose another path with {setting}"
        )
    if error.errno == errno.EADDRINUSE:
        return (
            f"{path} is already in use by another process: stop that process, "
            f"or choose another path with {setting}"
        )
    reason = error.strerror or str(error)
    return f"cannot create {path}: {reason}: choose another path with {setting}"


def _text(path: str | bytes) -> str:
    return os.fsdecode(path)


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address (a zone suffix allowed): where a
    listener is reachable from this host only."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
