"""
The test and chaos controls of the reference control plane, as a layer on
top of the real gateway.

:class:`TestControls` is a :class:`~hostlink_tw.controlplane.hooks.GatewayHooks`:
the gateway asks it, at fixed points, whether to refuse an upgrade, hold it,
answer a ping or a hello, and tells it each upgrade verdict and each inbound
envelope.  Out of the box it answers as the real gateway would; tests flip
its knobs (through :class:`~hostlink_tw.controlplane.ControlPlane`, which
exposes them under their documented names):

* :meth:`TestControls.refuse_upgrades` / :meth:`~TestControls.clear_refusal`:
  refuse every upgrade with an HTTP status, for a while or until cleared;
* :meth:`TestControls.stall_upgrades` / :meth:`~TestControls.clear_stall`:
  hold every new upgrade unanswered;
* :attr:`TestControls.answer_pings`: False, and the agent's pings go unanswered;
* :attr:`TestControls.withhold_hello_ack`: True, and hellos go unanswered;
* :attr:`TestControls.record_messages`: bytes of inbound envelopes each session
  keeps in ``Session.received``;
* :attr:`TestControls.attempts`: every upgrade verdict (the last 10,000+);
* :meth:`TestControls.hold_acks` / :meth:`~TestControls.release_acks`: withhold
  the acks of stored task messages (the agent's spool fills), then send them;
* :meth:`TestControls.redeliver`: send a task's ``task.deliver`` again, same
  attempt (duplicate delivery);
* :meth:`TestControls.new_attempt`: give a task a new ``execution_attempt_id``.

The task knobs act on the control plane's
:class:`~hostlink_tw.controlplane.tasks.TaskService` (:meth:`TestControls.attach_tasks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hostlink_tw.controlplane.gateway import GatewayProtocol
from hostlink_tw.controlplane.hooks import GatewayHooks
from hostlink_tw.controlplane.sessions import NoSessionError, Session
from hostlink_tw.controlplane.upgrade import ConnectionAttempt
from hostlink_tw.controlplane.web import reason_phrase
from hostlink_tw.wire.envelope import Envelope

if TYPE_CHECKING:
    from hostlink_tw.controlplane.taskmodel import TaskRecord
    from hostlink_tw.controlplane.tasks import TaskService

__all__ = ["ACKS_HELD_MAX", "ATTEMPTS_KEPT", "TestControls"]

log = Logger()

#: Upgrade attempts kept in :attr:`TestControls.attempts` (the oldest are
#: dropped in batches once twice as many have piled up): anyone can send
#: upgrades, so the list may not grow unbounded.
ATTEMPTS_KEPT = 10_000

#: Acks :meth:`TestControls.hold_acks` keeps at most; later ones are dropped
#: (never sent: the agent replays those messages on its next connection).
ACKS_HELD_MAX = 100_000


class TestControls(GatewayHooks):
    """The knobs tests turn; each changes the gateway only through its hooks."""

    def __init__(self, reactor: Any, *, record_messages: int = 0) -> None:
        """
        :param reactor: Runs the timers of :meth:`refuse_upgrades` and
            :meth:`stall_upgrades` durations.
        :param record_messages: The initial :attr:`record_messages`.
        """
        self._reactor = reactor
        #: False: the control plane ignores pings (no pong), for keepalive tests.
        self.answer_pings = True
        #: True: ``agent.hello`` is recorded but never acknowledged.
        self.withhold_hello_ack = False
        #: Bytes of inbound envelopes kept per session (tests; 0: none).
        self.record_messages = record_messages
        #: Every upgrade attempt, oldest first (tests only; never logged).
        self.attempts: list[ConnectionAttempt] = []
        self._refusal: tuple[int, str] | None = None
        self._stalling = False
        self._stalled: dict[GatewayProtocol, Deferred[None]] = {}
        # Twisted's IDelayedCall; Any because mypy cannot see zope interfaces.
        self._timers: dict[str, Any] = {}
        self._holding_acks = False
        self._held_acks: list[tuple[Session, Envelope]] = []
        self._tasks: TaskService | None = None

    # -- the knobs ----------------------------------------------------------------

    def refuse_upgrades(
        self, status: int = 503, *, duration: float | None = None, reason: str = ""
    ) -> None:
        """
        Refuse every upgrade with this HTTP status, for ``duration`` seconds
        or until :meth:`clear_refusal`.
        """
        self._refusal = (status, reason or reason_phrase(status))
        self._set_timer("refusal", duration, self.clear_refusal)

    def clear_refusal(self) -> None:
        """Accept upgrades again."""
        self._refusal = None
        self._cancel_timer("refusal")

    def stall_upgrades(self, *, duration: float | None = None) -> None:
        """
        Hold every new upgrade unanswered (the client's handshake timeout is
        the only way out) for ``duration`` seconds or until :meth:`clear_stall`.
        """
        self._stalling = True
        self._set_timer("stall", duration, self.clear_stall)

    def clear_stall(self) -> None:
        """Stop stalling; held upgrades still connected proceed normally."""
        self._stalling = False
        self._cancel_timer("stall")
        held, self._stalled = self._stalled, {}
        for d in held.values():
            d.callback(None)

    @property
    def stalled_count(self) -> int:
        """How many upgrades are being held now."""
        return len(self._stalled)

    def attach_tasks(self, tasks: TaskService) -> None:
        """The task service the task knobs act on."""
        self._tasks = tasks

    def _task_service(self) -> TaskService:
        if self._tasks is None:
            raise RuntimeError("no task service is attached to these test controls")
        return self._tasks

    def hold_acks(self) -> None:
        """Withhold the acks of stored task messages until :meth:`release_acks`."""
        self._holding_acks = True

    def release_acks(self) -> int:
        """
        Ack as usual again, and send the withheld acks whose session is still
        open, in order; return how many were sent.
        """
        self._holding_acks = False
        held, self._held_acks = self._held_acks, []
        sent = 0
        for session, envelope in held:
            if session.closed:
                continue
            try:
                session.send_envelope(envelope)
            except NoSessionError:
                continue
            sent += 1
        return sent

    @property
    def acks_held(self) -> int:
        """How many acks are being withheld now."""
        return len(self._held_acks)

    def redeliver(self, task_id: str) -> bool:
        """Send the task's current ``task.deliver`` again; False without an active session."""
        return self._task_service().redeliver(task_id)

    def new_attempt(self, task_id: str) -> TaskRecord:
        """Give the task a new ``execution_attempt_id`` (the old one is discarded)."""
        return self._task_service().new_attempt(task_id)

    def stop(self) -> None:
        """Cancel the knobs' timers and stop stalling (the control plane is stopping)."""
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._stalling = False
        self._holding_acks = False
        self._held_acks.clear()

    def _set_timer(self, name: str, duration: float | None, action: Callable[[], None]) -> None:
        self._cancel_timer(name)
        if duration is not None:
            self._timers[name] = self._reactor.callLater(duration, action)

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- the hooks the gateway calls ----------------------------------------------

    def refusal(self) -> tuple[int, str] | None:
        """See :meth:`refuse_upgrades`."""
        return self._refusal

    def hold(self, connection: GatewayProtocol) -> Deferred[None] | None:
        """See :meth:`stall_upgrades`."""
        if not self._stalling:
            return None
        d: Deferred[None] = Deferred()
        self._stalled[connection] = d
        return d

    def released(self, connection: GatewayProtocol) -> None:
        """A held connection that is gone is no longer held."""
        self._stalled.pop(connection, None)

    def answer_ping(self) -> bool:
        """See :attr:`answer_pings`."""
        return self.answer_pings

    def ack_hello(self, session: Session) -> bool:
        """See :attr:`withhold_hello_ack`."""
        if self.withhold_hello_ack:
            log.info(
                "hello_ack withheld agent_id={agent_id} remote={remote}",
                agent_id=session.agent_id,
                remote=session.remote,
            )
            return False
        return True

    def inbound(self, session: Session, envelope: Envelope, size: int) -> None:
        """See :attr:`record_messages`."""
        session.record(envelope, size, self.record_messages)

    def hold_ack(self, session: Session, envelope: Envelope) -> bool:
        """See :meth:`hold_acks` (the task intake asks before each ack)."""
        if not self._holding_acks:
            return False
        if len(self._held_acks) < ACKS_HELD_MAX:
            self._held_acks.append((session, envelope))
        return True

    def judged(self, attempt: ConnectionAttempt) -> None:
        """See :attr:`attempts`."""
        self.attempts.append(attempt)
        if len(self.attempts) > 2 * ATTEMPTS_KEPT:
            del self.attempts[:-ATTEMPTS_KEPT]
