"""
The points where a layer on top of the gateway may change what it does.

The gateway (:mod:`hostlink_tw.controlplane.gateway`) asks its
:class:`GatewayHooks` before authenticating an upgrade, on every ping and
every hello, and tells it each upgrade verdict and each valid inbound
envelope.  This class answers as the real gateway behaves; the test layer
(:mod:`hostlink_tw.controlplane.testlayer`) is a subclass with knobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from hostlink_tw.controlplane.sessions import Session
from hostlink_tw.controlplane.upgrade import ConnectionAttempt
from hostlink_tw.wire.envelope import Envelope

if TYPE_CHECKING:
    from hostlink_tw.controlplane.gateway import GatewayProtocol

__all__ = ["GatewayHooks"]


class GatewayHooks:
    """
    Where a layer on top of the gateway changes its behaviour.  These
    defaults are the real gateway: every upgrade goes on to authentication,
    pings are answered, hellos acknowledged, nothing is kept.
    """

    def refusal(self) -> tuple[int, str] | None:
        """An HTTP status and reason every upgrade is refused with (before authentication)."""
        return None

    def hold(self, connection: GatewayProtocol) -> Deferred[None] | None:
        """A Deferred to hold this upgrade on (no handshake deadline) until it fires."""
        return None

    def released(self, connection: GatewayProtocol) -> None:
        """The connection is gone (whether it was held or not)."""

    def answer_ping(self) -> bool:
        """Whether the agent's ping is answered."""
        return True

    def ack_hello(self, session: Session) -> bool:
        """Whether this ``agent.hello`` is answered (with ``agent.hello_ack``)."""
        return True

    def inbound(self, session: Session, envelope: Envelope, size: int) -> None:
        """A valid envelope of ``size`` bytes arrived (before it is handled)."""

    def judged(self, attempt: ConnectionAttempt) -> None:
        """An upgrade attempt got its verdict (at most once per connection)."""
