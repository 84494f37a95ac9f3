"""The tasks on the status page (issue 12 item 6): metrics and the ``tasks`` part of /status.

First against a fake engine (every metric, every /status field, bounded
labels and ids), then against a real engine on a temporary store: the
counts it keeps in memory match the store, its events reach the metrics,
and ``build_tasks`` passes them to the client's observers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from hostlink_tw.agent.events import ClientEvent, Observers
from hostlink_tw.agent.runner import RunningTask, TaskSpec
from hostlink_tw.agent.store import TaskStore
from hostlink_tw.agent.tasks import OUTBOX_RESENT, TASK_ENDED, TaskEngine, TaskSettings, build_tasks
from hostlink_tw.config import Settings
from hostlink_tw.status import ClientMetrics, StatusResource
from hostlink_tw.taskstatus import QUEUE_SHOWN
from hostlink_tw.wire.envelope import make_envelope
from hostlink_tw.wire.payloads import error_payload
from hostlink_tw.wire.vocabulary import ERROR, TASK_FINAL, TASK_OUTPUT
from tests.test_agent_tasks import AGENT, EngineTestCase, FakeRunner, Result, Spec, deliver

# 2026-06-01T00:00:00Z: the wall clock of these tests, far from the reactor's 1000.
WALL = 1_780_272_000.0

METRICS = (
    "hostlink_tasks_total",
    "hostlink_tasks_running",
    "hostlink_task_queue_depth",
    "hostlink_outbox_pending_messages",
    "hostlink_outbox_pending_bytes",
    "hostlink_outbox_resends_total",
    "hostlink_task_duration_seconds_bucket",
    "hostlink_task_duration_seconds_sum",
    "hostlink_task_duration_seconds_count",
    "hostlink_task_output_paused",
)


@dataclass
class FakeStore:
    path: str = "/var/lib/hostlink/task_store.db"


@dataclass
class FakeEngine:
    """What the status page reads of a TaskEngine."""

    settings: TaskSettings = field(default_factory=lambda: TaskSettings(
        delivery_enabled=True, results_enabled=False, spool_cap_bytes=4096, queue_limit=9))
    running: list[RunningTask] = field(default_factory=list)
    waiting: list[TaskSpec] = field(default_factory=list)
    store: FakeStore = field(default_factory=FakeStore)
    available: bool = True
    problem: str | None = None
    spool_bytes: int = 0
    pending_messages: int = 0
    output_paused: bool = False
    peer_delivery_enabled: bool = False

    def running_tasks(self) -> list[RunningTask]:
        return list(self.running)

    def queue_depth(self) -> int:
        return len(self.waiting)

    def queued(self, limit: int | None = None) -> list[TaskSpec]:
        return self.waiting[:limit]


class TaskSource:
    """A status source with a ``tasks`` attribute, as the service and the client have."""

    def __init__(self, tasks: Any = None) -> None:
        self.tasks = tasks
        self.observers = Observers(Logger())

    def snapshot(self) -> dict[str, Any]:
        return {"active": True, "state": "active"}

    def add_observer(self, observer: Any) -> Any:
        return self.observers.add(observer)

    def emit(self, event: ClientEvent) -> None:
        self.observers.notify(event)


def sample(metrics: ClientMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class TaskMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = FakeEngine()
        self.source = TaskSource(self.engine)
        self.clock = Clock()
        self.clock.advance(1000)
        self.metrics = ClientMetrics(self.source, wall_clock=lambda: WALL)
        self.addCleanup(self.metrics.close)
        self.root = StatusResource(self.source, self.metrics, clock=self.clock,
                                   wall_clock=lambda: WALL)

    def ended(self, status: Any, duration: Any) -> None:
        self.source.emit(ClientEvent(TASK_ENDED, {
            "task_id": "t", "execution_attempt_id": "a", "status": status, "exit_code": 0,
            "duration": duration,
        }))

    def resent(self, reason: Any) -> None:
        self.source.emit(ClientEvent(OUTBOX_RESENT, {
            "reason": reason, "type": TASK_OUTPUT, "message_id": "m",
        }))

    def get(self, path: bytes) -> tuple[int, bytes]:
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        body = getChildForRequest(self.root, request).render(request)
        return (request.responseCode or 200), body

    # -- counters and the histogram, from events --------------------------------------

    def test_tasks_total_by_status(self) -> None:
        for status in ("completed", "completed", "failed", "interrupted"):
            self.ended(status, 1.0)
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_tasks_total", status="completed"), 2)
        self.assertEqual(sample(m, "hostlink_tasks_total", status="failed"), 1)
        self.assertEqual(sample(m, "hostlink_tasks_total", status="interrupted"), 1)

    def test_duration_histogram(self) -> None:
        self.ended("completed", 0.3)
        self.ended("failed", 20.0)
        self.ended("interrupted", None)  # a restart's: no duration known
        for bad in (float("nan"), float("inf"), -1.0, True, "5"):
            self.ended("failed", bad)
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_task_duration_seconds_count"), 2)
        self.assertAlmostEqual(sample(m, "hostlink_task_duration_seconds_sum") or 0, 20.3)
        self.assertEqual(sample(m, "hostlink_task_duration_seconds_bucket", le="0.5"), 1)
        self.assertEqual(sample(m, "hostlink_task_duration_seconds_bucket", le="15.0"), 1)
        self.assertEqual(sample(m, "hostlink_task_duration_seconds_bucket", le="60.0"), 2)
        self.assertEqual(sample(m, "hostlink_task_duration_seconds_bucket", le="+Inf"), 2)
        # Every end is counted, with or without a usable duration.
        self.assertEqual(sample(m, "hostlink_tasks_total", status="failed"), 6)

    def test_resends_by_reason(self) -> None:
        for reason in ("replay", "replay", "gap", "redelivery"):
            self.resent(reason)
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_outbox_resends_total", reason="replay"), 2)
        self.assertEqual(sample(m, "hostlink_outbox_resends_total", reason="gap"), 1)
        self.assertEqual(sample(m, "hostlink_outbox_resends_total", reason="redelivery"), 1)

    def test_label_values_stay_bounded(self) -> None:
        for i in range(20):
            self.ended(f"evil-{i}", 1.0)
            self.resent(f"evil-{i}")
        m = self.metrics
        self.assertEqual(sample(m, "hostlink_tasks_total", status="other"), 20)
        self.assertEqual(sample(m, "hostlink_outbox_resends_total", reason="other"), 20)
        self.assertNotIn("evil", m.exposition().decode())

    def test_known_series_exist_from_the_start(self) -> None:
        """rate() and absent-series alerts need them before the first task ends."""
        text = self.metrics.exposition().decode()
        for status in ("completed", "failed", "interrupted"):
            self.assertIn(f'hostlink_tasks_total{{status="{status}"}} 0.0', text)
        for reason in ("replay", "gap", "redelivery"):
            self.assertIn(f'hostlink_outbox_resends_total{{reason="{reason}"}} 0.0', text)
        self.assertIn("hostlink_task_duration_seconds_count 0.0", text)

    def test_counters_outlive_the_engine(self) -> None:
        """A restarted service has a new engine; the counts go on."""
        self.ended("completed", 1.0)
        self.source.tasks = FakeEngine()
        self.ended("completed", 1.0)
        self.assertEqual(sample(self.metrics, "hostlink_tasks_total", status="completed"), 2)

    # -- gauges, from the engine at scrape time ----------------------------------------

    def test_gauges_read_the_engine_at_scrape_time(self) -> None:
        m = self.metrics
        names = ("hostlink_tasks_running", "hostlink_task_queue_depth",
                 "hostlink_outbox_pending_messages", "hostlink_outbox_pending_bytes",
                 "hostlink_task_output_paused")
        self.assertEqual([sample(m, n) for n in names], [0, 0, 0, 0, 0])
        e = self.engine
        e.running = [RunningTask(TaskSpec("t1", "a1", "x"), 4242, 990.0)]
        e.waiting = [TaskSpec(f"q{i}", "a", "x") for i in range(3)]
        e.pending_messages, e.spool_bytes, e.output_paused = 7, 1234, True
        self.assertEqual([sample(m, n) for n in names], [1, 3, 7, 1234, 1])
        # Another engine (a restarted service), then none (stopped): read anew.
        self.source.tasks = FakeEngine(pending_messages=2)
        self.assertEqual(sample(m, "hostlink_outbox_pending_messages"), 2)
        self.source.tasks = None
        self.assertEqual([sample(m, n) for n in names], [0, 0, 0, 0, 0])

    def test_metrics_endpoint_lists_every_task_metric(self) -> None:
        self.ended("completed", 2.0)
        code, body = self.get(b"/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        for name in METRICS:
            self.assertIn(f"\n{name}", text)
        self.assertNotIn("_created", text)

    # -- /status ------------------------------------------------------------------------

    def test_status_shows_running_queue_store_and_spool(self) -> None:
        e = self.engine
        e.running = [RunningTask(TaskSpec("t1", "a1", "secret command"), 4242, 990.0)]
        e.waiting = [TaskSpec(f"q{i}", f"a{i}", "x") for i in range(QUEUE_SHOWN + 2)]
        e.spool_bytes, e.pending_messages, e.output_paused = 1234, 7, True
        e.peer_delivery_enabled = True
        code, body = self.get(b"/status")
        self.assertEqual(code, 200)
        tasks = json.loads(body)["tasks"]
        self.assertEqual(tasks["running"], [{
            "task_id": "t1", "execution_attempt_id": "a1", "pid": 4242,
            "started_at": "2026-05-31T23:59:50Z",  # reactor 990 is 10 s before WALL
        }])
        self.assertEqual(tasks["queue"], {
            "depth": QUEUE_SHOWN + 2,
            "first": [{"task_id": f"q{i}", "execution_attempt_id": f"a{i}"}
                      for i in range(QUEUE_SHOWN)],
            "limit": 9,
        })
        self.assertEqual(tasks["store"], {
            "path": "/var/lib/hostlink/task_store.db", "available": True, "problem": None,
        })
        self.assertEqual(tasks["spool"], {
            "bytes_used": 1234, "byte_cap": 4096, "messages": 7, "paused": True,
        })
        self.assertEqual(
            (tasks["delivery_enabled"], tasks["results_enabled"],
             tasks["control_plane_delivery_enabled"]),
            (True, False, True),
        )
        self.assertNotIn(b"secret command", body)  # the command is never shown

    def test_status_store_problem(self) -> None:
        self.engine.available = False
        self.engine.problem = "task store /x/task_store.db is corrupt: bad"
        store = self.root.status()["tasks"]["store"]
        self.assertEqual((store["available"], store["problem"]),
                         (False, "task store /x/task_store.db is corrupt: bad"))

    def test_status_without_an_engine(self) -> None:
        self.source.tasks = None
        self.assertIsNone(self.root.status()["tasks"])

    def test_the_service_is_a_task_source(self) -> None:
        """Before its client (and engine) exists, the service shows tasks as null."""
        from hostlink_tw.service import HostlinkService

        service = HostlinkService(Settings(), reactor=Clock())
        metrics = ClientMetrics(service)
        self.addCleanup(metrics.close)
        status = StatusResource(service, metrics).status()
        self.assertIn("tasks", status)
        self.assertIsNone(status["tasks"])
        self.assertEqual(sample(metrics, "hostlink_task_queue_depth"), 0)

    def test_ids_are_bounded(self) -> None:
        """The control plane chose them: /status stays small whatever they are."""
        long = "x" * 100_000
        self.engine.running = [RunningTask(TaskSpec(long, long, "c"), 1, 990.0)]
        self.engine.waiting = [TaskSpec(long, long, "c")] * 50
        _, body = self.get(b"/status")
        self.assertLess(len(body), 10_000)
        running = json.loads(body)["tasks"]["running"][0]
        self.assertTrue(running["task_id"].startswith("x" * 200))
        self.assertLessEqual(len(running["task_id"]), 201)


class EngineCountTests(EngineTestCase):
    """A real engine on a temporary store: what the status page reads of it is true."""

    @inlineCallbacks
    def assertCountsMatchTheStore(self, engine: TaskEngine) -> Any:  # noqa: N802 - trial style
        yield self.settle(engine)
        totals = yield engine.store.outbox_totals()
        self.assertEqual((engine.pending_messages, engine.spool_bytes), totals)
        return totals

    @inlineCallbacks
    def test_pending_counts_follow_output_finals_and_acks(self) -> Any:
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"aa", b"bbb", b"c"], None)
        self.assertEqual((yield self.assertCountsMatchTheStore(engine)), (3, 6))
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        self.ack(session, outputs[1].message_id, highest=2)  # cumulative: 1 and 2
        self.assertEqual((yield self.assertCountsMatchTheStore(engine)), (1, 1))
        engine.ended(Spec("t1", "a1", ""), Result())
        count, size = yield self.assertCountsMatchTheStore(engine)
        self.assertEqual(count, 2)
        self.assertGreater(size, 1)
        (final,) = [e for e in self.wire if e.type == TASK_FINAL]
        self.ack(session, final.message_id, kind=TASK_FINAL)
        self.ack(session, outputs[2].message_id)
        self.assertEqual((yield self.assertCountsMatchTheStore(engine)), (0, 0))

    @inlineCallbacks
    def test_acks_do_not_read_the_counts_back(self) -> Any:
        """The ack path subtracts what the ack transaction counted: reading the
        totals back scans every unacked message, which would make a replay of N
        messages acked a batch at a time O(N²)."""
        engine = yield self.engine()
        session = self.session(engine)
        yield self.run_one(engine, "t1", "a1", [b"aa", b"bbb", b"c"], None)
        yield self.settle(engine)
        reads: list[int] = []
        totals = engine.store.outbox_totals

        def counting() -> Any:
            reads.append(1)
            return totals()

        self.patch(engine.store, "outbox_totals", counting)
        for output in [e for e in self.wire if e.type == TASK_OUTPUT]:
            self.ack(session, output.message_id, highest=output.sequence)
        yield self.settle(engine)
        self.assertEqual(reads, [])
        self.patch(engine.store, "outbox_totals", totals)
        self.assertEqual((yield self.assertCountsMatchTheStore(engine)), (0, 0))

    @inlineCallbacks
    def test_output_stored_while_the_store_counts_is_not_lost(self) -> Any:
        """Activation reads the totals; a chunk issued meanwhile is added back."""
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [b"ab"], None)  # offline: stored, unsent
        self.session(engine)  # reads the outbox's totals...
        engine.output(Spec("t1", "a1", ""), "stdout", b"cde", False)  # ...and this is after
        self.assertEqual((yield self.assertCountsMatchTheStore(engine)), (2, 5))

    @inlineCallbacks
    def test_counts_after_a_restart(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [b"ab", b"c"], Result())
        yield engine.close()
        again = yield self.engine()
        count, size = yield self.assertCountsMatchTheStore(again)
        self.assertEqual(count, 3)
        self.assertGreater(size, 3)

    @inlineCallbacks
    def test_queue_depth_counts_held_and_waiting_attempts(self) -> Any:
        engine = yield self.engine()
        runner = QueueRunner()
        engine.attach_runner(runner)
        for task in ("t1", "t2", "t3"):
            engine.delivered(deliver(task, "a"), self.channel)
        yield self.settle(engine)
        # Held until the first hello_ack (§8.2).
        self.assertEqual(engine.queue_depth(), 3)
        self.assertEqual([s.task_id for s in engine.queued(2)], ["t1", "t2"])
        self.session(engine)
        yield self.settle(engine)
        # Released: now they wait in the runner's queue.
        self.assertEqual(runner.waiting and engine.queue_depth(), 3)
        runner.waiting.pop(0)  # the runner takes one
        self.assertEqual(engine.queue_depth(), 2)
        self.assertEqual([s.task_id for s in engine.queued()], ["t2", "t3"])
        self.assertEqual([s.task_id for s in engine.queued(1)], ["t2"])
        engine.delivered(deliver("t4", "a"), self.channel)
        yield self.settle(engine)
        self.assertEqual(engine.queue_depth(), 3)

    @inlineCallbacks
    def test_task_ended_events(self) -> Any:
        engine = yield self.engine()
        events: list[ClientEvent] = []
        engine.add_observer(events.append)
        self.session(engine)
        yield self.run_one(engine, "t1", "a1", [], Result(status="failed", exit_code=3,
                                                          duration=2.5))
        self.assertEqual([(e.kind, dict(e.fields)) for e in events], [(TASK_ENDED, {
            "task_id": "t1", "execution_attempt_id": "a1", "status": "failed",
            "exit_code": 3, "duration": 2.5,
        })])
        self.assertEqual(engine.finished["failed"], 1)

    @inlineCallbacks
    def test_an_attempt_a_restart_interrupted_is_counted(self) -> Any:
        engine = yield self.engine()
        yield self.run_one(engine, "t1", "a1", [b"x"], None)  # running when we "crash"
        yield engine.close()
        events: list[ClientEvent] = []
        store_engine = TaskEngine(
            TaskStore(self.path), TaskSettings(delivery_enabled=True),
            agent_id=AGENT, clock=self.clock, make_spec=Spec, boot_id="boot-test",
        )
        store_engine.attach_runner(FakeRunner())
        store_engine.add_observer(events.append)
        yield store_engine.start()
        self.addCleanup(store_engine.close)
        self.assertEqual([dict(e.fields) for e in events], [{
            "task_id": "t1", "execution_attempt_id": "a1", "status": "interrupted",
            "exit_code": -1, "duration": None,
        }])
        self.assertEqual(store_engine.finished["interrupted"], 1)

    @inlineCallbacks
    def test_resent_events_by_reason(self) -> Any:
        engine = yield self.engine()
        events: list[ClientEvent] = []
        engine.add_observer(events.append)
        yield self.run_one(engine, "t1", "a1", [b"1", b"2"], None)  # offline
        self.clock.advance(1)
        session = self.session(engine)
        yield self.settle(engine)
        engine.output(Spec("t1", "a1", ""), "stdout", b"3", False)  # live: not a resend
        yield self.settle(engine)
        self.assertEqual([e.reason for e in events], ["replay", "replay"])
        outputs = [e for e in self.wire if e.type == TASK_OUTPUT]
        session.handle(make_envelope(ERROR, AGENT, error_payload(
            "output_sequence_gap", "gap", True, related_message_id=outputs[2].message_id,
            highest_accepted_sequence=1), now=0))
        yield self.settle(engine)
        self.assertEqual([e.reason for e in events], ["replay"] * 2 + ["gap"] * 2)
        engine.ended(Spec("t1", "a1", ""), Result())
        yield self.settle(engine)
        engine.delivered(deliver("t1", "a1", mid="again"), self.channel)
        yield self.settle(engine)
        resends = [(e.reason, e.type) for e in events if e.kind == OUTBOX_RESENT]
        self.assertEqual(resends, [("replay", TASK_OUTPUT)] * 2 + [("gap", TASK_OUTPUT)] * 2
                         + [("redelivery", TASK_FINAL)])


class QueueRunner(FakeRunner):
    """A fake runner with a queue the test empties by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Spec] = []

    def submit(self, spec: Spec) -> None:
        super().submit(spec)
        self.waiting.append(spec)

    def queued(self) -> list[Any]:
        return list(self.waiting)


