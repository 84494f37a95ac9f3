"""
Getting tasks to agents: the answer to each hello's snapshot and the
deliveries that follow it (:class:`Dispatcher`).

* Each agent's latest session is its :class:`Link`.  A phase-1 hello (``{}``)
  gets the phase-1 ``agent.hello_ack`` and no deliveries; a phase-2 hello's
  snapshot is answered with directives (:mod:`~hostlink_tw.controlplane.taskhello`),
  after recording what they imply: adopted finals, output given up on, and
  every attempt of the agent the control plane no longer wants is
  *discarded* (the agent was told to drop it, or does not have it).
* A task goes out as ``task.deliver`` only when the session's hello
  advertised ``delivery_enabled`` and this control plane's
  ``delivery_enabled`` is on; its current attempt is re-delivered (same
  ``execution_attempt_id``) on each new session until ``task.received`` (or
  ``task.started``, or a final) comes back, and again when the snapshot no
  longer names a received one.  At most ``delivery_window`` delivered or
  received attempts per agent wait to start, so a well-configured agent never
  answers ``queue_full``; when one does (or ``store_unavailable``, or
  ``delivery_disabled``), the attempt is pending again and goes out at the
  next occasion (an attempt started or ended, a new task, a new session).
* Never two attempts of one task live at once: a task whose older attempt
  the agent may still hold is not delivered until a hello has discarded it.
  Cancelling, or replacing the attempt of, a task the agent may hold closes
  the agent's session (1000): its reconnect snapshot is the only place the
  protocol lets the control plane discard an attempt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.logger import Logger

from hostlink_tw.controlplane.sessions import NoSessionError, Session, SessionRegistry
from hostlink_tw.controlplane.settings import ControlPlaneSettings
from hostlink_tw.controlplane.taskhello import (
    REASON_CANCELLED,
    REASON_SUPERSEDED,
    REASON_UNKNOWN,
    plan_hello,
)
from hostlink_tw.controlplane.taskmodel import (
    LIVE_ATTEMPT_STATES,
    STATUS_CANCELLED,
    STATUS_RECEIVED,
    STATUS_RUNNING,
    TaskRecord,
)
from hostlink_tw.controlplane.taskstore import TaskStore, TaskStoreError
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.hello import (
    HelloAckDirectives,
    HelloSnapshot,
    UnackedFinal,
    hello_ack_payload,
)
from hostlink_tw.wire.payloads import ErrorPayload, ack_payload
from hostlink_tw.wire.tasks import deliver_payload
from hostlink_tw.wire.vocabulary import AGENT_HELLO, CLOSE_NORMAL, TASK_DELIVER

__all__ = ["REFUSED_DELIVERY_CODES", "Dispatcher", "Link"]

log = Logger()

#: Agent ``error`` codes (answering a ``task.deliver``) after which the
#: attempt was not recorded and must be delivered again later.
REFUSED_DELIVERY_CODES = frozenset({"queue_full", "store_unavailable", "delivery_disabled"})

# Deliver message ids remembered per session, to match the agent's errors.
_DELIVERIES_KEPT = 1024


@dataclass
class Link:
    """
    An agent's latest session, as dispatch sees it.

    :ivar deliver: Its hello advertised delivery, and ours is on.
    :ivar sent: Attempts delivered on this session (not sent again on it).
    :ivar lost: Current attempts we hold as received that its snapshot did
        not name: delivered again.
    :ivar deliveries: ``task.deliver`` message id → attempt, the latest few.
    """

    session: Session
    deliver: bool = False
    sent: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    deliveries: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @property
    def usable(self) -> bool:
        """True while deliveries may go out on it."""
        return self.deliver and self.session.active and not self.session.closed


class _Knowledge:
    """The store, as :func:`~hostlink_tw.controlplane.taskhello.plan_hello` asks it (one agent)."""

    def __init__(self, store: TaskStore, agent_id: str) -> None:
        self._store = store
        self._agent_id = agent_id

    def unwanted(self, task_id: str, attempt_id: str) -> str | None:
        attempt = self._store.attempt(attempt_id)
        if attempt is None or attempt.task_id != task_id or attempt.agent_id != self._agent_id:
            return REASON_UNKNOWN
        task = self._store.task(task_id)
        if task is None or task.status == STATUS_CANCELLED:
            return REASON_CANCELLED
        return None if attempt.current else REASON_SUPERSEDED

    def highest(self, attempt_id: str, stream: str) -> int:
        return self._store.output.highest(attempt_id, stream)

    def stored_finals(self, message_ids: Iterable[str]) -> set[str]:
        return self._store.final_ids(list(message_ids))

    def has_final(self, attempt_id: str) -> bool:
        return self._store.has_final(attempt_id)


class Dispatcher:
    """Hellos answered, tasks delivered (see the module docstring)."""

    def __init__(
        self,
        store: TaskStore,
        sessions: SessionRegistry,
        settings: ControlPlaneSettings,
        clock: Callable[[], float],
        changed: Callable[[TaskRecord], None],
        forget_output: Callable[[str], None],
    ) -> None:
        """
        :param changed: Told of every task whose status or flags changed here.
        :param forget_output: Told of an attempt whose output position moved
            in the store (output given up on).
        """
        self._store = store
        self._sessions = sessions
        self._settings = settings
        self._clock = clock
        self._changed = changed
        self._forget_output = forget_output
        self._links: dict[str, Link] = {}

    def link(self, agent_id: str) -> Link | None:
        """The agent's latest session link, if its hello was answered."""
        return self._links.get(agent_id)

    # -- the hello ---------------------------------------------------------------------

    def hello(self, session: Session, envelope: Envelope) -> dict[str, object]:
        """
        The ``agent.hello_ack`` payload for this hello, after recording what
        its directives imply.

        :raises ProtocolError: The hello's payload is neither ``{}`` nor a
            valid snapshot.
        """
        agent_id = session.agent_id
        if not envelope.payload:  # a phase-1 agent: no snapshot, no deliveries
            self._links[agent_id] = Link(session)
            return ack_payload(envelope.message_id, envelope.type)
        snapshot = HelloSnapshot.from_dict(envelope.payload)
        enabled = self._settings.delivery_enabled
        link = Link(session, deliver=enabled and snapshot.capabilities.delivery_enabled)
        self._links[agent_id] = link
        try:
            plan = plan_hello(snapshot, _Knowledge(self._store, agent_id))
            self._record(agent_id, plan.adopted_finals, plan.skipped_output)
            link.lost = {
                task.execution_attempt_id
                for task in self._store.tasks(agent_id, unfinished=True)
                if task.status == STATUS_RECEIVED
                and task.execution_attempt_id not in plan.mentioned
            }
        except TaskStoreError as e:
            log.error("task store failed, hello answered without directives: {error}",
                      error=str(e))
            link.deliver = False
            return hello_ack_payload(HelloAckDirectives(envelope.message_id, AGENT_HELLO))
        return hello_ack_payload(plan.directives(envelope.message_id, enabled))

    def _record(
        self,
        agent_id: str,
        adopted: Iterable[UnackedFinal],
        skipped: Iterable[tuple[str, str, int]],
    ) -> None:
        """Store what a hello plan implies, before its answer leaves."""
        now = self._clock()
        for final in adopted:
            _, changed = self._store.record_final(
                final.message_id, final.execution_attempt_id, final.final, now
            )
            if changed is not None:
                self._changed(changed)
        for attempt_id, stream, highest in skipped:
            log.warn(
                "agent no longer has output this control plane never stored: {stream} of "
                "attempt {attempt} up to sequence {highest}, marked truncated",
                stream=stream, attempt=attempt_id, highest=highest,
            )
            self._store.output.skip(attempt_id, stream, highest, now)
            self._forget_output(attempt_id)
        # Whatever the agent holds of these is dropped by this hello's
        # directives; whatever it does not hold it will never get.
        knowledge = _Knowledge(self._store, agent_id)
        unwanted = [
            attempt.execution_attempt_id
            for attempt in self._store.live_attempts(agent_id)
            if knowledge.unwanted(attempt.task_id, attempt.execution_attempt_id) is not None
        ]
        if unwanted:
            self._store.discard(unwanted, now)

    # -- deliveries --------------------------------------------------------------------

    def dispatch(self, agent_id: str) -> None:
        """Deliver what may go to the agent now (nothing without a usable link)."""
        link = self._links.get(agent_id)
        if link is None or not link.usable:
            return
        try:
            held = {a.task_id for a in self._store.live_attempts(agent_id) if not a.current}
            waiting = 0
            for task in self._store.tasks(agent_id, unfinished=True):
                attempt = task.execution_attempt_id
                if task.status == STATUS_RUNNING:
                    continue
                if attempt in link.sent or (
                    task.status == STATUS_RECEIVED and attempt not in link.lost
                ):
                    waiting += 1
                    continue
                if task.task_id in held:
                    continue  # an older attempt may still be on the agent
                if waiting >= self._settings.delivery_window:
                    break
                if not self._deliver(link, task):
                    return
                waiting += 1
        except TaskStoreError as e:
            log.error("task store failed, nothing delivered: {error}", error=str(e))

    def _deliver(self, link: Link, task: TaskRecord) -> bool:
        """Send the task's current attempt on the link; False if the session is gone."""
        attempt = task.execution_attempt_id
        envelope = make_envelope(
            TASK_DELIVER,
            task.agent_id,
            deliver_payload(task.command),
            now=self._clock(),
            task_id=task.task_id,
            execution_attempt_id=attempt,
        )
        try:
            link.session.send_envelope(envelope)
        except NoSessionError:
            return False
        link.sent.add(attempt)
        link.lost.discard(attempt)
        link.deliveries[envelope.message_id] = attempt
        if len(link.deliveries) > _DELIVERIES_KEPT:
            link.deliveries.popitem(last=False)
        changed = self._store.delivered(attempt, self._clock())
        if changed is not None:
            self._changed(changed)
        return True

    def redeliver(self, task: TaskRecord) -> bool:
        """
        Send the task's current attempt again on the agent's active session,
        whatever its state (duplicate-delivery tests); False without one.
        """
        link = self._links.get(task.agent_id)
        if link is None or not link.session.active or link.session.closed:
            return False
        return self._deliver(link, task)

    def revoke(self, agent_id: str, attempt_id: str, reason: str) -> None:
        """
        The attempt is no longer wanted: if the agent may hold it, close its
        session so that the reconnect's hello discards it.
        """
        attempt = self._store.attempt(attempt_id)
        if attempt is None or attempt.state not in LIVE_ATTEMPT_STATES:
            return
        try:
            session = self._sessions.get(agent_id)
        except NoSessionError:
            return
        if not session.closed:
            log.info("closing the session of agent_id={agent_id}: {reason}",
                     agent_id=agent_id, reason=reason)
            session.close(CLOSE_NORMAL, reason)

    def agent_error(self, session: Session, envelope: Envelope) -> None:
        """The agent answered a delivery with an ``error``: deliver it again later."""
        link = self._links.get(session.agent_id)
        if link is None or link.session is not session:
            return
        payload = ErrorPayload.from_dict(envelope.payload)
        attempt = link.deliveries.pop(payload.related_message_id, None)
        if attempt is None or payload.code not in REFUSED_DELIVERY_CODES:
            return
        link.sent.discard(attempt)
        if payload.code == "delivery_disabled":
            link.deliver = False
        try:
            changed = self._store.undelivered(attempt, self._clock())
        except TaskStoreError as e:
            log.error("task store failed: {error}", error=str(e))
            return
        if changed is not None:
            self._changed(changed)
