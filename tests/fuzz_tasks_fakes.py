"""
What the phase-2 fuzzer controls and what it remembers (no test cases here).

* :class:`QueuedStore` is :class:`~hostlink_tw.agent.store.TaskStore` with
  its thread replaced by a FIFO the fuzzer runs (:meth:`QueuedStore.run_one`):
  each call runs on the real ``Database`` (a file on tmpfs when there is
  one), and its Deferred fires when the fuzzer says.  The store's thread runs
  calls in order and nothing else touches the file, so this gives every
  schedule the thread can produce, no more.
* :class:`FakeProcess` stands in for a task's process group inside the real
  :class:`~hostlink_tw.agent.runner.TaskRunner` (:func:`patch_processes`): it
  spawns nothing; the fuzzer makes it print and end, and it honours the
  spool's pause.
* :class:`Oracle` is the fuzzer's control plane's memory: every store call
  as it completed, what it acked, what its hello_acks directed, every spawn;
  from it, whether an attempt ran twice and whether a message may be missing.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent import runner as runner_module
from hostlink_tw.agent.process import RunResult
from hostlink_tw.agent.runner import TaskSpec
from hostlink_tw.agent.store import StoredMessage, TaskStore
from hostlink_tw.wire.hello import HelloAckDirectives
from hostlink_tw.wire.vocabulary import TASK_OUTPUT

__all__ = ["FakeProcess", "Oracle", "ProcessFactory", "QueuedStore", "patch_processes",
           "store_directory"]

_PID_BASE = 4_000_000


def store_directory() -> str:
    """A new temporary directory for store files, on tmpfs when there is one (cheap fsyncs)."""
    shm = "/dev/shm"  # noqa: S108 - a private mkdtemp under it
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="hostlink-fuzz-", dir=parent)


# --- the store, without its thread -------------------------------------------------------


class _NoThreads:
    """The ThreadPool the queued store never starts."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


