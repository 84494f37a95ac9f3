"""Why a server endpoint could not listen, in one line with what to do (agent and control plane)."""

from __future__ import annotations

import errno

from twisted.internet.error import CannotListenError

__all__ = ["cannot_listen"]


def cannot_listen(error: CannotListenError, setting: str) -> str:
    """
    Why a port cannot be bound, and what to do, in a few words.

    :param setting: where the operator chooses the port, e.g. ``--listen``
        or ``HOSTLINK_WS_STATUS_LISTEN``.
    """
    cause = error.socketError
    code = getattr(cause, "errno", None)
    port = error.port
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
