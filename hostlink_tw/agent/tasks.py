"""
The task engine: deliveries in, the runner's work out, the store in between.

PROTOCOL §7–§8 from the agent's side.  :class:`TaskEngine` is the client's
:class:`~hostlink_tw.agent.interfaces.TaskHandler` (the hello snapshot,
``task.deliver``), a :class:`~hostlink_tw.agent.session.SessionListener`
(hello_ack directives, replay, acks, gap errors) and the runner's
:class:`~hostlink_tw.agent.runner.RunnerSink` (started, output, ended).

Every state change is committed to the store before the message that
announces it leaves (§8.7): a receipt before ``task.received``, ``running``
before the process is spawned (so a crash can never run an attempt twice),
each output chunk and each final before it is sent (the
:class:`~hostlink_tw.agent.outbox.Outbox` sends only what the store holds).

Start (:meth:`TaskEngine.start`) opens the store and recovers before the
first hello can be built: process groups a crash left running are killed,
their attempts get the §7.6 ``interrupted`` final, and received attempts
are queued again — released to the runner only after the first hello_ack,
so the control plane can discard them first (§8.2).  A store that cannot
be opened is one error line; the session runs on and every delivery is
answered ``store_unavailable`` (§8.7).

For the status page the engine keeps its counts in memory (no store read
at scrape time): :attr:`TaskEngine.spool_bytes` and
:attr:`TaskEngine.pending_messages`, :meth:`TaskEngine.queue_depth`, and
events to its observers (:meth:`TaskEngine.add_observer`):
``task_ended`` (``task_id``, ``execution_attempt_id``, ``status``,
``exit_code``, ``duration`` in seconds or ``None`` for an attempt a restart
interrupted) and ``outbox_resent`` (``reason``: ``replay``, ``gap`` or
``redelivery``; ``type``, ``message_id``).  :func:`build_tasks` passes them
on to the client's observers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw import __version__
from hostlink_tw.agent.events import ClientEvent, Observers
from hostlink_tw.agent.interfaces import Channel
from hostlink_tw.agent.leftovers import LeftoverGroups
from hostlink_tw.agent.outbox import Outbox
from hostlink_tw.agent.session import Session, ViolationError
from hostlink_tw.agent.sizes import ENVELOPE_ALLOWANCE, chunk_threshold, fit_final
from hostlink_tw.agent.spool import Spool
from hostlink_tw.agent.store import (
    LocalState,
    Receipt,
    StoredMessage,
    StoreError,
    TaskStore,
    distinct_final_id,
    interrupted_message_id,
)
from hostlink_tw.agent.tasksnapshot import build_hello, process_identity, read_boot_id
from hostlink_tw.wire.envelope import Envelope, make_envelope
from hostlink_tw.wire.errors import ProtocolError
from hostlink_tw.wire.hello import HelloAckDirectives
from hostlink_tw.wire.payloads import AckPayload, ErrorPayload, error_payload
from hostlink_tw.wire.tasks import (
    FINAL_MESSAGE_KIND,
    TaskDeliverPayload,
    interrupted_final_message_id,
    output_payload,
    task_message_id,
)
from hostlink_tw.wire.vocabulary import (
    ACK,
    CLOSE_INVALID_PAYLOAD,
    ERROR,
    ERROR_DELIVERY_DISABLED,
    ERROR_OUTPUT_SEQUENCE_GAP,
    ERROR_QUEUE_FULL,
    ERROR_STORE_UNAVAILABLE,
    TASK_DELIVER,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
)

if TYPE_CHECKING:
    # Only what polling needs: twisted.web.client is not loaded by an agent that never polls.
    from hostlink_tw.agent.httpapi import PolledTask
    from hostlink_tw.agent.httpresults import HTTPResults

__all__ = ["OUTBOX_RESENT", "TASK_ENDED", "RunnerLike", "TaskEngine", "TaskSettings",
           "build_tasks"]

_log = Logger(namespace="hostlink_tw.tasks")

MiB = 1024 * 1024

#: Deliveries being recorded at once; more are answered ``queue_full`` (retryable).
MAX_RECEIPTS_IN_FLIGHT = 256

#: The kind of the event each ended attempt gives the engine's observers.
TASK_ENDED = "task_ended"
#: The kind of the event each message sent again (not live) gives them.
OUTBOX_RESENT = "outbox_resent"


#: Message types the agent sends but never keeps in its outbox (only
#: ``task.output`` and ``task.final`` are stored): their acks free nothing.
_UNSTORED = frozenset({TASK_RECEIVED, TASK_STARTED})


@dataclass(frozen=True)
class TaskSettings:
    """What the engine needs of the phase-2 settings (PROTOCOL §10)."""

    delivery_enabled: bool = False
    results_enabled: bool = False
    spool_cap_bytes: int = 64 * MiB
    terminal_reserve_bytes: int = 1 * MiB
    flush_threshold: int = 16384
    retention: float = 24 * 3600.0
    queue_limit: int = 16
    concurrency: int = 1
    kill_grace: float = 5.0
    max_message_bytes: int = 1 * MiB

    @classmethod
    def from_settings(cls, settings: Any) -> TaskSettings:
        """Take the values from :class:`hostlink_tw.config.Settings`."""
        return cls(
            delivery_enabled=settings.delivery_enabled,
            results_enabled=settings.results_enabled,
            spool_cap_bytes=settings.spool_cap_bytes,
            terminal_reserve_bytes=settings.terminal_reserve_bytes,
            flush_threshold=chunk_threshold(settings.output_flush_threshold,
                                            settings.max_message_bytes),
            retention=settings.store_retention,
            queue_limit=settings.task_queue_limit,
            concurrency=settings.task_concurrency,
            kill_grace=settings.task_kill_grace,
            max_message_bytes=settings.max_message_bytes,
        )


class RunnerLike(Protocol):
    """What the engine needs of :class:`hostlink_tw.agent.runner.TaskRunner`."""

    def submit(self, spec: Any) -> None: ...
    def discard(self, task_id: str, attempt_id: str) -> bool: ...
    def pause_output(self) -> None: ...
    def resume_output(self) -> None: ...
    def running_tasks(self) -> list[Any]: ...
    def queued(self) -> list[Any]: ...


@dataclass
class _Live:
    """A running attempt's sequences (the last one stored per stream)."""

    sequences: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})


