"""
The operator API over loopback (controlplane/operatorapi.py on the operator
listener): the token, every endpoint's answer and refusals, bodies, and the
output stream ending with the task.  Output and finals are stored the way
the intake stores them; the CLI tests run a real agent.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from hostlink_tw.controlplane import ControlPlane, OutputChunk, start_control_plane
from hostlink_tw.controlplane.operatorapi import MAX_LIST_LIMIT, max_request_bytes
from hostlink_tw.wire.payloads import TaskFinalPayload

from .test_client_support import AGENT, key

TOKEN = "operator-test-token-0123456789"
WAIT = 10.0


class _Collect(Protocol):
    """Sends one request, keeps everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()
        self.arrived: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)

    def more(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.arrived.append(d)
        return d.addTimeout(WAIT, reactor)


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        if self.headers.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def request_bytes(
    method: str, path: str, token: str | None = TOKEN, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class _Base(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.cp: ControlPlane = yield start_control_plane(
            {AGENT: key().public_key(), "agent-other": key().public_key()},
            operator_listen="tcp:0:interface=127.0.0.1",
            operator_token=TOKEN,
            ping_interval=0,
        )
        self.addCleanup(self.cp.stop)
        self.port = int(self.cp.operator_url.rsplit(":", 1)[1])

    def connect(self, raw: bytes) -> Deferred[_Collect]:
        protocol = _Collect(raw)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        return connectProtocol(endpoint, protocol).addCallback(lambda _: protocol)

    @inlineCallbacks
    def send(self, raw: bytes) -> Generator[Deferred[Any], Any, Answer]:
        protocol = yield self.connect(raw)
        data = yield protocol.done.addTimeout(WAIT, reactor)
        return Answer(data)

    def call(
        self, method: str, path: str, document: Any = None, **options: Any
    ) -> Deferred[Answer]:
        body = None if document is None else json.dumps(document).encode()
        return self.send(request_bytes(method, path, body=body, **options))

    def assertError(self, answer: Answer, status: int, code: str) -> None:
        self.assertEqual(answer.status, status, answer.body)
        self.assertEqual(answer.headers.get("content-type"), "application/json")
        error = answer.json()
        self.assertEqual(error["error"], code)
        self.assertIsInstance(error["message"], str)
        self.assertTrue(error["message"])


class AuthTests(_Base):
    @inlineCallbacks
    def test_missing_token_is_401(self) -> Any:
        for method, path in [("GET", "/operator/v1/tasks"), ("POST", "/operator/v1/tasks"),
                             ("GET", "/operator/v1/agents"), ("GET", "/operator/v1/nowhere")]:
            answer = yield self.send(request_bytes(method, path, token=None))
            self.assertError(answer, 401, "unauthorized")
            self.assertEqual(answer.headers["www-authenticate"], 'Bearer realm="hostlink-operator"')
        self.assertEqual(self.cp.tasks.list(), [])

    @inlineCallbacks
    def test_wrong_token_is_401_and_does_nothing(self) -> Any:
        for token in ("x" * len(TOKEN), TOKEN + "x", TOKEN[:-1], ""):
            answer = yield self.call("POST", "/operator/v1/tasks",
                                     {"agent_id": AGENT, "command": "true"}, token=token)
            self.assertError(answer, 401, "unauthorized")
        answer = yield self.send(request_bytes(
            "GET", "/operator/v1/tasks", token=None, headers={"Authorization": f"Basic {TOKEN}"}
        ))
        self.assertError(answer, 401, "unauthorized")
        self.assertEqual(self.cp.tasks.list(), [])

    @inlineCallbacks
    def test_status_needs_no_token_as_before(self) -> Any:
        answer = yield self.send(request_bytes("GET", "/status", token=None))
        self.assertEqual(answer.status, 200)
        self.assertIn("sessions", answer.json())

    @inlineCallbacks
    def test_without_a_token_no_api_is_served(self) -> Any:
        cp = yield start_control_plane({AGENT: key().public_key()},
                                       operator_listen="tcp:0:interface=127.0.0.1")
        self.addCleanup(cp.stop)
        self.port = int(cp.operator_url.rsplit(":", 1)[1])
        answer = yield self.call("GET", "/operator/v1/tasks")
        self.assertEqual(answer.status, 404)


class TaskEndpointTests(_Base):
    @inlineCallbacks
    def test_create_show_list_cancel(self) -> Any:
        answer = yield self.call("POST", "/operator/v1/tasks", {"agent_id": AGENT, "command": "ls"})
        self.assertEqual(answer.status, 201, answer.body)
        task = answer.json()
        self.assertEqual(answer.headers["location"], f"/operator/v1/tasks/{task['task_id']}")
        self.assertEqual((task["agent_id"], task["command"], task["status"]),
                         (AGENT, "ls", "pending"))
        self.assertFalse(task["finished"])
        self.assertEqual(self.cp.tasks.get(task["task_id"]).command, "ls")

        shown = (yield self.call("GET", f"/operator/v1/tasks/{task['task_id']}")).json()
        for name in ("status", "exit_code", "created_at", "started_at", "ended_at", "stdout",
                     "stderr", "stdout_omitted_bytes", "attempts"):
            self.assertIn(name, shown)
        self.assertEqual(len(shown["attempts"]), 1)
        self.assertTrue(shown["attempts"][0]["current"])

        cancelled = (yield self.call("POST", f"/operator/v1/tasks/{task['task_id']}/cancel")).json()
        self.assertEqual(cancelled["status"], "cancelled")
        self.assertEqual(self.cp.tasks.get(task["task_id"]).status, "cancelled")
        again = yield self.call("POST", f"/operator/v1/tasks/{task['task_id']}/cancel")
        self.assertEqual((again.status, again.json()["status"]), (200, "cancelled"))

    @inlineCallbacks
    def test_show_has_the_output(self) -> Any:
        record = self.cp.tasks.create(AGENT, "echo")
        chunk = OutputChunk(record.task_id, record.execution_attempt_id, "stderr", 1, "bad\n", 4)
        self.cp.tasks.store.output.append(chunk, 1 << 20, 0.0)
        shown = (yield self.call("GET", f"/operator/v1/tasks/{record.task_id}")).json()
        self.assertEqual((shown["stdout"], shown["stderr"]), ("", "bad\n"))
        self.assertEqual(shown["stderr_omitted_bytes"], 0)

    @inlineCallbacks
    def test_list_newest_first_with_filters(self) -> Any:
        first = self.cp.tasks.create(AGENT, "one")
        second = self.cp.tasks.create("agent-other", "two")
        third = self.cp.tasks.create(AGENT, "three")
        self.cp.tasks.cancel(third.task_id)
        listed = (yield self.call("GET", "/operator/v1/tasks")).json()
        self.assertEqual([t["task_id"] for t in listed["tasks"]],
                         [third.task_id, second.task_id, first.task_id])
        self.assertEqual(listed["total"], 3)
        mine = (yield self.call("GET", f"/operator/v1/tasks?agent_id={AGENT}")).json()
        self.assertEqual([t["task_id"] for t in mine["tasks"]], [third.task_id, first.task_id])
        pending = (yield self.call("GET", "/operator/v1/tasks?status=pending&limit=1")).json()
        self.assertEqual([t["task_id"] for t in pending["tasks"]], [second.task_id])
        self.assertEqual(pending["total"], 2)

    @inlineCallbacks
    def test_agents_with_session_state(self) -> Any:
        self.cp.tasks.create(AGENT, "one")
        agents = (yield self.call("GET", "/operator/v1/agents")).json()["agents"]
        self.assertEqual([a["agent_id"] for a in agents], sorted([AGENT, "agent-other"]))
        mine = next(a for a in agents if a["agent_id"] == AGENT)
        self.assertEqual(mine, {"agent_id": AGENT, "authorized": True, "session": None,
                                "accepts_tasks": False, "unfinished_tasks": 1})


class RefusalTests(_Base):
    @inlineCallbacks
    def test_bad_bodies_are_400(self) -> Any:
        for body in (b"", b"{", b"[]", b'"x"', b"\xff\xfe", b'{"agent_id": "a"}',
                     b'{"command": "ls"}', b'{"agent_id": 3, "command": "ls"}',
                     b'{"agent_id": "%s", "command": ["ls"]}' % AGENT.encode(),
                     b'{"agent_id": "%s", "command": NaN}' % AGENT.encode()):
            answer = yield self.send(request_bytes("POST", "/operator/v1/tasks", body=body))
            self.assertError(answer, 400, "invalid_request")
        self.assertEqual(self.cp.tasks.list(), [])

    @inlineCallbacks
    def test_refused_commands_name_their_rule(self) -> Any:
        cases = [
            ({"agent_id": AGENT, "command": ""}, 400, "invalid_command"),
            ({"agent_id": AGENT, "command": "a\x00b"}, 400, "invalid_command"),
            ({"agent_id": AGENT, "command": "\ud800"}, 400, "invalid_command"),
            ({"agent_id": AGENT, "command": "x" * (64 * 1024 + 1)}, 400, "command_too_long"),
            ({"agent_id": "agent-unknown", "command": "ls"}, 404, "unknown_agent"),
        ]
        for document, status, code in cases:
            answer = yield self.call("POST", "/operator/v1/tasks", document)
            self.assertError(answer, status, code)
        self.assertEqual(self.cp.tasks.list(), [])

    @inlineCallbacks
    def test_too_many_pending_is_429(self) -> Any:
        cp = yield start_control_plane(
            {AGENT: key().public_key()}, operator_listen="tcp:0:interface=127.0.0.1",
            operator_token=TOKEN, max_pending_tasks=1,
        )
        self.addCleanup(cp.stop)
        self.port = int(cp.operator_url.rsplit(":", 1)[1])
        first = yield self.call("POST", "/operator/v1/tasks", {"agent_id": AGENT, "command": "a"})
        self.assertEqual(first.status, 201)
        second = yield self.call("POST", "/operator/v1/tasks", {"agent_id": AGENT, "command": "b"})
        self.assertError(second, 429, "too_many_pending")

    @inlineCallbacks
    def test_unknown_task_is_404(self) -> Any:
        for method, path in [("GET", "/operator/v1/tasks/task-nope"),
                             ("POST", "/operator/v1/tasks/task-nope/cancel"),
                             ("GET", "/operator/v1/tasks/task-nope/output?follow=1")]:
            answer = yield self.call(method, path)
            self.assertError(answer, 404, "unknown_task")

    @inlineCallbacks
    def test_unknown_paths_and_methods(self) -> Any:
        for path in ("/operator/v1", "/operator/v1/", "/operator/v1/tasks/x/y",
                     "/operator/v1/tasks//cancel", "/operator/v1/agents/x"):
            self.assertError((yield self.call("GET", path)), 404, "not_found")
        answer = yield self.call("DELETE", "/operator/v1/tasks")
        self.assertError(answer, 405, "method_not_allowed")
        self.assertEqual(answer.headers["allow"], "GET, POST")
        self.assertError((yield self.call("GET", "/operator/v1/tasks/x/cancel")), 405,
                         "method_not_allowed")

    @inlineCallbacks
    def test_bad_query_parameters_are_400(self) -> Any:
        record = self.cp.tasks.create(AGENT, "ls")
        for path in ("/operator/v1/tasks?limit=0", f"/operator/v1/tasks?limit={MAX_LIST_LIMIT + 1}",
                     "/operator/v1/tasks?limit=x", "/operator/v1/tasks?status=nope",
                     "/operator/v1/tasks?agent_id=a&agent_id=b",
                     f"/operator/v1/tasks/{record.task_id}/output?after_stdout=-1",
                     f"/operator/v1/tasks/{record.task_id}/output?follow=maybe"):
            self.assertError((yield self.call("GET", path)), 400, "invalid_request")

    @inlineCallbacks
    def test_large_and_chunked_bodies_are_refused_unread(self) -> Any:
        limit = max_request_bytes(self.cp.settings.max_command_bytes)
        too_big = request_bytes("POST", "/operator/v1/tasks", body=b"x" * (limit + 1))
        self.assertError((yield self.send(too_big)), 413, "body_too_large")
        chunked = request_bytes("POST", "/operator/v1/tasks", body=b"5\r\nhello\r\n0\r\n\r\n",
                                headers={"Transfer-Encoding": "chunked"})
        self.assertError((yield self.send(chunked)), 411, "length_required")
        self.assertEqual(self.cp.tasks.list(), [])


class OutputStreamTests(_Base):
    def store_output(self, task: Any, stream: str, sequence: int, data: str) -> None:
        chunk = OutputChunk(task.task_id, task.execution_attempt_id, stream, sequence, data,
                            len(data))
        stored, _ = self.cp.tasks.store.output.append(chunk, 1 << 20, 0.0)
        assert stored is not None
        self.cp.tasks.output_stored(stored)

    @inlineCallbacks
    def test_follow_streams_as_output_arrives_and_ends_with_the_task(self) -> Any:
        task = self.cp.tasks.create(AGENT, "echo")
        self.store_output(task, "stdout", 1, "first\n")
        protocol = yield self.connect(
            request_bytes("GET", f"/operator/v1/tasks/{task.task_id}/output?follow=1")
        )
        while b"first" not in protocol.data:
            yield protocol.more()
        self.assertIn(b"application/x-ndjson", protocol.data)
        self.assertFalse(protocol.done.called)
        self.store_output(task, "stdout", 2, "second\n")
        while b"second" not in protocol.data:
            yield protocol.more()
        self.assertFalse(protocol.done.called)
        stored, changed = self.cp.tasks.store.record_final(
            "final", task.execution_attempt_id, TaskFinalPayload("failed", 4), 0.0
        )
        self.cp.tasks.task_changed(changed)  # type: ignore[arg-type]
        raw = yield protocol.done.addTimeout(WAIT, reactor)
        events = [json.loads(line) for line in Answer(raw).body.splitlines()]
        self.assertEqual([e["event"] for e in events], ["status", "output", "output", "end"])
        self.assertEqual([e["data"] for e in events if e["event"] == "output"],
                         ["first\n", "second\n"])
        self.assertEqual((events[-1]["task"]["status"], events[-1]["task"]["exit_code"]),
                         ("failed", 4))

    @inlineCallbacks
    def test_without_follow_the_stream_ends_at_once(self) -> Any:
        task = self.cp.tasks.create(AGENT, "echo")
        self.store_output(task, "stderr", 1, "e")
        answer = yield self.call("GET", f"/operator/v1/tasks/{task.task_id}/output")
        events = [json.loads(line) for line in answer.body.splitlines()]
        self.assertEqual([e["event"] for e in events], ["status", "output", "end"])

    @inlineCallbacks
    def test_stopping_the_control_plane_ends_a_follower(self) -> Any:
        task = self.cp.tasks.create(AGENT, "echo")
        protocol = yield self.connect(
            request_bytes("GET", f"/operator/v1/tasks/{task.task_id}/output?follow=1")
        )
        while b"status" not in protocol.data:
            yield protocol.more()
        yield self.cp.stop()
        yield protocol.done.addTimeout(WAIT, reactor)
        self.assertEqual(self.flushLoggedErrors(), [])
