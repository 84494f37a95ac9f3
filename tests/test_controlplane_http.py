"""
Tests for the agent API of L{hostlink_tw.controlplane} (PROTOCOL §9.1, the
server side), over real loopback sockets.

The HTTP client is written here: one raw request per connection, signed with
L{RequestSigner} (the project's wire/signing.py), never the agent's client,
so the endpoints are checked against the protocol text.  Sessions, where a
test needs one, are test_controlplane_tasks' hand-written agent.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from hostlink_tw.controlplane import ControlPlane
from hostlink_tw.controlplane.agentapi import route
from hostlink_tw.protocol import ACK, TASK_DELIVER, TASK_OUTPUT, TASK_RECEIVED
from hostlink_tw.signing import HEADER_NONCE, HEADER_SIGNATURE, RequestSigner
from tests.test_controlplane import (
    AGENT_A,
    AGENT_B,
    BASE_TIME,
    KEY_A,
    KEY_B,
    Response,
    _Raw,
    _signer,
    _timeout,
    raw_request,
)
from tests.test_controlplane_tasks import TaskTestMixin

TASKS = "/api/v1/tasks"


def heartbeat_path(agent_id: str = AGENT_A) -> str:
    return f"/api/v1/agents/{agent_id}/heartbeat"


@inlineCallbacks
def http(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Any:
    """One request on its own connection; the L{Response} once the server has answered."""
    proto = _Raw()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b""))
    data = yield _timeout(proto.done)
    return Response(data)


def report_body(status: str = "completed", exit_code: int = 0, **fields: Any) -> bytes:
    return json.dumps({"status": status, "exit_code": exit_code, **fields}).encode()


class AgentAPIMixin(TaskTestMixin):
    def signer(self, key: Any = KEY_A, agent_id: str = AGENT_A) -> RequestSigner:
        return _signer(key, agent_id, at=self.clock.now)

    @inlineCallbacks
    def call(
        self,
        cp: ControlPlane,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        signer: RequestSigner | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """A request signed afresh (by agent A unless told), or with exactly C{headers}."""
        if headers is None:
            headers = (signer or self.signer()).sign_headers()
        response = yield http(cp.port, method, path, headers, body)
        return response

    @inlineCallbacks
    def poll(self, cp: ControlPlane, **kw: Any) -> Any:
        """GET /api/v1/tasks: the listed tasks, after checking the answer is a 200 JSON array."""
        response = yield self.call(cp, "GET", TASKS, **kw)
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(response.headers["content-type"], "application/json")
        listed = json.loads(response.body)
        self.assertIsInstance(listed, list)
        return listed

    @inlineCallbacks
    def report(self, cp: ControlPlane, task_id: str, body: bytes, **kw: Any) -> Any:
        response = yield self.call(cp, "PUT", f"{TASKS}/{task_id}", body, **kw)
        return response

    def assertJSONError(self, response: Response, status: int, contains: str = "") -> None:
        self.assertEqual(response.status, status, response.text)
        self.assertEqual(response.headers["content-type"], "application/json")
        message = json.loads(response.body)["message"]
        self.assertIsInstance(message, str)
        self.assertIn(contains, message)

    def capture_log(self) -> list[dict[str, Any]]:
        """Every log event from now on (read them with formatEvent)."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[attr-defined]
        return events


