"""
The phase-2 fuzz driver (no test cases here): a real agent session with its
task engine, driven message by message by a hostile control plane.

What runs is the product's own code, in memory and on one ``Clock``:
:class:`~hostlink_tw.agent.client.HostlinkClient` (through
:class:`tests.fuzz_support.Driver`), :class:`~hostlink_tw.agent.tasks.TaskEngine`
with its outbox and spool, the real :class:`~hostlink_tw.agent.runner.TaskRunner`
and the real SQLite store; only the store's thread and the task processes
are the fuzzer's (tests/fuzz_tasks_fakes.py).

The control plane's messages are data resolved when sent (:class:`Deliver`,
:class:`AckOf`, :class:`HelloAck`, :class:`ErrorOf`, with :class:`Ref` and
:class:`Seq` naming what the agent sent so far), and so are the tasks' and
the store's steps (:class:`Emit`, :class:`Exit`, :class:`StoreStep`,
:class:`StoreHeld`) and :class:`Reconnect`.  :class:`TaskDriver` runs them
and checks, besides phase 1's invariants: no attempt is spawned twice
(unless a discard the control plane directed deleted it in between), nothing
is logged at error level or as a failure, no store call fails, and at the
end (:meth:`TaskDriver.check_outbox`) every message the agent stored in its
outbox is acked by the control plane, discarded by its direction, or sent
again, with the same id, payload and sequence, on a fresh session.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import LogEvent, Logger, LogLevel

from hostlink_tw.agent.runner import TaskRunner, TaskSpec
from hostlink_tw.agent.session import Session
from hostlink_tw.agent.tasks import TaskEngine, TaskSettings
from hostlink_tw.client import CLOSE_TIMEOUT
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    ProtocolError,
    make_envelope,
)
from hostlink_tw.wire.hello import HelloAckDirectives
from hostlink_tw.wire.vocabulary import TASK_FINAL, TASK_OUTPUT

from .fuzz_support import NOW, Driver, Handshake, Line, Message, Send, Step
from .fuzz_tasks_fakes import FakeProcess, Oracle, ProcessFactory, QueuedStore
from .test_client_support import AGENT

__all__ = [
    "ATTEMPT_IDS", "DELETE", "TASK_IDS", "TASK_MAX_BYTES", "AckOf", "Deliver", "Emit",
    "ErrorOf", "Exit", "HelloAck", "Reconnect", "Ref", "Seq", "StoreHeld", "StoreStep",
    "TaskConfig", "TaskDriver",
]

#: The phase-2 harness's message limit: the hello's snapshot needs room (4 KiB of envelope).
TASK_MAX_BYTES = 16 * 1024

#: Task and attempt ids the fuzzer's control plane uses: few, so duplicates are
#: common; some differ only where §7.6's id form maps ``/``, `` `` and ``|`` to ``-``.
TASK_IDS = ("t0", "t1", "t-x", "t", "t/x")
ATTEMPT_IDS = ("a0", "a1", "x-a0", "a")

#: Store calls run per :meth:`TaskDriver.settle` at most (a loop that never ends is a failure).
MAX_STORE_CALLS = 20_000


# --- what the fuzzer's control plane sends, as data ------------------------------------


@dataclass(frozen=True)
class Ref:
    """A message id chosen when the message is sent.

    ``how``: ``output``/``final``/``any`` (the ``index``-th, modulo, of the
    agent's messages of that kind so far), ``unknown``, ``prefix`` or
    ``suffix`` (a near miss of such an id), ``empty``.
    """

    how: str
    index: int = 0


@dataclass(frozen=True)
class Seq:
    """A sequence number: ``none`` (absent), ``rel`` (the referenced output's
    sequence plus ``value``) or ``abs`` (``value`` itself)."""

    how: str = "none"
    value: int = 0


Mutation = tuple[str, str, Any]


@dataclass(frozen=True)
class Deliver:
    """A ``task.deliver`` of (``TASK_IDS[task]``, ``ATTEMPT_IDS[attempt]``), then
    mutated; ``pad`` spaces make it oversized."""

    task: int
    attempt: int
    command: str = "echo hi"
    mutations: tuple[Mutation, ...] = ()
    pad: int = 0


@dataclass(frozen=True)
class AckOf:
    """An ``ack`` of ``target``, cumulative up to ``highest`` when it is given."""

    target: Ref
    highest: Seq = Seq()
    acked_type: str = TASK_OUTPUT
    mutations: tuple[Mutation, ...] = ()


@dataclass(frozen=True)
class HelloAck:
    """An ``agent.hello_ack`` of this connection's hello (``near_miss``: of
    something else) with phase-2 directives (§7.2)."""

    finals: tuple[Ref, ...] = ()
    discards: tuple[tuple[int, int], ...] = ()
    replays: tuple[tuple[Ref, Seq], ...] = ()
    delivery_enabled: bool = True
    mutations: tuple[Mutation, ...] = ()
    near_miss: bool = False


@dataclass(frozen=True)
class ErrorOf:
    """An ``error``; code ``output_sequence_gap`` with ``related`` and
    ``highest`` is §7.5's gap error."""

    code: str
    retryable: Any
    related: Ref = Ref("empty")
    highest: Seq = Seq()