class TaskEngine:
    """
    The agent's tasks: see the module docstring.

    :param store: the local store (not started; :meth:`start` does).
    :param settings: the phase-2 settings.
    :param agent_id: this agent's id (envelopes).
    :param clock: the reactor's clock; its ``seconds()`` is wall time in production.
    :param make_spec: builds the runner's spec from (task id, attempt id, command).
    :param use_store: open the store; without it deliveries are refused
        (``delivery_disabled`` first when delivery is off) and the hello
        carries only the flags.
    """

    def __init__(
        self,
        store: TaskStore,
        settings: TaskSettings,
        *,
        agent_id: str,
        clock: IReactorTime,
        make_spec: Callable[[str, str, str], Any],
        log: Logger | None = None,
        boot_id: str | None = None,
        kill: Callable[[int, int], None] = os.killpg,
        use_store: bool = True,
    ) -> None:
        self.store = store
        self._use_store = use_store
        self.settings = settings
        self.agent_id = agent_id
        self._clock = clock
        self._make_spec = make_spec
        self.log = log if log is not None else _log
        self._boot_id = boot_id if boot_id is not None else read_boot_id()
        self._leftovers = LeftoverGroups(clock, boot_id=self._boot_id,
                                         grace=settings.kill_grace, kill=kill, log=self.log)
        self.runner: RunnerLike | None = None
        #: Whether the store opened; if not, deliveries get ``store_unavailable``.
        self.available = False
        self.problem: str | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._is_ready = False
        self._released = False
        self._receipts_in_flight = 0
        self._held: list[Any] = []
        self._live: dict[tuple[str, str], _Live] = {}
        self._session: Session | None = None
        self._after_activation: list[StoredMessage] = []
        self._writes: set[Deferred[Any]] = set()
        self._purge = LoopingCall(self._purge_once)
        self._purge.clock = clock
        self._observers = Observers(self.log)
        self.outbox = Outbox(store, agent_id=agent_id, clock=clock,
                             on_freed=lambda count, size: self.spool.acked(count, size),
                             on_resent=self._resent, log=self.log)
        self._closing = False
        self.spool = Spool(settings, store, log=self.log, track=self._track,
                           usable=lambda: self.available and not self._closing)
        #: Attempts ended, by final status (those a restart interrupted included).
        self.finished: Counter[str] = Counter()
        #: The last hello_ack's ``delivery_enabled`` (§9.3).
        self.peer_delivery_enabled = False
        #: Attempts whose result goes by the HTTP report (§9.2), not the session.
        self._http: set[tuple[str, str]] = set()
        #: Sends those results; ``None`` until :meth:`attach_api`.
        self.http_results: HTTPResults | None = None
        #: Tasks taken in from the HTTP paths, by ``via`` (poll, heartbeat) and
        #: what became of them (``new``, ``known``, ``queue_full``).
        self.offers: Counter[str] = Counter()

    # -- lifecycle --------------------------------------------------------------------

    def attach_api(self, api: Any) -> None:
        """The control plane's HTTP API (§9.1): results of ``http`` attempts are
        reported through it."""
        from hostlink_tw.agent.httpresults import HTTPResults

        self.http_results = HTTPResults(
            self.store, api, self._clock, log=self.log,
            on_accepted=lambda m: self.spool.freed(m.byte_count),
        )

    @property
    def uses_store(self) -> bool:
        """Whether this engine keeps a store (so it can take tasks at all)."""
        return self._use_store

    def attach_runner(self, runner: RunnerLike) -> None:
        """The runner this engine feeds (built with this engine as its sink)."""
        self.runner = runner
        self.spool.runner = runner

    def add_observer(self, observer: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``observer`` with each ``task_ended`` and ``outbox_resent`` event
        (see the module docstring); return its unsubscriber."""
        return self._observers.add(observer)

    def queue_depth(self) -> int:
        """Received attempts not started yet: held until the first hello_ack, or
        waiting for a slot in the runner."""
        waiting = len(self.runner.queued()) if self.runner is not None else 0
        return len(self._held) + waiting

    def queued(self, limit: int | None = None) -> list[Any]:
        """The specs of the first ``limit`` (all by default) received, not started
        attempts, oldest first."""
        waiting = self.runner.queued() if self.runner is not None else []
        return (self._held + waiting)[:limit]

    def running_tasks(self) -> list[Any]:
        """The runner's running attempts (``spec``, ``pid``, ``started_at``), oldest first."""
        return self.runner.running_tasks() if self.runner is not None else []

    def start(self) -> Deferred[None]:
        """Open the store and recover (§8.8); fires when the first hello may be built."""
        d = self._start()
        d.addBoth(self._became_ready)
        return d

    @inlineCallbacks
    def _start(self) -> Generator[Deferred[Any], Any, None]:
        if not self._use_store:
            return  # tasks off and no store file: nothing owed, nothing to open
        try:
            yield self.store.start()
        except StoreError as e:
            self.problem = str(e)
            self.log.error(
                "task store unavailable, task delivery refused: {error}", error=str(e)
            )
            return
        self.available = True
        try:
            running = yield self.store.running_attempts()
            for attempt in running:
                yield self._leftovers.kill_leftover(
                    attempt.task_id, attempt.attempt_id, attempt.pgid, attempt.boot_id
                )
            finals = yield self.store.recover(self._clock.seconds())
            for final in finals:
                self.log.info(
                    "task interrupted by a restart task_id={task_id} attempt={attempt}",
                    task_id=final.task_id, attempt=final.attempt_id,
                )
                self._count_end(final.task_id, final.attempt_id, final.payload, None)
            queued = yield self.store.queued_attempts()
            self._held = [self._make_spec(q.task_id, q.attempt_id, q.command) for q in queued]
            self._http.update((q.task_id, q.attempt_id) for q in queued if q.channel == "http")
            yield self.spool.recount()
        except StoreError as e:
            self.available = False
            self.problem = str(e)
            self.log.error("task store unavailable, task delivery refused: {error}",
                           error=str(e))
            return
        if self.http_results is not None:
            # Reports a previous run could not deliver (§9.2: retried at start).
            self.http_results.retry_owed()
        interval = max(1.0, min(self.settings.retention / 4, 600.0))
        self._purge.start(interval, now=True).addErrback(
            lambda f: self.log.failure("retention purge stopped", f)
        )

    def _became_ready(self, result: object) -> None:
        self._is_ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)
        if isinstance(result, Failure):
            self.log.failure("task engine start failed", result)

    def when_ready(self) -> Deferred[None]:
        """Fires once start-up recovery is done (at once if it is)."""
        if self._is_ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def pending_writes(self) -> Deferred[Any]:
        """Fires when every store write (and activation) issued so far is done."""
        return DeferredList(list(self._writes), consumeErrors=True)

    def close(self) -> Deferred[None]:
        """Stop the purge and close the store (after the runner and the client stopped)."""
        self._closing = True
        # A write waiting for room on a full disk must not hold the shutdown.
        self.store.stop_waiting_for_room()
        if self._purge.running:
            self._purge.stop()
        if self.outbox.session is not None:
            self.outbox.detach(self.outbox.session)
        d = self.outbox.when_idle()
        d.addCallback(lambda _: self.pending_writes())
        d.addCallback(lambda _: self.store.stop())
        return d

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._writes.add(d)

        def forget(result: object) -> object:
            self._writes.discard(d)
            return result

        return d.addBoth(forget)

    def _purge_once(self) -> Deferred[None]:
        d = self.store.purge(self._clock.seconds(), self.settings.retention)

        def report(count: int) -> None:
            if count:
                self.log.info("purged {count} ended attempts past retention", count=count)

        def failed(failure: Failure) -> None:
            self.log.error("retention purge failed: {error}", error=str(failure.value))

        return d.addCallbacks(report, failed)

    # -- the hello (TaskHandler) -------------------------------------------------------

    def hello_payload(self) -> Deferred[dict[str, Any]]:
        """The hello snapshot (§7.1), from the store once recovery is done."""
        d = self.when_ready()

        def read(_: object) -> Deferred[Any]:
            if not self.available:
                return succeed(None)
            return self.store.snapshot()

        def failed(failure: Failure) -> None:
            self.log.error("cannot read the hello snapshot: {error}", error=str(failure.value))
            return None

        def build(snapshot: Any) -> dict[str, Any]:
            return build_hello(
                snapshot,
                self.settings,
                limit=self.settings.max_message_bytes - ENVELOPE_ALLOWANCE,
                sequences={key: live.sequences for key, live in self._live.items()},
                version=__version__,
            )

        return d.addCallback(read).addErrback(failed).addCallback(build)

    # -- deliveries (TaskHandler) ------------------------------------------------------

    def delivered(self, envelope: Envelope, channel: Channel) -> None:
        """A ``task.deliver``: validate, record, answer (§7.3, §8.1, §8.2)."""
        task_id, attempt_id = envelope.task_id, envelope.execution_attempt_id
        try:
            if not task_id or not attempt_id:
                raise ProtocolError(
                    "invalid_payload", "task_id and execution_attempt_id are required"
                )
            deliver = TaskDeliverPayload.from_dict(envelope.payload)
        except ProtocolError as e:
            raise ViolationError(
                "invalid task.deliver", str(e), CLOSE_INVALID_PAYLOAD, TASK_DELIVER
            ) from None
        if not self.settings.delivery_enabled:
            self._refuse(channel, envelope, ERROR_DELIVERY_DISABLED,
                         "task delivery is disabled on this agent "
                         "(HOSTLINK_WS_DELIVERY_ENABLED)", retryable=False)
            return
        if not self.available:
            self._refuse(channel, envelope, ERROR_STORE_UNAVAILABLE,
                         "the agent's task store is unavailable", retryable=True)
            return
        if self._receipts_in_flight >= MAX_RECEIPTS_IN_FLIGHT:
            # A control plane sending faster than the disk commits: bound the
            # store thread's backlog (each receipt is an fsync'd transaction).
            self._refuse(channel, envelope, ERROR_QUEUE_FULL,
                         "too many deliveries are being recorded", retryable=True)
            return
        self._receipts_in_flight += 1
        # §9.2: with results off over the session, the result goes by HTTP.
        result_channel = "session" if self.settings.results_enabled else "http"
        d = self.store.record_received(
            task_id, attempt_id, self._clock.seconds(), self.settings.queue_limit,
            deliver.command, result_channel,
        )
        self._track(d)

        def landed(result: object) -> object:
            self._receipts_in_flight -= 1
            return result

        d.addBoth(landed)

        def answer(receipt: Receipt) -> None:
            if receipt.state is LocalState.UNKNOWN and result_channel == "http":
                self._http.add((task_id, attempt_id))
            self._answer(receipt, envelope, channel, deliver.command)

        def failed(failure: Failure) -> None:
            self.log.error("cannot record a delivery: {error}", error=str(failure.value))
            self._refuse(channel, envelope, ERROR_STORE_UNAVAILABLE,
                         "the agent's task store failed", retryable=True)

        d.addCallbacks(answer, failed)

    def _answer(self, receipt: Receipt, envelope: Envelope, channel: Channel,
                command: str) -> None:
        task_id, attempt_id = envelope.task_id, envelope.execution_attempt_id
        state = receipt.state
        if state is LocalState.QUEUE_FULL:
            self._refuse(channel, envelope, ERROR_QUEUE_FULL,
                         f"{self.settings.queue_limit} attempts are queued already",
                         retryable=True)
        elif state is LocalState.UNKNOWN:
            self._say(channel, TASK_RECEIVED, task_id, attempt_id)
            self.log.info("task received task_id={task_id} attempt={attempt}",
                          task_id=task_id, attempt=attempt_id)
            self._enqueue(self._make_spec(task_id, attempt_id, command))
        elif state is LocalState.RECEIVED:
            self._say(channel, TASK_RECEIVED, task_id, attempt_id)
        elif state is LocalState.RUNNING:
            self._say(channel, TASK_STARTED, task_id, attempt_id)
        elif receipt.final is not None and self.settings.results_enabled:
            # Ended: the stored final again, same id, acked or not (§8.2).
            if not self.outbox.send_now(receipt.final, "redelivery"):
                # Not active yet: an unacked final goes out with the replay;
                # an acked one right after it.
                known = {m.message_id for m in self._after_activation}
                if receipt.final.acked and receipt.final.message_id not in known:
                    self._after_activation.append(receipt.final)
        else:
            # Results go elsewhere (off over the session): the receipt is all we say.
            self._say(channel, TASK_RECEIVED, task_id, attempt_id)

    # -- tasks from the HTTP paths (§9) ----------------------------------------------

    def offer(self, task: PolledTask, via: str) -> None:
        """
        Take in one runnable task from a poll or a heartbeat (``via``).

        It is recorded under (task id, attempt id or ``""``) before anything
        else, with the same queue limit as a delivery: an attempt the store
        knows already — delivered by the session, or offered by the other
        HTTP path — is not run again (§9.2).  A new one is queued; its result
        goes by HTTP when it has no attempt id or results are off, else by
        the session's outbox (where it waits, durably, while the session is
        down).  A task the store cannot take now (full queue, store failing)
        is offered again by the next poll.
        """
        if not self.available or self._closing:
            self.offers["unavailable"] += 1
            return
        if self._receipts_in_flight >= MAX_RECEIPTS_IN_FLIGHT:
            self.offers["busy"] += 1
            return
        key = (task.task_id, task.attempt_id)
        result_channel = (
            "session" if task.attempt_id and self.settings.results_enabled else "http"
        )
        self._receipts_in_flight += 1
        d = self._track(self.store.record_received(
            task.task_id, task.attempt_id, self._clock.seconds(), self.settings.queue_limit,
            task.command, result_channel,
        ))

        def landed(result: object) -> object:
            self._receipts_in_flight -= 1
            return result

        def taken(receipt: Receipt) -> None:
            if receipt.state is LocalState.QUEUE_FULL:
                self.offers["queue_full"] += 1
                return
            if receipt.state is not LocalState.UNKNOWN:
                self.offers["known"] += 1
                if receipt.state is LocalState.RECEIVED:
                    # Held (a restart, no hello_ack yet) and polled again:
                    # the control plane wants it run now.
                    self._release_one(key)
                return
            self.offers["new"] += 1
            if result_channel == "http":
                self._http.add(key)
            self.log.info("task received by {via} task_id={task_id} attempt={attempt}",
                          via=via, task_id=task.task_id, attempt=task.attempt_id)
            spec = self._make_spec(task.task_id, task.attempt_id, task.command)
            if self.runner is not None:
                # Not held for a hello_ack: the control plane asked for it
                # over HTTP just now, and a session may never come.
                self.runner.submit(spec)
            else:
                self._held.append(spec)

        def failed(failure: Failure) -> None:
            self.offers["error"] += 1
            self.log.error("cannot record a polled task: {error}", error=str(failure.value))

        d.addBoth(landed).addCallbacks(taken, failed)

    def control_plane_answered(self, polling: bool) -> None:
        """
        The control plane answered a poll or a heartbeat over HTTP.

        Owed HTTP reports are sent again.  While polling runs (§9.3: no
        session delivers tasks), attempts held since a restart are released
        as a hello_ack would release them: a session may never come, and the
        control plane, reachable, still lists what it wants run.
        """
        if self.http_results is not None and self.available and not self._closing:
            self.http_results.retry_owed()
        if polling and not self._released and self.runner is not None:
            self._release()

    def _release_one(self, key: tuple[str, str]) -> None:
        if self.runner is None:
            return
        for spec in self._held:
            if (spec.task_id, spec.attempt_id) == key:
                self._held.remove(spec)
                self.runner.submit(spec)
                return

    def _release(self) -> None:
        """Release the held attempts (once): a hello_ack or an answered poll."""
        if self._released:
            return
        self._released = True
        if self._held and not self.settings.delivery_enabled:
            # Received while delivery was on; it is off now (a rollback):
            # they stay queued in the store rather than run unasked (a poll
            # that lists one again releases it: :meth:`offer`).
            self.log.warn(
                "{count} received attempts stay queued: task delivery is disabled "
                "(HOSTLINK_WS_DELIVERY_ENABLED)", count=len(self._held),
            )
            return
        held, self._held = self._held, []
        for spec in held:
            self._enqueue(spec)

    def _enqueue(self, spec: Any) -> None:
        if self._released and self.runner is not None:
            self.runner.submit(spec)
        else:
            self._held.append(spec)

    def _say(self, channel: Channel, kind: str, task_id: str, attempt_id: str) -> None:
        channel.send_if_open(
            make_envelope(kind, self.agent_id, {}, now=self._clock.seconds(),
                          task_id=task_id, execution_attempt_id=attempt_id)
        )

    def _refuse(self, channel: Channel, envelope: Envelope, code: str, message: str,
                *, retryable: bool) -> None:
        self.log.warn(
            "refusing task.deliver task_id={task_id} attempt={attempt}: {code}",
            task_id=envelope.task_id, attempt=envelope.execution_attempt_id, code=code,
        )
        channel.send_if_open(
            make_envelope(
                ERROR, self.agent_id,
                error_payload(code, message, retryable, related_message_id=envelope.message_id),
                now=self._clock.seconds(),
                task_id=envelope.task_id, execution_attempt_id=envelope.execution_attempt_id,
            )
        )

    # -- sessions (SessionListener) ----------------------------------------------------

    def session_started(self, session: Session) -> None:
        """Apply the hello_ack's directives in order, then replay (§7.2)."""
        self._session = session
        on_ack = session.handlers[ACK]

        def ack(envelope: Envelope) -> None:
            on_ack(envelope)
            payload = AckPayload.from_dict(envelope.payload)
            if payload.acked_type in _UNSTORED:
                # Never in the outbox: no store transaction and recount for it
                # (two turns of the store's one thread, ahead of the next write).
                return
            self.outbox.acked(payload.acked_message_id, payload.highest_output_sequence)

        session.handlers[ACK] = ack
        on_error = session.on_retryable_error

        def retryable(envelope: Envelope, error: ErrorPayload) -> None:
            on_error(envelope, error)
            if error.code == ERROR_OUTPUT_SEQUENCE_GAP:
                self._gap(error)

        session.on_retryable_error = retryable
        try:
            assert session.hello_ack is not None
            directives = HelloAckDirectives.from_dict(session.hello_ack.payload)
        except (AssertionError, ProtocolError) as e:
            self.log.warn("ignoring the hello_ack's directives: {error}", error=str(e))
            directives = HelloAckDirectives(acked_message_id=session.hello_id,
                                            acked_type="agent.hello")
        self.peer_delivery_enabled = directives.delivery_enabled
        d = self._track(self._activate(session, directives))
        d.addErrback(lambda f: self.log.failure("cannot activate the task session", f))

    @inlineCallbacks
    def _activate(
        self, session: Session, directives: HelloAckDirectives
    ) -> Generator[Deferred[Any], Any, None]:
        if self.available:
            try:
                if directives.acknowledged_final_message_ids:
                    yield self._track(
                        self.store.ack_finals(directives.acknowledged_final_message_ids)
                    )
                for discarded in directives.discarded_attempts:
                    yield self._discard(discarded.task_id, discarded.execution_attempt_id,
                                        discarded.reason)
                for replay in directives.output_replay:
                    if replay.next_sequence > 1:
                        yield self._track(self.store.ack_through(
                            replay.task_id, replay.execution_attempt_id, replay.stream,
                            replay.next_sequence - 1,
                        ))
                yield self.spool.recount()
                self.spool.check()
            except StoreError as e:
                self.log.error("cannot apply the hello_ack's directives: {error}",
                               error=str(e))
        self._release()
        if session.ended is not None or not self.settings.results_enabled:
            return
        self.outbox.attach(session)
        later, self._after_activation = self._after_activation, []
        yield self.outbox.when_idle()
        for final in later:
            self.outbox.send_now(final, "redelivery")

    def _discard(self, task_id: str, attempt_id: str, reason: str) -> Deferred[Any]:
        key = (task_id, attempt_id)
        self._http.discard(key)
        self._held = [s for s in self._held if (s.task_id, s.attempt_id) != key]
        if self.runner is not None:
            self.runner.discard(task_id, attempt_id)
        self._live.pop(key, None)
        self.log.info(
            "attempt discarded by the control plane task_id={task_id} attempt={attempt} "
            "reason={reason}", task_id=task_id, attempt=attempt_id, reason=reason,
        )
        return self._track(self.store.discard(task_id, attempt_id))

    def session_ended(self, session: Session, reason: str) -> None:
        """The session ended: stop sending on it."""
        self.outbox.detach(session)
        if self._session is session:
            self._session = None
            self._after_activation.clear()

    def _gap(self, error: ErrorPayload) -> None:
        if error.highest_accepted_sequence is None or not error.related_message_id:
            self.log.warn("an output_sequence_gap error without its fields: nothing re-sent")
            return
        above = error.highest_accepted_sequence

        def resend(message: StoredMessage | None) -> None:
            if message is None or message.type != TASK_OUTPUT or message.stream is None:
                return  # acked meanwhile: nothing of it to re-send
            self.outbox.resend(message.task_id, message.attempt_id, message.stream, above)

        d = self._track(self.store.message(error.related_message_id))
        d.addCallbacks(resend, lambda f: self.log.error("cannot re-send output: {error}",
                                                          error=str(f.value)))

    # -- the runner's sink -------------------------------------------------------------

    def before_start(self, spec: Any) -> Deferred[bool]:
        """Commit ``running`` before the process is spawned (§8.3)."""
        d = self._track(self.store.mark_running(spec.task_id, spec.attempt_id,
                                                self._clock.seconds()))

        def failed(failure: Failure) -> bool:
            self.log.error("cannot start task_id={task_id}: {error}", task_id=spec.task_id,
                           error=str(failure.value))
            return False

        return d.addErrback(failed)

    def started(self, spec: Any, pid: int) -> None:
        """The process runs: record its group, say ``task.started``."""
        # Only now: the runner calls this for spawned, not discarded attempts.
        self._live[(spec.task_id, spec.attempt_id)] = _Live()
        identity = process_identity(pid, self._boot_id)
        self._track(self.store.set_process(spec.task_id, spec.attempt_id, pid, identity)
                    ).addErrback(lambda f: None)
        session = self._session
        if session is not None and session.ended is None and spec.attempt_id:
            session.send(make_envelope(TASK_STARTED, self.agent_id, {},
                                       now=self._clock.seconds(), task_id=spec.task_id,
                                       execution_attempt_id=spec.attempt_id))

    def output(self, spec: Any, stream: str, chunk: bytes, truncated_locally: bool) -> None:
        """Store one chunk (it is sent from the store, §8.4)."""
        live = self._live.get((spec.task_id, spec.attempt_id))
        if live is None:
            return  # discarded meanwhile
        if (spec.task_id, spec.attempt_id) in self._http:
            return  # the HTTP report carries the final's output only (§9.1)
        live.sequences[stream] += 1
        sequence = live.sequences[stream]
        message_id = task_message_id(spec.task_id, spec.attempt_id, stream, sequence,
                                     time.time_ns())
        payload = output_payload(stream, chunk, truncated_locally)
        self.spool.output_issued(len(chunk))
        d = self._track(self.store.enqueue_output(
            spec.task_id, spec.attempt_id, message_id, stream, sequence, payload, len(chunk),
            self._clock.seconds(),
        ))
        size = len(chunk)

        def landed(result: object) -> object:
            self.spool.output_landed(size)
            return result

        d.addBoth(landed)
        d.addCallbacks(lambda _: self.outbox.nudge(), self._write_failed)

    def ended(self, spec: Any, result: Any) -> None:
        """Record the final, then send it (§8.5)."""
        key = (spec.task_id, spec.attempt_id)
        self._live.pop(key, None)
        if not spec.attempt_id:
            # A polled task without an attempt id: its final only ever goes by
            # HTTP (§9.2), so its id is local, not §7.6's.
            message_id = (interrupted_message_id(spec.task_id, "")
                          if result.status == "interrupted"
                          else f"http-final-{spec.task_id}-{time.time_ns()}")
        elif result.status == "interrupted":
            message_id = interrupted_final_message_id(spec.task_id, spec.attempt_id)
        else:
            message_id = task_message_id(spec.task_id, spec.attempt_id, FINAL_MESSAGE_KIND, 0,
                                         time.time_ns())
        # Encoded, the texts can be six times their bytes: keep the message sendable.
        payload = fit_final(result.final_payload(),
                            self.settings.max_message_bytes - ENVELOPE_ALLOWANCE)
        self._count_end(spec.task_id, spec.attempt_id, payload, result.duration)
        self.spool.final_issued()
        d = self._track(self.store.record_final(
            spec.task_id, spec.attempt_id, message_id, payload, self._clock.seconds(),
        ))

        def stored(message: StoredMessage) -> None:
            if message.message_id not in (message_id, distinct_final_id(message_id, *key)):
                # The attempt had ended already: its first final stays, counted once.
                self.spool.final_existed()
                return
            self.spool.final_stored(message.byte_count)
            if key in self._http:
                self._http.discard(key)
                if self.http_results is not None:
                    self.http_results.send(message)
                return
            self.outbox.nudge()

        d.addCallbacks(stored, self._write_failed)

    def _write_failed(self, failure: Failure) -> None:
        self.log.error("cannot store task output: {error}", error=str(failure.value))
        # The spool counted the message when it was issued and no ack will
        # ever take it out: read the true totals back, or output could stay
        # paused for the rest of the session.
        self.spool.recount_soon()

    # -- counts for the status page ----------------------------------------------------

    def _count_end(self, task_id: str, attempt_id: str, payload: dict[str, Any],
                   duration: float | None) -> None:
        status = payload.get("status")
        self.finished[str(status)] += 1
        self._observers.notify(ClientEvent(TASK_ENDED, {
            "task_id": task_id, "execution_attempt_id": attempt_id, "status": status,
            "exit_code": payload.get("exit_code"), "duration": duration,
        }))

    def _resent(self, reason: str, message: StoredMessage) -> None:
        self._observers.notify(ClientEvent(OUTBOX_RESENT, {
            "reason": reason, "type": message.type, "message_id": message.message_id,
        }))

    # -- the spool's counts, for the status page and the hello --------------------------

    @property
    def spool_bytes(self) -> int:
        """Unacked bytes in the outbox (§7.1 ``bytes_used``), in step with the store."""
        return self.spool.bytes

    @property
    def pending_messages(self) -> int:
        """Unacked messages in the outbox."""
        return self.spool.messages

    @property
    def output_paused(self) -> bool:
        """Whether the spool is full and task output is not read."""
        return self.spool.paused


