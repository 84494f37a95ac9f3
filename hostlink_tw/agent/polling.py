"""
When the HTTP poller runs (PROTOCOL §9.3): :class:`PollingCoordinator`.

Polling runs unless delivery is enabled on both sides — the agent's own
``HOSTLINK_WS_DELIVERY_ENABLED`` and the last hello_ack's
``delivery_enabled`` — and the session is active, or has been inactive for
less than ``HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD``.  So:

* at start it runs (no session has said it delivers);
* a hello_ack with ``delivery_enabled`` on a session, with the local flag
  on, pauses it for as long as that session is up;
* when that session ends it resumes ``threshold`` later (at once with a
  threshold of 0), unless a new delivering session is active by then;
* a hello_ack with ``delivery_enabled: false`` resumes it at once.

Pure state and one timer on an ``IReactorTime``: tested on a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["PollingCoordinator"]


class PollingCoordinator:
    """
    Decides whether polling runs; tells ``on_change`` of every change.

    :param clock: for the fallback threshold's timer.
    :param local_delivery: the agent's own delivery flag.
    :param threshold: seconds after a delivering session ends before polling resumes.
    :param on_change: called with the new state (True: polling runs).
    """

    def __init__(self, clock: IReactorTime, *, local_delivery: bool, threshold: float,
                 on_change: Callable[[bool], None]) -> None:
        self._clock = clock
        self._local = local_delivery
        self._threshold = threshold
        self._on_change = on_change
        self._timer: IDelayedCall | None = None
        self._session_delivers = False
        #: Whether polling runs now.
        self.polling = True
        #: Why, in a few words (for the status page).
        self.reason = "no session delivers tasks yet"

    def session_active(self, peer_delivery_enabled: bool) -> None:
        """A session became active; its hello_ack said ``peer_delivery_enabled``."""
        self._cancel()
        if self._local and peer_delivery_enabled:
            self._session_delivers = True
            self._set(False, "the session delivers tasks")
        else:
            self._session_delivers = False
            why = ("the control plane's hello_ack has delivery disabled"
                   if self._local else "this agent's delivery flag is off")
            self._set(True, why)

    def session_ended(self) -> None:
        """The session ended: polling resumes after the threshold."""
        if not self._session_delivers:
            return
        self._session_delivers = False
        self._cancel()
        if self._threshold <= 0:
            self._set(True, "the session ended")
            return
        self._timer = self._clock.callLater(self._threshold, self._fall_back)

    def stop(self) -> None:
        """Cancel the pending fallback (the agent is stopping)."""
        self._cancel()

    def _fall_back(self) -> None:
        self._timer = None
        self._set(True, f"the session has been down for {self._threshold:g}s")

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _set(self, polling: bool, reason: str) -> None:
        self.reason = reason
        if polling != self.polling:
            self.polling = polling
            self._on_change(polling)