class PollTests(AgentAPIMixin, TestCase):
    """GET /api/v1/tasks: what the agent should run, with the attempt a session would deliver."""

    @inlineCallbacks
    def test_lists_pending_tasks_and_delivers_them(self) -> Any:
        cp = yield self.start()
        first = cp.tasks.create(AGENT_A, "echo one")
        second = cp.tasks.create(AGENT_A, "printf 'two\\n'")
        cp.tasks.create(AGENT_B, "echo not for a")
        listed = yield self.poll(cp)
        self.assertEqual([t["id"] for t in listed], [first.task_id, second.task_id])
        one = listed[0]
        self.assertEqual(
            set(one),
            {"id", "execution_attempt_id", "command", "status", "priority", "output", "error",
             "exit_code", "created_at", "updated_at"},
        )
        self.assertEqual(
            (one["execution_attempt_id"], one["command"], one["status"], one["priority"],
             one["output"], one["error"], one["exit_code"], one["created_at"]),
            (first.execution_attempt_id, "echo one", "delivered", 0, "", "", 0,
             "2026-05-28T20:26:40Z"),
        )
        self.assertEqual(listed[1]["command"], "printf 'two\\n'")
        for task in (first, second):
            self.assertEqual(cp.tasks.get(task.task_id).status, "delivered")
            [attempt] = cp.tasks.attempts(task.task_id)
            self.assertEqual((attempt.state, attempt.deliveries), ("delivered", 1))

    @inlineCallbacks
    def test_listed_again_until_reported_with_the_same_attempt(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        before = yield self.poll(cp)
        again = yield self.poll(cp)
        self.assertEqual(before, again)
        self.assertEqual(len(cp.tasks.attempts(task.task_id)), 1)
        response = yield self.report(cp, task.task_id, report_body())
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual((yield self.poll(cp)), [])

    @inlineCallbacks
    def test_finished_and_cancelled_tasks_are_not_listed(self) -> Any:
        cp = yield self.start()
        done = cp.tasks.create(AGENT_A, "true")
        interrupted = cp.tasks.create(AGENT_A, "sleep 100")
        yield self.poll(cp)
        yield self.report(cp, done.task_id, report_body())
        yield self.report(cp, interrupted.task_id, report_body("interrupted", -1))
        cancelled = cp.tasks.create(AGENT_A, "echo never")
        cp.tasks.cancel(cancelled.task_id)
        self.assertEqual((yield self.poll(cp)), [])
        self.assertEqual(cp.tasks.get(interrupted.task_id).status, "interrupted")

    @inlineCallbacks
    def test_delivery_window(self) -> Any:
        """At most delivery_window tasks out and not started: the rest wait, in order."""
        cp = yield self.start(delivery_window=2)
        tasks = [cp.tasks.create(AGENT_A, f"echo {n}") for n in range(3)]
        listed = yield self.poll(cp)
        self.assertEqual([t["id"] for t in listed], [t.task_id for t in tasks[:2]])
        self.assertEqual(cp.tasks.get(tasks[2].task_id).status, "pending")
        yield self.report(cp, tasks[0].task_id, report_body())
        listed = yield self.poll(cp)
        self.assertEqual([t["id"] for t in listed], [t.task_id for t in tasks[1:]])

    @inlineCallbacks
    def test_session_delivered_keeps_its_attempt_received_is_not_listed(self) -> Any:
        """
        A task the session delivered is listed with the same attempt id (the
        agent's one-run rule dedups it); one the agent said it received is not.
        """
        cp = yield self.start()
        agent = yield self.agent(cp)
        delivered = cp.tasks.create(AGENT_A, "echo one")
        deliver = yield agent.expect(TASK_DELIVER)
        received = yield self.received_task(cp, agent, "echo two")
        listed = yield self.poll(cp)
        self.assertEqual(
            [(t["id"], t["execution_attempt_id"]) for t in listed],
            [(delivered.task_id, deliver.execution_attempt_id)],
        )
        self.assertEqual(len(cp.tasks.attempts(delivered.task_id)), 1)
        self.assertEqual(cp.tasks.get(received.task_id).status, "received")

    @inlineCallbacks
    def test_taken_by_http_then_a_session_hello_no_second_attempt(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        [listed] = yield self.poll(cp)
        agent = yield self.agent(cp)
        deliver = yield agent.expect(TASK_DELIVER)
        self.assertEqual(
            (deliver.task_id, deliver.execution_attempt_id),
            (task.task_id, listed["execution_attempt_id"]),
        )
        agent.send(TASK_RECEIVED, task.task_id, deliver.execution_attempt_id)
        yield agent.expect(ACK)
        [attempt] = cp.tasks.attempts(task.task_id)
        self.assertEqual(attempt.execution_attempt_id, task.execution_attempt_id)
        self.assertEqual(cp.tasks.get(task.task_id).status, "received")
        self.assertEqual((yield self.poll(cp)), [])

    @inlineCallbacks
    def test_a_task_whose_older_attempt_may_be_live_waits(self) -> Any:
        """
        After a new attempt, the old one may still be on the agent: the new
        one is not offered (only a hello can discard the old one), and a
        report naming no attempt lands on the old one, the newest delivered.
        """
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        yield self.poll(cp)
        renewed = cp.new_attempt(task.task_id)
        self.assertEqual((yield self.poll(cp)), [])
        response = yield self.report(cp, task.task_id, report_body("failed", 1))
        self.assertEqual(response.status, 200, response.text)
        old, new = cp.tasks.attempts(task.task_id)
        self.assertEqual((old.state, new.state), ("ended", "pending"))
        self.assertEqual(new.execution_attempt_id, renewed.execution_attempt_id)
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")
        [listed] = yield self.poll(cp)
        self.assertEqual(listed["execution_attempt_id"], renewed.execution_attempt_id)


class ReportTests(AgentAPIMixin, TestCase):
    """PUT /api/v1/tasks/{id}: the agent's final, validated and taken once."""

    @inlineCallbacks
    def test_report_ends_the_task(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "sh -c 'echo out; echo err >&2; exit 3'")
        waiting = cp.tasks.wait_final(task.task_id, timeout=5)
        yield self.poll(cp)
        response = yield self.report(
            cp, task.task_id, report_body("failed", 3, output="out\n", error="err\n")
        )
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(
            json.loads(response.body),
            {"message": "report stored", "applied": True, "status": "failed"},
        )
        final = yield waiting
        self.assertEqual((final.status, final.exit_code), ("failed", 3))
        self.assertEqual(cp.tasks.output(task.task_id), ("out\n", "err\n"))
        self.assertEqual(cp.tasks.attempts(task.task_id)[0].state, "ended")

    @inlineCallbacks
    def test_same_report_twice_applied_once(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        chunks: list[Any] = []
        cp.tasks.on_output(chunks.append, task.task_id)
        yield self.poll(cp)
        body = report_body(output="hi\n")
        first = yield self.report(cp, task.task_id, body)
        second = yield self.report(cp, task.task_id, body)
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertIs(json.loads(first.body)["applied"], True)
        self.assertIs(json.loads(second.body)["applied"], False)
        self.assertEqual(len(chunks), 1)
        self.assertEqual(cp.tasks.output(task.task_id), ("hi\n", ""))
        # A different report of the same attempt does not replace the first.
        third = yield self.report(cp, task.task_id, report_body("failed", 9))
        self.assertEqual(third.status, 200)
        self.assertEqual(cp.tasks.get(task.task_id).exit_code, 0)

    @inlineCallbacks
    def test_final_already_received_over_the_session(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        agent.output(task, 1, "streamed\n")
        yield agent.expect(ACK)
        agent.final(task, "completed", 0)
        yield agent.expect(ACK)
        response = yield self.report(
            cp, task.task_id, report_body("failed", 5, output="other", error="late")
        )
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(
            json.loads(response.body),
            {"message": "this attempt's final was already received; nothing changed",
             "applied": False, "status": "completed"},
        )
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code), ("completed", 0))
        self.assertEqual(cp.tasks.output(task.task_id), ("streamed\n", ""))

    @inlineCallbacks
    def test_session_final_after_the_report_changes_nothing(self) -> Any:
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        response = yield self.report(cp, task.task_id, report_body("failed", 2))
        self.assertEqual(response.status, 200)
        agent.final(task, "completed", 0)
        yield agent.expect(ACK)  # acked, as a duplicate is
        record = cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code), ("failed", 2))

    @inlineCallbacks
    def test_streamed_output_is_kept(self) -> Any:
        """Output that came over the session is not replaced by the report's summary."""
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        agent.send(TASK_OUTPUT, task.task_id, task.execution_attempt_id,
                   {"stream": "stdout", "data": "a", "byte_count": 1}, sequence=1)
        yield agent.expect(ACK)
        yield agent.disconnect()
        response = yield self.report(
            cp, task.task_id, report_body(output="a and more", error="warning")
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(cp.tasks.output(task.task_id), ("a", "warning"))

    @inlineCallbacks
    def test_output_stored_by_the_report_counts_for_the_session(self) -> Any:
        """
        A session that later replays the stream finds the report's text in
        place: sequence 1 is a duplicate (acked), not a store failure.
        """
        cp = yield self.start()
        agent = yield self.agent(cp)
        task = yield self.received_task(cp, agent)
        agent.output(task, 2, "early")  # a gap: the intake now tracks stdout
        error = yield agent.expect("error")
        self.assertEqual(error.payload["highest_accepted_sequence"], 0)
        response = yield self.report(cp, task.task_id, report_body(output="whole"))
        self.assertEqual(response.status, 200)
        replayed = agent.output(task, 1, "whole")
        ack = yield agent.expect(ACK)
        self.assertEqual(
            (ack.payload["acked_message_id"], ack.payload["highest_output_sequence"]),
            (replayed.message_id, 1),
        )
        self.assertEqual(cp.tasks.output(task.task_id), ("whole", ""))

    @inlineCallbacks
    def test_named_attempt(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        [listed] = yield self.poll(cp)
        response = yield self.report(
            cp, task.task_id, report_body(execution_attempt_id="attempt-unknown")
        )
        self.assertJSONError(response, 409, "no attempt")
        response = yield self.report(
            cp, task.task_id, report_body(execution_attempt_id=listed["execution_attempt_id"])
        )
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(cp.tasks.get(task.task_id).status, "completed")

    @inlineCallbacks
    def test_a_task_never_delivered_cannot_be_reported(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        response = yield self.report(cp, task.task_id, report_body())
        self.assertJSONError(response, 409, "never delivered")
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")

    @inlineCallbacks
    def test_unknown_task_and_another_agents_task_look_the_same(self) -> Any:
        cp = yield self.start()
        theirs = cp.tasks.create(AGENT_B, "echo b")
        yield self.poll(cp, signer=self.signer(KEY_B, AGENT_B))
        unknown = yield self.report(cp, "task-0000000000000000", report_body())
        other = yield self.report(cp, theirs.task_id, report_body())
        self.assertJSONError(unknown, 404)
        self.assertJSONError(other, 404)
        self.assertEqual(unknown.body, other.body)
        self.assertEqual(cp.tasks.get(theirs.task_id).status, "delivered")

    @inlineCallbacks
    def test_invalid_bodies(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        yield self.poll(cp)
        for body, contains in (
            (b"{not json", ""),
            (b"[]", "object"),
            (b"", ""),
            (report_body("running"), "status"),
            (report_body("completed", "3"), "exit_code"),  # type: ignore[arg-type]
            (report_body("completed", True), "exit_code"),  # type: ignore[arg-type]
            (json.dumps({"status": "completed"}).encode(), "exit_code"),
            (report_body(output=7), "output"),
            (report_body(execution_attempt_id=""), "execution_attempt_id"),
            (b'{"status": "completed", "status": "failed", "exit_code": 0}', ""),
            (b'{"status": "completed", "exit_code": 0, "output": "\\ud800"}', ""),
        ):
            response = yield self.report(cp, task.task_id, body)
            self.assertJSONError(response, 400, contains)
        self.assertEqual(cp.tasks.get(task.task_id).status, "delivered")


class HeartbeatTests(AgentAPIMixin, TestCase):
    """POST /api/v1/agents/{agent_id}/heartbeat: a message and the pending tasks."""

    @inlineCallbacks
    def test_heartbeat_lists_pending_tasks(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        self.clock.now += 7
        response = yield self.call(cp, "POST", heartbeat_path())
        self.assertEqual(response.status, 200, response.text)
        answer = json.loads(response.body)
        self.assertEqual(set(answer), {"message", "pending_tasks"})
        self.assertIsInstance(answer["message"], str)
        [pending] = answer["pending_tasks"]
        self.assertEqual(
            (pending["id"], pending["execution_attempt_id"], pending["status"]),
            (task.task_id, task.execution_attempt_id, "delivered"),
        )
        self.assertEqual(cp._gateway.api.last_heartbeat(AGENT_A), BASE_TIME + 7)
        self.assertIsNone(cp._gateway.api.last_heartbeat(AGENT_B))
        # A poll after the heartbeat offers the same attempt.
        [listed] = yield self.poll(cp)
        self.assertEqual(listed["execution_attempt_id"], task.execution_attempt_id)

    @inlineCallbacks
    def test_path_agent_id_must_be_the_signer(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_B, "echo b")
        response = yield self.call(cp, "POST", heartbeat_path(AGENT_B))
        self.assertJSONError(response, 403, "agent id in the path")
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")
        self.assertIsNone(cp._gateway.api.last_heartbeat(AGENT_A))
        response = yield self.call(cp, "POST", heartbeat_path("agent%2Da"))  # percent-encoded
        self.assertEqual(response.status, 200, response.text)


class AuthenticationTests(AgentAPIMixin, TestCase):
    """Every endpoint is authenticated exactly as the upgrade is."""

    ENDPOINTS = (("GET", TASKS, None), ("PUT", f"{TASKS}/task-x", b"{}"),
                 ("POST", heartbeat_path(), None))

    @inlineCallbacks
    def assertRefused(self, cp: ControlPlane, headers: dict[str, str], reason: str) -> Any:
        for method, path, body in self.ENDPOINTS:
            response = yield self.call(cp, method, path, body, headers=dict(headers))
            self.assertJSONError(response, 401, reason)
            self.assertEqual(json.loads(response.body)["message"], reason)

    @inlineCallbacks
    def test_refused_requests_do_nothing(self) -> Any:
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "echo hi")
        now = self.clock.now
        yield self.assertRefused(cp, _signer(KEY_B, AGENT_A, at=now).sign_headers(),
                                 "invalid signature")
        yield self.assertRefused(cp, _signer(KEY_A, "agent-z", at=now).sign_headers(),
                                 "unknown agent")
        for offset in (301, -301):
            yield self.assertRefused(cp, _signer(at=now + offset).sign_headers(),
                                     "timestamp outside the allowed window")
        yield self.assertRefused(cp, {}, "missing X-Agent-ID header")
        headers = self.signer().sign_headers()
        del headers[HEADER_SIGNATURE]
        yield self.assertRefused(cp, headers, "missing X-Signature header")
        self.assertEqual(cp.tasks.get(task.task_id).status, "pending")
        self.assertEqual(cp.attempts, [])  # the upgrades' record is the upgrades' only
        # ±300 s is inside the window.
        yield self.poll(cp, signer=_signer(at=now + 300))

    @inlineCallbacks
    def test_replayed_nonce(self) -> Any:
        cp = yield self.start()
        cp.tasks.create(AGENT_A, "echo hi")
        headers = self.signer().sign_headers()
        yield self.poll(cp, headers=dict(headers))
        yield self.assertRefused(cp, headers, "replayed nonce")

    @inlineCallbacks
    def test_one_replay_memory_with_the_upgrade(self) -> Any:
        """Headers used on an upgrade are refused on the API, and the other way round."""
        cp = yield self.start()
        upgraded = self.signer().sign_headers()
        response = yield raw_request(cp.port, headers=upgraded)
        self.assertEqual(response.status, 101)
        yield self.assertRefused(cp, upgraded, "replayed nonce")
        polled = self.signer().sign_headers()
        yield self.poll(cp, headers=dict(polled))
        response = yield raw_request(cp.port, headers=polled)
        self.assertEqual((response.status, response.text), (401, "replayed nonce"))

    @inlineCallbacks
    def test_replay_memory_survives_a_restart(self) -> Any:
        """With a replay file (served once the nonce is written), a restart refuses a replay."""
        database = self.mktemp()
        cp = yield self.start(database=database)
        task = cp.tasks.create(AGENT_A, "echo hi")
        headers = self.signer().sign_headers()
        [listed] = yield self.poll(cp, headers=dict(headers))
        self.assertEqual(listed["id"], task.task_id)
        yield cp.stop()
        cp = yield self.start(database=database)
        yield self.assertRefused(cp, headers, "replayed nonce")
        self.assertEqual((yield self.poll(cp)), [])

    @inlineCallbacks
    def test_quota_shared_with_upgrades(self) -> Any:
        cp = yield self.start(nonce_quota=2)
        yield self.poll(cp)
        response = yield raw_request(cp.port, headers=self.signer().sign_headers())
        self.assertEqual(response.status, 101)
        response = yield self.call(cp, "GET", TASKS)
        self.assertJSONError(response, 429, "too many signed requests from this agent")
        response = yield self.call(cp, "GET", TASKS, signer=self.signer(KEY_B, AGENT_B))
        self.assertEqual(response.status, 200)

    @inlineCallbacks
    def test_one_log_line_per_refusal_without_secrets(self) -> Any:
        cp = yield self.start()
        events = self.capture_log()
        headers = _signer(KEY_B, AGENT_A, at=self.clock.now).sign_headers()
        response = yield self.call(cp, "GET", TASKS, headers=headers)
        self.assertEqual(response.status, 401)
        texts = [formatEvent(e) for e in events]
        refusals = [t for t in texts if "refused" in t]
        self.assertEqual(len(refusals), 1, texts)
        self.assertIn("invalid signature", refusals[0])
        self.assertIn(f"agent_id={AGENT_A}", refusals[0])
        self.assertIn("remote=127.0.0.1:", refusals[0])
        self.assertIn("GET /api/v1/tasks", refusals[0])
        for text in texts:
            self.assertNotIn(headers[HEADER_NONCE], text)
            self.assertNotIn(headers[HEADER_SIGNATURE][:40], text)
            self.assertNotIn("Traceback", text)


class HTTPRulesTests(AgentAPIMixin, TestCase):
    """Routes, methods, bodies and connections on the gateway listener."""

    @inlineCallbacks
    def test_unknown_paths_and_wrong_methods(self) -> Any:
        cp = yield self.start()
        for path in ("/api/v1/tasks/", "/api/v1/task", "/api/v1/tasks/a/b",
                     "/api/v1/agents/agent-a/heartbeat/x", "/api/v1/agents//heartbeat",
                     "/api/v1/tasks/%ff", "/api/v2/tasks"):
            response = yield self.call(cp, "GET", path)
            self.assertEqual(response.status, 404, path)
        for method, path, allowed in (
            ("POST", TASKS, "GET"), ("HEAD", TASKS, "GET"), ("DELETE", f"{TASKS}/x", "PUT"),
            ("GET", f"{TASKS}/x", "PUT"), ("GET", heartbeat_path(), "POST"),
        ):
            response = yield self.call(cp, method, path)
            self.assertEqual((response.status, response.headers.get("allow")), (405, allowed))
        self.assertEqual(cp.attempts, [])

    @inlineCallbacks
    def test_every_answer_closes_its_connection(self) -> Any:
        cp = yield self.start()
        response = yield self.poll_response(cp)
        self.assertEqual(response.headers["connection"], "close")

    @inlineCallbacks
    def poll_response(self, cp: ControlPlane) -> Any:
        response = yield http(
            cp.port, "GET", TASKS,
            {"Connection": "keep-alive", **self.signer().sign_headers()},
        )
        return response

    @inlineCallbacks
    def test_bodies_only_where_taken_and_bounded(self) -> Any:
        """
        A body on an endpoint that takes none, an announced body over the
        limit (never sent: refused unread) and a chunked one are refused
        before authentication; the nonce is not used up.
        """
        cp = yield self.start(max_message_bytes=4096)
        task = cp.tasks.create(AGENT_A, "echo hi")
        for method, path, extra, status in (
            ("GET", TASKS, {"Content-Length": "2"}, 413),
            ("POST", heartbeat_path(), {"Content-Length": "2"}, 413),
            ("PUT", f"{TASKS}/{task.task_id}", {"Content-Length": "4097"}, 413),
            ("PUT", f"{TASKS}/{task.task_id}", {"Content-Length": "1000000000"}, 413),
            ("PUT", f"{TASKS}/{task.task_id}", {"Transfer-Encoding": "chunked"}, 411),
        ):
            headers = self.signer().sign_headers()
            response = yield http(cp.port, method, path, {**headers, **extra})
            self.assertEqual(response.status, status, (method, path, extra))
            self.assertEqual(response.headers["connection"], "close")
            # Not authenticated, so not spent: the same headers still work.
            if method == "GET":
                yield self.poll(cp, headers=headers)
        yield self.poll(cp)
        big = report_body(output="x" * (4096 - len(report_body(output=""))))
        self.assertEqual(len(big), 4096)
        response = yield self.report(cp, task.task_id, big)
        self.assertEqual(response.status, 200, response.text)

    @inlineCallbacks
    def test_a_taken_body_stays_in_memory(self) -> Any:
        """Twisted would write a body over 100 kB to a temporary file; ours is bounded."""
        from twisted.web import http as twisted_http

        created: list[object] = []
        original = twisted_http._getContentFile

        def spy(length: int | None) -> Any:
            created.append(length)
            return original(length)

        self.patch(twisted_http, "_getContentFile", spy)
        cp = yield self.start()
        task = cp.tasks.create(AGENT_A, "seq 100000")
        yield self.poll(cp)
        response = yield self.report(cp, task.task_id, report_body(output="9" * 200_000))
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(created, [])
        self.assertEqual(len(cp.tasks.output(task.task_id)[0]), 200_000)


class RouteTests(TestCase):
    def test_route(self) -> None:
        self.assertEqual(route(b"/api/v1/tasks").name, "tasks")  # type: ignore[union-attr]
        task = route(b"/api/v1/tasks/task-1%2F2")
        self.assertEqual((task.name, task.segment), ("task", "task-1/2"))  # type: ignore[union-attr]
        beat = route(b"/api/v1/agents/a%40b/heartbeat")
        self.assertEqual((beat.name, beat.segment), ("heartbeat", "a@b"))  # type: ignore[union-attr]
        for path in (b"/api/v1/agents/ws", b"/api/v1/tasks/" + b"x" * 1025, b"/healthz"):
            self.assertIsNone(route(path))
