"""
The connection's state machine: named states, the legal transitions between
them, and the timers each state owns.

::

    idle/stopped --start--> connecting --upgrade--> awaiting_hello_ack
        --hello_ack--> active
    connecting/awaiting_hello_ack/active --failure, close or TCP gone--> closing
    closing --retry scheduled--> waiting --delay--> connecting
    any running state --stop--> stopping --everything closed--> stopped

A timer is registered with :meth:`StateMachine.own` together with the
states it may live in; the transition that leaves those states cancels it.
That is what keeps every deadline from outliving its reason (and trial's
dirty-reactor check green).  An illegal transition raises
:class:`IllegalTransitionError`: it is a bug in the client, never a peer's doing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["ClientState", "IllegalTransitionError", "StateMachine", "TRANSITIONS"]


class ClientState(enum.Enum):
    """Where the client is in its connection life."""

    IDLE = "idle"
    CONNECTING = "connecting"
    AWAITING_ACK = "awaiting_hello_ack"
    ACTIVE = "active"
    CLOSING = "closing"
    WAITING = "waiting"
    STOPPING = "stopping"
    STOPPED = "stopped"


S = ClientState

#: Every legal transition, by the state it leaves.
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    S.IDLE: frozenset({S.CONNECTING}),
    S.CONNECTING: frozenset({S.CONNECTING, S.AWAITING_ACK, S.CLOSING, S.STOPPING}),
    S.AWAITING_ACK: frozenset({S.ACTIVE, S.CLOSING, S.STOPPING}),
    S.ACTIVE: frozenset({S.CLOSING, S.STOPPING}),
    S.CLOSING: frozenset({S.CLOSING, S.WAITING, S.STOPPING}),
    S.WAITING: frozenset({S.CONNECTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.CONNECTING}),
}


class IllegalTransitionError(RuntimeError):
    """The client tried a transition the table does not allow (a bug)."""


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class StateMachine:
    """
    The current :class:`ClientState` and the timers that belong to it.

    :param on_change: called with ``(old, new, reason)`` after each
        transition (the timers of the old state are already cancelled).
    """

    def __init__(self, on_change: Callable[[ClientState, ClientState, str], None]) -> None:
        self.state = ClientState.IDLE
        self._on_change = on_change
        # (allowed states, cancel function) for every live timer.
        self._owned: list[tuple[frozenset[ClientState], Callable[[], None]]] = []

    def set(self, new: ClientState, reason: str) -> None:
        """Move to ``new``: cancel the timers that may not live there, then report."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransitionError(f"{old.value} -> {new.value} ({reason})")
        self.state = new
        keep: list[tuple[frozenset[ClientState], Callable[[], None]]] = []
        for states, cancel in self._owned:
            if new in states:
                keep.append((states, cancel))
            else:
                cancel()
        self._owned = keep
        self._on_change(old, new, reason)

    def own(self, cancel: Callable[[], None], states: Iterable[ClientState] | None = None) -> None:
        """
        Tie a timer to ``states`` (the current state by default): ``cancel``
        is called on the first transition to a state outside them.
        """
        allowed = frozenset(states) if states is not None else frozenset({self.state})
        self._owned.append((allowed, cancel))

    def owns_timers(self) -> int:
        """How many timers are tied to states now (for tests)."""
        return len(self._owned)


def cancel_call(call: Any) -> Callable[[], None]:
    """A canceller for an ``IDelayedCall`` that tolerates one already run or cancelled."""

    def cancel() -> None:
        if call.active():
            call.cancel()

    return cancel