class QueuedStore(TaskStore):
    """
    The real store whose calls wait in a FIFO until :meth:`run_one` (see the
    module docstring); ``journal(name, args, result)`` hears of each call
    as it completes (``result`` a :class:`Failure` when it failed).
    """

    def __init__(self, path: str, journal: Callable[[str, tuple[Any, ...], Any], None]) -> None:
        super().__init__(path, reactor=_NotAReactor())
        self._pool = _NoThreads()  # type: ignore[assignment]
        self.calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = deque()
        self._journal = journal

    def _call(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((fn, args, d))
        return d

    def _use(self, name: str, *args: Any) -> Deferred[Any]:
        return self._journaled(name, args, super()._use(name, *args))

    def enqueue_output(self, *args: Any) -> Deferred[StoredMessage]:
        # Chunks bypass _use: they are committed in groups (storebatch).
        return self._journaled("enqueue_output", args, super().enqueue_output(*args))

    def _journaled(self, name: str, args: tuple[Any, ...], d: Deferred[Any]) -> Deferred[Any]:
        def record(result: object) -> object:
            self._journal(name, args, result)
            return result

        return d.addBoth(record)  # first: it runs as the call completes

    def run_one(self) -> bool:
        """Run the oldest waiting call and fire its Deferred; False when none waits."""
        if not self.calls:
            return False
        fn, args, d = self.calls.popleft()
        try:
            result = fn(*args)
        except BaseException:  # noqa: BLE001 - the thread would deliver it as a failure
            d.errback(Failure())
        else:
            d.callback(result)
        return True


class _NotAReactor:
    """The store's reactor, never used: calls do not cross threads here."""


# --- the task processes ------------------------------------------------------------------


class ProcessOwner(Protocol):
    """Who hears of each spawn (the driver)."""

    processes: list[FakeProcess]

    def spawned(self, process: FakeProcess) -> None:
        """The runner started ``process``."""


class FakeProcess:
    """A task's process group, as the runner sees it (``TaskProcess``'s interface)."""

    def __init__(self, owner: ProcessOwner, spec: TaskSpec, settings: Any, reactor: Any,
                 on_output: Callable[[str, bytes, bool], None], log: Logger) -> None:
        self.owner = owner
        self.reactor = reactor
        self.spec = spec
        self.on_output = on_output
        self.pid: int | None = None
        self.started_at = 0.0
        self.paused = False
        self.done: Deferred[RunResult] = Deferred()

    def spawn(self, argv: list[str], environ: Any, path: str | None, paused: bool) -> None:
        """The runner starts the attempt: the one moment the invariant counts."""
        self.paused = paused
        self.pid = _PID_BASE + len(self.owner.processes)
        self.started_at = self.reactor.seconds()
        self.owner.spawned(self)
        if "\x00" in self.spec.command:
            self.done.callback(None)  # never ran: not among the running ones
            raise ValueError("embedded null byte")  # as spawnProcess raises

    def pause(self) -> None:
        """The spool is full: the pipes are not read."""
        self.paused = True

    def resume(self) -> None:
        """The pipes are read again."""
        self.paused = False

    def interrupt(self) -> None:
        """Discarded or stopped: the group is killed and ends ``interrupted``."""
        self.end("interrupted", -1)

    def end(self, status: str, exit_code: int, text: str = "") -> None:
        """The last process of the group is gone."""
        if not self.done.called:
            self.done.callback(RunResult(status, exit_code, text, "", False, False, 0.0,
                                         None, False))


class ProcessFactory:
    """What the runner's ``TaskProcess`` is patched with: processes of the current driver."""

    def __init__(self) -> None:
        #: The driver whose runner spawns now.
        self.owner: ProcessOwner | None = None

    def __call__(self, spec: TaskSpec, settings: Any, reactor: Any,
                 on_output: Callable[[str, bytes, bool], None], log: Logger) -> FakeProcess:
        assert self.owner is not None, "no task driver is running"
        return FakeProcess(self.owner, spec, settings, reactor, on_output, log)


def patch_processes(test: Any) -> ProcessFactory:
    """Patch the runner's process class for ``test`` (trial's ``patch``); drivers register."""
    factory = ProcessFactory()
    test.patch(runner_module, "TaskProcess", factory)
    return factory




# --- the oracle --------------------------------------------------------------------------


@dataclass
class Oracle:
    """What the fuzzer's control plane did and saw (see the module docstring)."""

    #: Store calls completed so far (the journal's clock).
    calls: int = 0
    #: Every outbox message the store took in: id -> (message, call number).
    stored: dict[str, tuple[StoredMessage, int]] = field(default_factory=dict)
    #: Discards the store carried out: (task, attempt) -> call numbers.
    discards_run: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: Attempts an activating hello_ack told the agent to discard.
    discards_directed: set[tuple[str, str]] = field(default_factory=set)
    #: Message ids acked one by one (``ack``, or a hello_ack's finals list).
    acked: set[str] = field(default_factory=set)
    #: Cumulative acks: (acked message id, highest sequence).
    cumulative: list[tuple[str, int]] = field(default_factory=list)
    #: ``output_replay`` directives: (task, attempt, stream, next sequence).
    replays: list[tuple[str, str, str, int]] = field(default_factory=list)
    #: The store call number of each attempt's last spawn.
    spawns: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Store calls that failed.
    failed: list[str] = field(default_factory=list)

    def journal(self, name: str, args: tuple[Any, ...], result: Any) -> None:
        """A store call completed (:class:`QueuedStore`'s journal)."""
        self.calls += 1
        if isinstance(result, Failure):
            self.failed.append(f"{name}: {result.getErrorMessage()}")
            return
        # record_final answers with the attempt's first final when it has one.
        fresh = name == "record_final" and result.message_id not in self.stored
        if name == "enqueue_output" or fresh:
            self.stored[result.message_id] = (result, self.calls)
        elif name == "discard":
            self.discards_run.setdefault((args[0], args[1]), []).append(self.calls)

    def activated(self, directives: HelloAckDirectives) -> None:
        """A session began with these directives."""
        self.acked.update(directives.acknowledged_final_message_ids)
        for d in directives.discarded_attempts:
            self.discards_directed.add((d.task_id, d.execution_attempt_id))
        for r in directives.output_replay:
            self.replays.append((r.task_id, r.execution_attempt_id, r.stream, r.next_sequence))

    def may_spawn(self, key: tuple[str, str]) -> str | None:
        """Why spawning the attempt ``key`` now runs it twice (None: it may run)."""
        before = self.spawns.get(key)
        self.spawns[key] = self.calls
        if before is None:
            return None
        if self._discarded_after(key, before):
            return None  # discarded as directed, delivered again: a new run (§8.2)
        return f"attempt {key} spawned again (first after store call {before})"

    def _discarded_after(self, key: tuple[str, str], call: int) -> bool:
        """Whether a directed discard of ``key`` ran in the store after store call ``call``."""
        return key in self.discards_directed and any(
            c > call for c in self.discards_run.get(key, [])
        )

    def excused(self, message: StoredMessage, at: int, sent: dict[str, dict[str, Any]]) -> bool:
        """Whether the control plane acked ``message`` or had it discarded."""
        key = (message.task_id, message.attempt_id)
        if message.message_id in self.acked:
            return True
        if self._discarded_after(key, at):
            return True
        if message.type != TASK_OUTPUT or message.sequence is None:
            return False
        for task, attempt, stream, next_sequence in self.replays:
            same = (task, attempt, stream) == (*key, message.stream)
            if same and message.sequence < next_sequence:
                return True
        for acked_id, highest in self.cumulative:
            doc = sent.get(acked_id)
            if (doc is not None and doc.get("type") == TASK_OUTPUT
                    and (doc.get("task_id"), doc.get("execution_attempt_id")) == key
                    and doc.get("payload", {}).get("stream") == message.stream
                    and message.sequence <= highest):
                return True
        return False


