"""
Tests for the task side of L{hostlink_tw.controlplane} (PROTOCOL §7–§8, the
server side), over real loopback sockets.

The agent end is written here (plain Autobahn and L{RequestSigner}, through
test_controlplane's client), never the project's agent: each test sends the
exact frames a rule is about and reads what comes back, in order.  A
I{barrier} (a message whose answer we wait for) proves what was not sent:
the control plane answers in order on one connection.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from hostlink_tw.controlplane import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    ControlPlane,
    TaskRecord,
)
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    TASK_FINAL,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
    Envelope,
    make_envelope,
)
from hostlink_tw.wire.hello import (
    Capabilities,
    HelloSnapshot,
    ReceivedAttempt,
    RunningTask,
    StreamSequences,
    UnackedFinal,
    UnackedOutput,
    hello_payload,
)
from hostlink_tw.wire.payloads import TaskFinalPayload
from tests.test_controlplane import (
    AGENT_A,
    BASE_TIME,
    KEY_A,
    WAIT,
    Client,
    ControlPlaneTestMixin,
    _signer,
    _timeout,
)

_ids = itertools.count(1)
STARTED_AT = "2026-05-01T10:00:00Z"


def snapshot(delivery: bool = True, **fields: Any) -> HelloSnapshot:
    """A phase-2 hello snapshot (nothing pending unless given)."""
    return HelloSnapshot(Capabilities(delivery, True), "test", **fields)


class FakeAgent:
    """One connection of a hand-written agent, reading what it receives in order."""

    def __init__(self, client: Client, agent_id: str = AGENT_A) -> None:
        self.client = client
        self.agent_id = agent_id
        self.cursor = 0
        self.hello_ack: Envelope | None = None

    @inlineCallbacks
    def next(self) -> Any:
        """The next envelope received."""
        envelope = yield self.client.message(self.cursor)
        self.cursor += 1
        return envelope

    @inlineCallbacks
    def expect(self, message_type: str) -> Any:
        """The next envelope, which must be of this type."""
        envelope = yield self.next()
        assert envelope.type == message_type, (message_type, envelope)
        return envelope

    def send(
        self,
        message_type: str,
        task_id: str,
        attempt_id: str,
        payload: dict[str, Any] | None = None,
        *,
        sequence: int | None = None,
        message_id: str | None = None,
    ) -> Envelope:
        envelope = make_envelope(
            message_type,
            self.agent_id,
            payload or {},
            message_id=message_id or f"msg-{next(_ids)}",
            now=BASE_TIME,
            task_id=task_id,
            execution_attempt_id=attempt_id,
            sequence=sequence,
        )
        self.client.send(envelope)
        return envelope

    def output(
        self, task: TaskRecord, sequence: int, data: str, stream: str = "stdout", **kw: Any
    ) -> Envelope:
        payload = {"stream": stream, "data": data, "byte_count": len(data.encode())}
        return self.send(
            TASK_OUTPUT, task.task_id, task.execution_attempt_id, payload, sequence=sequence, **kw
        )

    def final(
        self, task: TaskRecord, status: str = "completed", exit_code: int = 0, **kw: Any
    ) -> Envelope:
        payload = {"status": status, "exit_code": exit_code,
                   "output_truncated": False, "error_truncated": False}
        return self.send(TASK_FINAL, task.task_id, task.execution_attempt_id, payload, **kw)

    @inlineCallbacks
    def barrier(self) -> Any:
        """Everything received before the answer to a fresh message (that answer excluded)."""
        probe = self.send(TASK_RECEIVED, "no-such-task", f"barrier-{next(_ids)}")
        before = []
        while True:
            envelope = yield self.next()
            if envelope.type == ACK and envelope.payload["acked_message_id"] == probe.message_id:
                return before
            before.append(envelope)

    @inlineCallbacks
    def disconnect(self) -> Any:
        if not self.client.closed.called:
            self.client.proto.transport.abortConnection()
        yield _timeout(self.client.closed)


class TaskTestMixin(ControlPlaneTestMixin):
    @inlineCallbacks
    def agent(
        self, cp: ControlPlane, hello: HelloSnapshot | None = None, *, phase1: bool = False
    ) -> Any:
        """Connect as agent A and send a hello (phase 2 unless ``phase1``); wait for its ack."""
        client = yield self.connect(cp, _signer(KEY_A, AGENT_A, at=self.clock.now), hello=False)
        agent = FakeAgent(client)
        payload = {} if phase1 else hello_payload(hello or snapshot())
        sent = make_envelope(AGENT_HELLO, AGENT_A, payload, now=BASE_TIME)
        client.send(sent)
        agent.hello_ack = yield agent.expect(AGENT_HELLO_ACK)
        assert agent.hello_ack.payload["acked_message_id"] == sent.message_id
        return agent

    @inlineCallbacks
    def received_task(self, cp: ControlPlane, agent: FakeAgent, command: str = "echo hi") -> Any:
        """Create a task, take its delivery, answer task.received; return the task."""
        task = cp.tasks.create(AGENT_A, command)
        deliver = yield agent.expect(TASK_DELIVER)
        agent.send(TASK_RECEIVED, deliver.task_id, deliver.execution_attempt_id)
        yield agent.expect(ACK)
        return cp.tasks.get(task.task_id)


class DispatchTests(TaskTestMixin, TestCase):
    """Tasks go out only to sessions whose hello allows it, and again until received."""

    @inlineCallbacks
    def test_delivered_after_hello_ack(self) -> Any:
        cp = yield self.start()
        waiting = cp.tasks.create(AGENT_A, "echo one")
        agent = yield self.agent(cp)
        self.assertIs(agent.hello_ack.payload["delivery_enabled"], True)
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual((deliver.task_id, deliver.execution_attempt_id),
                         (waiting.task_id, waiting.execution_attempt_id))
        self.assertEqual(deliver.payload["command"], "echo one")
        self.assertEqual(cp.tasks.get(waiting.task_id).status, "delivered")
        live = cp.tasks.create(AGENT_A, "echo two")  # while connected: at once
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.execution_attempt_id, live.execution_attempt_id)
        self.assertNotEqual(live.execution_attempt_id, waiting.execution_attempt_id)

    @inlineCallbacks
    def test_no_delivery_to_a_phase1_hello(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp, phase1=True)
        self.assertEqual(set(agent.hello_ack.payload), {"acked_message_id", "acked_type"})
        task = cp.tasks.create(AGENT_A, "echo hi")
        self.assertEqual((yield agent.barrier()), [])
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")
        self.assertFalse(cp.tasks.accepts_deliveries(AGENT_A))

    @inlineCallbacks
    def test_no_delivery_when_the_hello_does_not_advertise_it(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        agent = yield self.agent(cp, snapshot(delivery=False))
        self.assertIs(agent.hello_ack.payload["delivery_enabled"], True)
        self.assertEqual((yield agent.barrier()), [])
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")

    @inlineCallbacks
    def test_no_delivery_when_the_control_plane_disables_it(self) -> Any:
        cp = yield self.start(delivery_enabled=False)
        cp.tasks.create(AGENT_A, "echo hi")
        agent = yield self.agent(cp)
        self.assertIs(agent.hello_ack.payload["delivery_enabled"], False)
        self.assertEqual((yield agent.barrier()), [])

    @inlineCallbacks
    def test_redelivered_on_each_session_until_received(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        first = yield self.agent(cp)
        deliver = yield first.expect(TASK_DELIVER)
        yield first.disconnect()
        second = yield self.agent(cp)
        again = yield second.expect(TASK_DELIVER)
        self.assertEqual(again.execution_attempt_id, deliver.execution_attempt_id)
        self.assertNotEqual(again.message_id, deliver.message_id)
        self.assertEqual(cp.tasks.attempts(task.task_id)[-1].deliveries, 2)
        second.send(TASK_RECEIVED, task.task_id, task.execution_attempt_id)
        yield second.expect(ACK)
        self.assertEqual(cp.tasks.get(task.task_id).status, "received")
        yield second.disconnect()
        received = ReceivedAttempt(task.task_id, task.execution_attempt_id, STARTED_AT)
        third = yield self.agent(cp, snapshot(received_not_started=[received]))
        self.assertEqual((yield third.barrier()), [])
        self.assertEqual(len(cp.tasks.attempts(task.task_id)), 1)

    @inlineCallbacks
    def test_received_attempt_missing_from_the_snapshot_is_delivered_again(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        yield agent.disconnect()
        agent = yield self.agent(cp)  # its snapshot forgot the attempt
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.execution_attempt_id, task.execution_attempt_id)

    @inlineCallbacks
    def test_delivery_window(self) -> Any:
        cp = yield self.start(delivery_window=2)
        tasks = [cp.tasks.create(AGENT_A, f"echo {n}") for n in range(3)]
        agent = yield self.agent(cp)
        delivered = [e for e in (yield agent.barrier()) if e.type == TASK_DELIVER]
        self.assertEqual([e.task_id for e in delivered], [t.task_id for t in tasks[:2]])
        agent.send(TASK_STARTED, tasks[0].task_id, tasks[0].execution_attempt_id)
        yield agent.expect(ACK)
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.task_id, tasks[2].task_id)

    @inlineCallbacks
    def test_queue_full_makes_it_pending_until_a_slot_frees(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        running = yield self.received_task(cp, agent)
        refused = cp.tasks.create(AGENT_A, "echo later")
        deliver = yield agent.expect(TASK_DELIVER)
        agent.client.send(make_envelope(
            ERROR, AGENT_A,
            {"code": "queue_full", "message": "full", "retryable": True,
             "related_message_id": deliver.message_id},
            now=BASE_TIME,
        ))
        yield agent.barrier()
        self.assertEqual(cp.tasks.get(refused.task_id).status, "pending")
        agent.send(TASK_STARTED, running.task_id, running.execution_attempt_id)
        yield agent.expect(ACK)
        again = yield agent.expect(TASK_DELIVER)
        self.assertEqual(again.execution_attempt_id, refused.execution_attempt_id)

    @inlineCallbacks
    def test_delivery_disabled_answer_stops_deliveries_on_that_session(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        refused = cp.tasks.create(AGENT_A, "echo hi")
        deliver = yield agent.expect(TASK_DELIVER)
        agent.client.send(make_envelope(
            ERROR, AGENT_A,
            {"code": "delivery_disabled", "message": "off", "retryable": False,
             "related_message_id": deliver.message_id},
            now=BASE_TIME,
        ))
        yield agent.barrier()
        self.assertEqual(cp.tasks.get(refused.task_id).status, "pending")
        self.assertFalse(cp.tasks.accepts_deliveries(AGENT_A))
        cp.tasks.create(AGENT_A, "echo more")
        self.assertEqual((yield agent.barrier()), [])

    @inlineCallbacks
    def test_redeliver_sends_the_same_attempt_again(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        self.assertTrue(cp.redeliver(task.task_id))
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.execution_attempt_id, task.execution_attempt_id)
        self.assertEqual(cp.tasks.get(task.task_id).status, "received")

    @inlineCallbacks
    def test_one_live_attempt_per_task(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        old = task.execution_attempt_id
        replaced = cp.new_attempt(task.task_id)
        self.assertNotEqual(replaced.execution_attempt_id, old)
        self.assertEqual(replaced.status, "pending")
        # The agent may hold the old attempt: no new delivery on this
        # session, which is closed so that the next hello can discard it.
        _, code, _ = yield _timeout(agent.client.closed)
        self.assertEqual(code, CLOSE_NORMAL)
        self.assertEqual(agent.client.received[agent.cursor:], [])
        held = ReceivedAttempt(task.task_id, old, STARTED_AT)
        agent = yield self.agent(cp, snapshot(received_not_started=[held]))
        self.assertEqual(
            agent.hello_ack.payload["discarded_attempts"],
            ({"task_id": task.task_id, "execution_attempt_id": old, "reason": "superseded"},),
        )
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.execution_attempt_id, replaced.execution_attempt_id)
        states = [(a.execution_attempt_id, a.state) for a in cp.tasks.attempts(task.task_id)]
        self.assertEqual(states, [(old, "discarded"),
                                  (replaced.execution_attempt_id, "delivered")])

    @inlineCallbacks
    def test_cancel_closes_the_session_and_the_hello_discards_it(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        finished = cp.tasks.wait_final(task.task_id)
        self.assertEqual(cp.tasks.cancel(task.task_id).status, "cancelled")
        self.assertEqual((yield finished).status, "cancelled")
        _, code, _ = yield _timeout(agent.client.closed)
        self.assertEqual(code, CLOSE_NORMAL)
        running = RunningTask(task.task_id, task.execution_attempt_id, STARTED_AT)
        agent = yield self.agent(cp, snapshot(running_task=running))
        self.assertEqual(agent.hello_ack.payload["discarded_attempts"][0]["reason"],
                         "task_cancelled")
        self.assertNotIn("output_replay", agent.hello_ack.payload)


class IntakeTests(TaskTestMixin, TestCase):
    """task.* messages: stored once, acked, sequence-checked."""

    @inlineCallbacks
    def test_output_acked_with_ids_and_highest_sequence(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        sent = agent.output(task, 1, "hello ")
        ack = yield agent.expect(ACK)
        self.assertEqual(
            (ack.task_id, ack.execution_attempt_id),
            (task.task_id, task.execution_attempt_id),
        )
        self.assertEqual(dict(ack.payload), {
            "acked_message_id": sent.message_id, "acked_type": TASK_OUTPUT,
            "task_id": task.task_id, "execution_attempt_id": task.execution_attempt_id,
            "highest_output_sequence": 1,
        })
        agent.output(task, 1, "oops", stream="stderr")
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["highest_output_sequence"], 1)
        agent.output(task, 2, "world")
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["highest_output_sequence"], 2)
        self.assertEqual(cp.tasks.output(task.task_id), ("hello world", "oops"))

    @inlineCallbacks
    def test_each_read_of_the_connection_is_one_batch(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        intake = cp.tasks.intake
        batch = intake.batch
        open_when_handled: list[bool] = []

        def handle(connection: Any, session: Any, envelope: Envelope) -> None:
            # The gateway opened the read's batch before handing it the message.
            open_when_handled.append(connection in intake._batches)
            with batch(connection):
                intake._handle(connection, session, envelope)

        self.patch(intake, "handle", handle)
        sent = agent.output(task, 1, "hello")
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["acked_message_id"], sent.message_id)
        self.assertEqual(open_when_handled, [True])

    @inlineCallbacks
    def test_duplicates_acked_again_and_stored_once(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        seen: list[Any] = []
        cp.tasks.on_output(seen.append, task.task_id)
        first = agent.output(task, 1, "once")
        yield agent.expect(ACK)
        agent.output(task, 1, "once", message_id=first.message_id)  # the same message
        again = yield agent.expect(ACK)
        agent.output(task, 1, "once")  # the same sequence under another id
        other = yield agent.expect(ACK)
        self.assertEqual(again.payload["acked_message_id"], first.message_id)
        self.assertEqual(other.payload["highest_output_sequence"], 1)
        self.assertEqual(cp.tasks.output(task.task_id), ("once", ""))
        self.assertEqual([c.data for c in seen], ["once"])

    @inlineCallbacks
    def test_gap_is_a_retryable_error_with_the_highest_accepted(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        agent.output(task, 1, "a")
        yield agent.expect(ACK)
        ahead = agent.output(task, 3, "c")
        error = yield agent.expect(ERROR)
        self.assertEqual(
            (error.payload["code"], error.payload["retryable"],
             error.payload["related_message_id"], error.payload["highest_accepted_sequence"]),
            ("output_sequence_gap", True, ahead.message_id, 1),
        )
        agent.output(task, 2, "b")
        yield agent.expect(ACK)
        agent.output(task, 3, "c", message_id=ahead.message_id)  # re-sent: now in order
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["highest_output_sequence"], 3)
        self.assertEqual(cp.tasks.output(task.task_id)[0], "abc")
        self.assertFalse(agent.client.closed.called)

    @inlineCallbacks
    def test_final_applied_once(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        finished = cp.tasks.wait_final(task.task_id, timeout=WAIT)
        agent.send(TASK_STARTED, task.task_id, task.execution_attempt_id)
        yield agent.expect(ACK)
        final = agent.final(task, "failed", 3)
        ack = yield agent.expect(ACK)
        self.assertEqual((ack.payload["acked_type"], ack.payload.get("highest_output_sequence")),
                         (TASK_FINAL, None))
        record = yield finished
        self.assertEqual((record.status, record.exit_code), ("failed", 3))
        agent.final(task, "failed", 3, message_id=final.message_id)
        again = yield agent.expect(ACK)
        agent.final(task, "completed", 0)  # another final of the same attempt
        yield agent.expect(ACK)
        self.assertEqual(again.payload["acked_message_id"], final.message_id)
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code), ("failed", 3))
        self.assertEqual(record.final, TaskFinalPayload("failed", 3))

    @inlineCallbacks
    def test_final_of_a_superseded_attempt_changes_nothing(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        yield agent.disconnect()
        replaced = cp.new_attempt(task.task_id)
        agent = yield self.agent(cp)
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(deliver.execution_attempt_id, replaced.execution_attempt_id)
        agent.final(task)  # the old attempt's final, late
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.execution_attempt_id, task.execution_attempt_id)
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code, record.final),
                         ("delivered", None, None))

    @inlineCallbacks
    def test_messages_of_unknown_attempts_acked_not_stored(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        stranger = TaskRecord("task-x", AGENT_A, "x", "running", "attempt-x", None, 0.0, 0.0)
        agent.output(stranger, 5, "not ours")
        ack = yield agent.expect(ACK)
        self.assertNotIn("highest_output_sequence", ack.payload)
        self.assertEqual(cp.tasks.list(), [])

    @inlineCallbacks
    def test_output_past_the_limit_is_cut_and_flagged(self) -> Any:
        cp = yield self.start(max_output_bytes=5)
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        for sequence, data in enumerate(["hel", "lo world", "more"], 1):
            agent.output(task, sequence, data)
            ack = yield agent.expect(ACK)
            self.assertEqual(ack.payload["highest_output_sequence"], sequence)
        self.assertEqual(cp.tasks.output(task.task_id), ("hello", ""))
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.output_truncated, record.error_truncated), (True, False))

    @inlineCallbacks
    def test_held_acks_go_out_on_release(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        cp.hold_acks()
        first = agent.output(task, 1, "a")
        agent.output(task, 4, "gap", stream="stderr")  # errors are never held
        error = yield agent.expect(ERROR)
        self.assertEqual(error.payload["highest_accepted_sequence"], 0)
        self.assertEqual(cp.controls.acks_held, 1)
        self.assertEqual(cp.tasks.output(task.task_id), ("a", ""))  # stored meanwhile
        self.assertEqual(cp.release_acks(), 1)
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["acked_message_id"], first.message_id)

    @inlineCallbacks
    def test_invalid_snapshot_refused_like_any_bad_frame(self) -> Any:
        cp = yield self.start()
        client = yield self.connect(cp, hello=False)
        client.send(make_envelope(AGENT_HELLO, AGENT_A, {"capabilities": 1}, now=BASE_TIME))
        error = yield client.message(0)
        self.assertEqual((error.type, error.payload["code"]), (ERROR, "invalid_payload"))
        _, code, _ = yield _timeout(client.closed)
        self.assertEqual(code, CLOSE_POLICY)


class HelloDirectiveTests(TaskTestMixin, TestCase):
    """A crafted snapshot and the hello_ack's directives for it."""

    @inlineCallbacks
    def test_directives(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        done = yield self.received_task(cp, agent, "echo done")
        stored_final = agent.final(done)
        yield agent.expect(ACK)
        streaming = yield self.received_task(cp, agent, "echo streaming")
        for sequence in (1, 2):
            agent.output(streaming, sequence, "x")
            yield agent.expect(ACK)
        adopted = yield self.received_task(cp, agent, "echo adopted")
        cancelled = yield self.received_task(cp, agent, "echo cancelled")
        cp.tasks.cancel(cancelled.task_id)
        yield _timeout(agent.client.closed)

        def final(task: TaskRecord, message_id: str) -> UnackedFinal:
            return UnackedFinal(message_id, task.task_id, task.execution_attempt_id,
                                TaskFinalPayload("completed", 0, output="out"))

        crafted = snapshot(
            running_task=RunningTask(streaming.task_id, streaming.execution_attempt_id,
                                     STARTED_AT, StreamSequences(stdout=4, stderr=0)),
            received_not_started=[
                ReceivedAttempt(cancelled.task_id, cancelled.execution_attempt_id, STARTED_AT),
                ReceivedAttempt("task-gone", "attempt-gone", STARTED_AT),
            ],
            unacked_output=[UnackedOutput(streaming.task_id, streaming.execution_attempt_id,
                                          "stdout", 2, 4)],
            unacked_finals=[final(done, stored_final.message_id),
                            final(adopted, "final-adopted")],
        )
        agent = yield self.agent(cp, crafted)
        payload = agent.hello_ack.payload
        self.assertEqual(payload["acknowledged_final_message_ids"],
                         (stored_final.message_id, "final-adopted"))
        self.assertEqual(
            [(d["task_id"], d["reason"]) for d in payload["discarded_attempts"]],
            [(cancelled.task_id, "task_cancelled"), ("task-gone", "unknown_attempt")],
        )
        self.assertEqual(
            [(r["execution_attempt_id"], r["stream"], r["next_sequence"])
             for r in payload["output_replay"]],
            [(streaming.execution_attempt_id, "stdout", 3),
             (streaming.execution_attempt_id, "stderr", 1)],
        )
        self.assertIs(payload["delivery_enabled"], True)
        record = cp.tasks.get(adopted.task_id)
        self.assertEqual((record.status, record.final),
                         ("completed", crafted.unacked_finals[1].final))
        self.assertEqual(cp.tasks.get(streaming.task_id).status, "received")


class RestartTests(TaskTestMixin, TestCase):
    """Tasks, output and finals survive a control-plane restart on the same file."""

    @inlineCallbacks
    def test_store_survives_restart(self) -> Any:
        path = os.path.join(self.mktemp() + "-dir", "tasks.db")
        os.makedirs(os.path.dirname(path))
        cp = yield self.start(tasks_database=path)
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        agent.send(TASK_STARTED, task.task_id, task.execution_attempt_id)
        yield agent.expect(ACK)
        for sequence, data in ((1, "out"), (2, "put")):
            agent.output(task, sequence, data)
            yield agent.expect(ACK)
        final = agent.final(task, "completed", 0)
        yield agent.expect(ACK)
        pending = cp.tasks.create(AGENT_A, "echo later")
        yield agent.expect(TASK_DELIVER)
        yield agent.disconnect()
        yield cp.stop()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

        cp = yield self.start(tasks_database=path)
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code, record.started_at is not None),
                         ("completed", 0, True))
        self.assertEqual(cp.tasks.output(task.task_id), ("output", ""))
        self.assertEqual(cp.tasks.get(pending.task_id).status, "delivered")
        unacked = UnackedFinal(final.message_id, task.task_id, task.execution_attempt_id,
                               TaskFinalPayload("completed", 0))
        agent = yield self.agent(cp, snapshot(unacked_finals=[unacked]))
        self.assertEqual(agent.hello_ack.payload["acknowledged_final_message_ids"],
                         (final.message_id,))
        deliver = yield agent.expect(TASK_DELIVER)  # still not received: delivered again
        self.assertEqual(deliver.execution_attempt_id, pending.execution_attempt_id)
        agent.output(task, 2, "put")  # a re-sent chunk under a new id: a duplicate
        ack = yield agent.expect(ACK)
        self.assertEqual(ack.payload["highest_output_sequence"], 2)
        agent.output(task, 4, "!")
        error = yield agent.expect(ERROR)
        self.assertEqual(error.payload["highest_accepted_sequence"], 2)
        self.assertEqual(cp.tasks.output(task.task_id), ("output", ""))