def build_tasks(settings: Any, client: Any, reactor: Any) -> tuple[TaskEngine, Any]:
    """The engine and runner of ``client`` (a :class:`~hostlink_tw.agent.client.HostlinkClient`),
    wired together and into the client; neither is started.

    The store is used when delivery or results are enabled, or when its file
    exists already (what it holds is still owed to the control plane).
    Polled tasks need it: without it they are not taken in (§9.2).
    """
    from hostlink_tw.agent.runner import TaskRunner, TaskSpec

    path = settings.local_store_path
    threshold = chunk_threshold(settings.output_flush_threshold, settings.max_message_bytes)
    if threshold < settings.output_flush_threshold:
        _log.warn(
            "task output chunks of {threshold} bytes could exceed HOSTLINK_WS_MAX_MESSAGE_BYTES "
            "({limit}) once escaped: cutting them at {used} bytes",
            threshold=settings.output_flush_threshold, limit=settings.max_message_bytes,
            used=threshold,
        )
    # A polled task is recorded before it runs (§9.2): without the store
    # (both flags off, no file) the HTTP paths run but take no task in.
    use_store = settings.delivery_enabled or settings.results_enabled or os.path.exists(path)
    engine = TaskEngine(
        TaskStore(path, reactor),
        TaskSettings.from_settings(settings),
        agent_id=client.agent_id,
        clock=reactor,
        make_spec=TaskSpec,
        use_store=use_store,
    )
    runner = TaskRunner(
        engine,
        reactor=reactor,
        concurrency=settings.task_concurrency,
        timeout=settings.task_timeout,
        kill_grace=settings.task_kill_grace,
        flush_threshold=threshold,
        flush_interval=settings.output_flush_interval,
        output_limit=settings.task_output_limit_bytes,
        final_output_bytes=settings.task_final_output_bytes,
        workdir=settings.task_workdir,
        before_start=engine.before_start,
    )
    runner.setName("tasks")  # type: ignore[no-untyped-call]
    engine.attach_runner(runner)
    emit = getattr(client, "emit", None)
    if emit is not None:  # a client-like without events (a test's fake) gets none
        engine.add_observer(emit)
    client.tasks = engine
    client.add_session_listener(engine)
    return engine, runner