class FakeClient(TaskSource):
    """What build_tasks needs of a client, with real observers."""

    agent_id = AGENT

    def add_session_listener(self, listener: Any) -> Any:
        self.listener = listener
        return lambda: None


class WiringTests(EngineTestCase):
    @inlineCallbacks
    def test_build_tasks_passes_engine_events_to_the_client_and_its_metrics(self) -> Any:
        """From a real engine to /metrics and /status, as the service wires it."""
        client = FakeClient()
        settings = Settings(delivery_enabled=True, results_enabled=True,
                            local_store_path=os.path.join(self.dir, "store.db"))
        from twisted.internet import reactor

        engine, runner = build_tasks(settings, client, reactor)
        self.assertIs(client.tasks, engine)
        metrics = ClientMetrics(client)
        self.addCleanup(metrics.close)
        yield engine.start()
        self.addCleanup(engine.close)
        engine.delivered(deliver("t1", "a1"), self.channel)
        yield self.settle(engine)
        spec = TaskSpec("t1", "a1", "echo hi")
        self.assertTrue((yield engine.before_start(spec)))
        engine.started(spec, 0)
        engine.output(spec, "stdout", b"hello", False)
        engine.ended(spec, Result(duration=0.25))
        yield self.settle(engine)
        self.assertEqual(sample(metrics, "hostlink_tasks_total", status="completed"), 1)
        self.assertEqual(sample(metrics, "hostlink_task_duration_seconds_sum"), 0.25)
        self.assertEqual(sample(metrics, "hostlink_outbox_pending_messages"), 2)
        self.assertEqual(sample(metrics, "hostlink_outbox_pending_bytes"), engine.spool_bytes)
        status = StatusResource(client, metrics).status()["tasks"]
        self.assertEqual((status["spool"]["messages"], status["store"]["available"],
                          status["store"]["path"]), (2, True, settings.local_store_path))
        self.assertEqual(status["running"], [])
        del runner
