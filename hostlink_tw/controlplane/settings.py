"""
The control plane's limits and timings, with their defaults, checked once.

:class:`ControlPlaneSettings` is what :class:`~hostlink_tw.controlplane.ControlPlane`
builds from its keyword arguments and hands to the gateway, the connection
tracker, the upgrade authenticator and the task service; ``twistd hostlink-controlplane``
(:mod:`hostlink_tw.controlplane.tap`) shows the same defaults in its help.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_DELIVERY_WINDOW",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_COMMAND_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_PENDING_CONNECTIONS",
    "DEFAULT_MAX_PENDING_TASKS",
    "DEFAULT_MAX_SEND_BUFFER_BYTES",
    "DEFAULT_MAX_SKEW",
    "DEFAULT_NONCE_CACHE_SIZE",
    "DEFAULT_NONCE_QUOTA",
    "DEFAULT_OPERATOR_LISTEN",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RELOAD_INTERVAL",
    "ControlPlaneSettings",
]

DEFAULT_MAX_SKEW = 300.0
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_PENDING_CONNECTIONS = 256
DEFAULT_NONCE_CACHE_SIZE = 100_000
#: Bytes that may wait in one connection's send buffers (the peer not
#: reading) before it is aborted: room for several of the largest messages.
DEFAULT_MAX_SEND_BUFFER_BYTES = 4 << 20
#: Accepted upgrades one agent may have inside the replay window (±max_skew):
#: far above what a reconnecting agent needs (its backoff allows about one a
#: second at worst), far below the cache size, so one agent cannot fill it.
DEFAULT_NONCE_QUOTA = 1000
DEFAULT_RELOAD_INTERVAL = 1.0
#: Unfinished tasks (pending, delivered, received, running) one agent may have.
DEFAULT_MAX_PENDING_TASKS = 1000
#: The longest command, in UTF-8 bytes: far above a shell line, far below a frame.
DEFAULT_MAX_COMMAND_BYTES = 64 << 10
#: Output stored per attempt and stream, the agent's own per-stream limit
#: (``HOSTLINK_TASK_OUTPUT_LIMIT_BYTES``): by default nothing it sends is cut.
DEFAULT_MAX_OUTPUT_BYTES = 64 << 20
#: Attempts delivered to one agent and not started yet, at most: the agent's
#: own queue limit (``HOSTLINK_TASK_QUEUE_LIMIT``), so it never answers ``queue_full``.
DEFAULT_DELIVERY_WINDOW = 16
DEFAULT_LISTEN = "tcp:0:interface=127.0.0.1"
#: In process, the operator listener (``/status``) is opened only on request,
#: on an ephemeral loopback port by default.
DEFAULT_OPERATOR_LISTEN = "tcp:0:interface=127.0.0.1"


@dataclass(frozen=True)
class ControlPlaneSettings:
    """
    The limits and timings of one control plane (see the keyword arguments
    of :class:`~hostlink_tw.controlplane.ControlPlane` for each).

    :raises ValueError: A duration is negative or a count is not a positive
        integer; the message names the option.
    """

    max_skew: float = DEFAULT_MAX_SKEW
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS
    nonce_cache_size: int = DEFAULT_NONCE_CACHE_SIZE
    nonce_quota: int = DEFAULT_NONCE_QUOTA
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    max_send_buffer_bytes: int = DEFAULT_MAX_SEND_BUFFER_BYTES
    delivery_enabled: bool = True
    max_pending_tasks: int = DEFAULT_MAX_PENDING_TASKS
    max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    delivery_window: int = DEFAULT_DELIVERY_WINDOW

    def __post_init__(self) -> None:
        for name, value in (
            ("max_skew", self.max_skew),
            ("handshake_timeout", self.handshake_timeout),
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("reload_interval", self.reload_interval),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        for name, count in (
            ("max_message_bytes", self.max_message_bytes),
            ("max_connections", self.max_connections),
            ("max_pending_connections", self.max_pending_connections),
            ("nonce_cache_size", self.nonce_cache_size),
            ("nonce_quota", self.nonce_quota),
            ("max_send_buffer_bytes", self.max_send_buffer_bytes),
            ("max_pending_tasks", self.max_pending_tasks),
            ("max_command_bytes", self.max_command_bytes),
            ("max_output_bytes", self.max_output_bytes),
            ("delivery_window", self.delivery_window),
        ):
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive integer, not {count!r}")
        if not isinstance(self.delivery_enabled, bool):
            raise ValueError(
                f"delivery_enabled must be true or false, not {self.delivery_enabled!r}"
            )