TaskContent = Deliver | AckOf | HelloAck | ErrorOf


@dataclass(frozen=True)
class StoreStep:
    """Complete ``count`` of the store's waiting calls, oldest first (0: all of them)."""

    count: int


@dataclass(frozen=True)
class StoreHeld:
    """From now on, the store's calls complete only at :class:`StoreStep`
    (``held``), or after every step (not ``held``: the default)."""

    held: bool


@dataclass(frozen=True)
class Emit:
    """The ``index``-th (modulo) running process prints ``data`` on ``stream``,
    ``count`` times (while its output is not paused)."""

    index: int
    stream: str
    data: bytes
    count: int = 1


@dataclass(frozen=True)
class Exit:
    """The ``index``-th (modulo) running process ends with ``exit_code`` (``None``: killed)."""

    index: int
    exit_code: int | None


@dataclass(frozen=True)
class Reconnect:
    """The connection ends; the next one is accepted and its hello answered with ``ack``
    (none: left waiting)."""

    ack: HelloAck | None


TaskStep = Step | Reconnect | StoreStep | StoreHeld | Emit | Exit


# --- the driver --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """The engine's settings for one example."""

    concurrency: int = 1
    queue_limit: int = 3
    spool_cap: int = 8192


class TaskDriver(Driver):
    """:class:`tests.fuzz_support.Driver` with the task engine wired into the client."""

    def __init__(self, factory: ProcessFactory, directory: str,
                 handshakes: tuple[Handshake, ...] = (), config: TaskConfig = TaskConfig(),
                 make_engine: Callable[..., TaskEngine] = TaskEngine) -> None:
        super().__init__(handshakes, max_bytes=TASK_MAX_BYTES)
        factory.owner = self
        self.oracle = Oracle()
        self.processes: list[FakeProcess] = []
        #: Whether store calls wait for a :class:`StoreStep`.
        self.held = False
        self.task_logged: list[LogEvent] = []
        log = Logger(namespace="fuzz.tasks", observer=self.task_logged.append)
        fd, self.path = tempfile.mkstemp(suffix=".db", dir=directory)
        os.close(fd)
        os.unlink(self.path)
        self.store = QueuedStore(self.path, self.oracle.journal)
        self.engine = make_engine(
            self.store,
            TaskSettings(delivery_enabled=True, results_enabled=True,
                         spool_cap_bytes=config.spool_cap, terminal_reserve_bytes=1024,
                         flush_threshold=1024, retention=10**9,
                         queue_limit=config.queue_limit, concurrency=config.concurrency,
                         kill_grace=1.0, max_message_bytes=TASK_MAX_BYTES),
            agent_id=AGENT, clock=self.h.reactor, make_spec=TaskSpec, log=log,
            boot_id="boot-fuzz", kill=lambda pgid, sig: None,
        )
        self.runner = TaskRunner(self.engine, reactor=self.h.reactor,
                                 concurrency=config.concurrency, flush_threshold=1024,
                                 before_start=self.engine.before_start, log=log)
        self.engine.attach_runner(self.runner)
        self.h.client.tasks = self.engine
        self.h.client.add_session_listener(self.engine)
        self.h.client.add_session_listener(self)
        self.started = self.engine.start()
        self.settle()
        assert self.started.called, "the engine did not start"
        self.runner.startService()  # type: ignore[no-untyped-call]

    # -- the oracle's inputs ---------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        """A session began: its hello_ack's directives are what the control plane directed."""
        assert session.hello_ack is not None
        try:
            self.oracle.activated(HelloAckDirectives.from_dict(session.hello_ack.payload))
        except ProtocolError:
            pass  # the engine ignores them too (and says so)

    def session_ended(self, session: Session, reason: str) -> None:
        """Nothing to note."""

    def spawned(self, process: FakeProcess) -> None:
        """The runner started an attempt's process."""
        key = (process.spec.task_id, process.spec.attempt_id)
        if any((p.spec.task_id, p.spec.attempt_id) == key and not p.done.called
               for p in self.processes):
            # Even a new attempt (discarded, delivered again) waits for the old one's kill.
            self.violations.append(f"attempt {key} spawned while an earlier run of it runs")
        self.processes.append(process)
        problem = self.oracle.may_spawn(key)
        if problem:
            self.violations.append(problem)

    def sent(self) -> dict[str, dict[str, Any]]:
        """Every envelope the agent wrote, on any connection, by message id (the last copy)."""
        out: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            for doc in line.conn.texts():
                out[str(doc.get("message_id"))] = doc
        return out

    # -- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """Phase 1's invariants, and phase 2's that hold between any two inputs."""
        super().check()
        bad = [
            e for e in self.task_logged
            if e.get("log_failure") is not None
            or e["log_level"] in (LogLevel.error, LogLevel.critical)
        ]
        assert not bad, bad
        assert not self.oracle.failed, self.oracle.failed

    # -- steps -----------------------------------------------------------------------------

    def run(self, steps: list[Any]) -> None:
        """Perform each step (phase 1's and the tasks'), checking after each one;
        unless the store is held, its calls complete after each step."""
        for step in steps:
            if isinstance(step, StoreStep):
                self.settle(step.count or MAX_STORE_CALLS)
            elif isinstance(step, StoreHeld):
                self.held = step.held
            elif isinstance(step, Emit):
                process = self._process(step.index)
                for _ in range(step.count):
                    if process is None or process.paused or process.done.called:
                        break
                    process.on_output(step.stream, step.data, False)
            elif isinstance(step, Exit):
                process = self._process(step.index)
                if process is not None:
                    code = -1 if step.exit_code is None else step.exit_code
                    process.end("completed" if code == 0 else "failed", code, "out")
            elif isinstance(step, Reconnect):
                self._reconnect(step.ack)
            elif isinstance(step, Send) and self._answers_hello(step):
                self._await_hello()
                super().run([step])
            else:
                super().run([step])
            if not self.held:
                self.settle()
            self.check()
            self._handshake()

    def _process(self, index: int) -> FakeProcess | None:
        running = [p for p in self.processes if not p.done.called]
        return running[index % len(running)] if running else None

    @staticmethod
    def _answers_hello(step: Send) -> bool:
        return any(isinstance(i, Message) and isinstance(i.content, HelloAck) for i in step.items)

    def _await_hello(self) -> None:
        """A control plane answers a hello once it has it: let the store build it."""
        line = self._live()
        while line is not None and line.hello() is None and self.store.calls:
            self.settle(1)

    def settle(self, limit: int = MAX_STORE_CALLS) -> int:
        """Complete up to ``limit`` waiting store calls (and those they cause); the count."""
        done = 0
        while done < limit and self.store.run_one():
            done += 1
        if limit >= MAX_STORE_CALLS:
            assert not self.store.calls, f"the store still has calls after {done}: a loop?"
        return done

    # -- rendering the control plane's messages --------------------------------------------

    def render_content(self, content: Any, line: Line, hello_id: str) -> bytes:
        """Phase 2's contents, resolved against what the agent sent so far."""
        if isinstance(content, Deliver):
            doc = _doc(make_envelope(
                TASK_DELIVER, AGENT, {"command": content.command}, now=NOW,
                task_id=TASK_IDS[content.task % len(TASK_IDS)],
                execution_attempt_id=ATTEMPT_IDS[content.attempt % len(ATTEMPT_IDS)],
            ))
            return _encode(_mutate(doc, content.mutations), content.pad)
        if isinstance(content, AckOf):
            sent = self.sent()
            target = self._ref(content.target, sent)
            payload: dict[str, Any] = {"acked_message_id": target,
                                       "acked_type": content.acked_type}
            highest = self._seq(content.highest, target, sent)
            if highest is not None:
                payload["highest_output_sequence"] = highest
            doc = _mutate(_doc(make_envelope(ACK, AGENT, payload, now=NOW)), content.mutations)
            self._note_ack(doc)
            return _encode(doc)
        if isinstance(content, HelloAck):
            return self._hello_ack(content, hello_id)
        if isinstance(content, ErrorOf):
            sent = self.sent()
            related = self._ref(content.related, sent)
            payload = {"code": content.code, "message": "fuzz", "retryable": content.retryable,
                       "related_message_id": related}
            highest = self._seq(content.highest, related, sent)
            if highest is not None:
                payload["highest_accepted_sequence"] = highest
            return json.dumps(_doc(make_envelope(ERROR, AGENT, payload, now=NOW))).encode()
        return super().render_content(content, line, hello_id)

    def _note_ack(self, doc: dict[str, Any]) -> None:
        """What an ack (as it will be sent, mutations and all) acks, by a lenient reading:
        the oracle may count an ack the agent refuses (that message is then
        sent again anyway), never miss one it takes."""
        payload = doc.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("acked_message_id"), str):
            return
        self.oracle.acked.add(payload["acked_message_id"])
        highest = payload.get("highest_output_sequence")
        if isinstance(highest, int) and not isinstance(highest, bool):
            self.oracle.cumulative.append((payload["acked_message_id"], highest))

    def _hello_ack(self, content: HelloAck, hello_id: str) -> bytes:
        sent = self.sent()
        replays = []
        for ref, seq in content.replays:
            doc = sent.get(self._ref(ref, sent), {})
            replays.append({
                "task_id": doc.get("task_id", "t0"),
                "execution_attempt_id": doc.get("execution_attempt_id", "a0"),
                "stream": doc.get("payload", {}).get("stream", "stdout"),
                "next_sequence": self._seq(seq, str(doc.get("message_id")), sent) or 1,
            })
        payload = {
            "acked_message_id": "msg_0" if content.near_miss else hello_id,
            "acked_type": AGENT_HELLO,
            "acknowledged_final_message_ids": [self._ref(r, sent) for r in content.finals],
            "discarded_attempts": [
                {"task_id": TASK_IDS[t % len(TASK_IDS)],
                 "execution_attempt_id": ATTEMPT_IDS[a % len(ATTEMPT_IDS)], "reason": "fuzz"}
                for t, a in content.discards
            ],
            "output_replay": replays,
            "delivery_enabled": content.delivery_enabled,
        }
        doc = _doc(make_envelope(AGENT_HELLO_ACK, AGENT, payload, now=NOW))
        return _encode(_mutate(doc, content.mutations))

    @staticmethod
    def _ref(ref: Ref, sent: dict[str, dict[str, Any]]) -> str:
        kinds = {"output": (TASK_OUTPUT,), "final": (TASK_FINAL,)}.get(
            ref.how, (TASK_OUTPUT, TASK_FINAL))
        ids = [m for m, doc in sent.items() if doc.get("type") in kinds]
        if ref.how == "unknown":
            return "msg-unknown"
        if ref.how == "empty":
            return ""
        if not ids:
            return "msg-none-yet"
        chosen = ids[ref.index % len(ids)]
        return {"prefix": chosen[:-1], "suffix": chosen + "0"}.get(ref.how, chosen)

    @staticmethod
    def _seq(seq: Seq, target: str, sent: dict[str, dict[str, Any]]) -> int | None:
        if seq.how == "none":
            return None
        if seq.how == "abs":
            return seq.value
        base = sent.get(target, {}).get("sequence")
        return (base if isinstance(base, int) else 0) + seq.value

    # -- the end ---------------------------------------------------------------------------

    def check_outbox(self) -> None:
        """
        No outbox message lost: on a fresh session, with a plain hello_ack,
        the agent sends again every stored message the control plane did not
        ack or discard -- same id, same payload.
        """
        self.settle()
        line = self._fresh_session()
        self.settle()
        replayed = {str(d["message_id"]): d for d in line.conn.texts()
                    if d.get("type") in (TASK_OUTPUT, TASK_FINAL)}
        sent = self.sent()
        lost = []
        for message_id, (message, at) in self.oracle.stored.items():
            if self.oracle.excused(message, at, sent):
                continue
            doc = replayed.get(message_id)
            if doc is None:
                lost.append(f"{message.type} {message_id} of {message.task_id}/"
                            f"{message.attempt_id} seq={message.sequence}")
                continue
            assert doc["payload"] == message.payload, (message_id, doc, message.payload)
            assert doc.get("sequence") == message.sequence, (message_id, doc)
        assert not lost, f"outbox messages lost: {lost}"
        self.check()

    def _fresh_session(self) -> Line:
        """A new connection, activated by a hello_ack without directives."""
        line = self._reconnect(HelloAck())
        assert line is not None and self.h.client.is_active, "no fresh session"
        return line

    def _reconnect(self, ack: HelloAck | None) -> Line | None:
        """End the connection; accept the next and answer its hello with ``ack``."""
        line = self._live()
        if line is not None:
            line.conn.lose()  # whatever it was doing, the connection ends
        for _ in range(20):
            self.h.client.start()  # a no-op unless the client is stopped
            self.check()
            self._handshake()
            line = self._live()
            if line is not None:
                self._await_hello()
                if line.hello() is None or ack is None:
                    return line
                self.run([Send((Message(ack),))])
                line = self._live()
                if line is not None:
                    return line
            self.h.reactor.advance(max(self.h.settings.reconnect_max, CLOSE_TIMEOUT))
        raise AssertionError("no new connection within 20 attempts")

    def remove_files(self) -> None:
        """Delete the store's files (once the engine is closed)."""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.unlink(self.path + suffix)

    def finish_tasks(self) -> None:
        """Stop the runner and close the engine (before the client stops, as the service does)."""
        stopped = self.runner.stopService()  # type: ignore[no-untyped-call]
        self.settle()
        assert stopped.called, "the runner did not stop"
        closed = self.engine.close()
        self.settle()
        assert closed.called, "the engine did not close"
        self.check()


def _doc(envelope: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(envelope.to_json())
    return doc


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def _mutate(doc: dict[str, Any], mutations: tuple[Mutation, ...]) -> dict[str, Any]:
    for where, name, value in mutations:
        target = doc if where == "top" else doc.setdefault("payload", {})
        if not isinstance(target, dict):
            continue
        if value is DELETE:
            target.pop(name, None)
        else:
            target[name] = value
    return doc


def _encode(doc: dict[str, Any], pad: int = 0) -> bytes:
    text = json.dumps(doc, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: escaped (``"\\ud800"``), it is valid UTF-8 and JSON,
        # and only the envelope's own check refuses it.
        data = json.dumps(doc).encode("ascii")
    return data + b" " * pad

