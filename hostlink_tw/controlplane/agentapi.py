"""
The agent API on the gateway listener: the HTTP paths of PROTOCOL §9.1, the
server side (:class:`AgentAPI`).

============================================  ==================================================
``GET /api/v1/tasks``                         200, a JSON array of the agent's tasks to run
``PUT /api/v1/tasks/{id}``                    200 once the report (a final) is taken
``POST /api/v1/agents/{agent_id}/heartbeat``  200, ``{"message", "pending_tasks": [task, …]}``
============================================  ==================================================

* Every request is authenticated as the upgrade is
  (:class:`~hostlink_tw.controlplane.upgrade.UpgradeAuthenticator`): the four
  signed headers of §2, the timestamp within ``max_skew``, a known agent, a
  valid signature, a nonce not seen on any request or upgrade inside the
  window (one replay memory, written to disk before the request is acted
  on, as for the upgrade).  A refusal is 401 (429 over the agent's quota,
  503 with a full replay memory) with ``{"message": reason}`` and one log
  line.
* A task is ``{id, execution_attempt_id, command, status, priority, output,
  error, exit_code, created_at, updated_at}`` (:func:`task_json`; times RFC
  3339 UTC).  Which tasks are offered, and what a report does:
  :mod:`~hostlink_tw.controlplane.taskhttp` (pending and delivered ones,
  with their current attempt; a report applied once, whichever path brought
  the attempt's final first).
* The report's body is a ``task.final`` payload: ``status`` (``completed``,
  ``failed`` or ``interrupted``) and ``exit_code`` required, ``output`` and
  ``error`` optional strings, ``output_truncated``/``error_truncated``
  optional booleans and ``execution_attempt_id`` optional (ours: a report
  that names its attempt cannot land on a newer one).  Its size is bounded
  by ``max_message_bytes``, as a ``task.final`` frame is
  (:mod:`~hostlink_tw.controlplane.gatewaysite` refuses a larger body
  unread).
* Errors are JSON ``{"message": …}``: 400 a body that is not such a
  payload, 403 a heartbeat for another agent's id, 404 an unknown task or
  another agent's (the same answer: no way to probe for ids), 405 a wrong
  method (with ``Allow``), 409 a report about an attempt the task does not
  have or never delivered, 503 the task store failing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hostlink_tw.controlplane.connections import format_address
from hostlink_tw.controlplane.inbound import printable
from hostlink_tw.controlplane.taskhttp import ReportOutcome
from hostlink_tw.controlplane.taskmodel import TaskRecord, TaskRefusedError, UnknownTaskError
from hostlink_tw.controlplane.taskstore import TaskStoreError
from hostlink_tw.controlplane.upgrade import UpgradeAuthenticator, UpgradeRefusedError
from hostlink_tw.wire.envelope import format_sent_at
from hostlink_tw.wire.errors import INVALID_PAYLOAD, ProtocolError
from hostlink_tw.wire.jsontext import loads_frame
from hostlink_tw.wire.payloads import TaskFinalPayload
from hostlink_tw.wire.vocabulary import HEADER_AGENT_ID, SIGNED_HEADERS

__all__ = ["API_PREFIX", "AgentAPI", "AgentTasks", "Endpoint", "route", "task_json"]

log = Logger()

#: Every agent API path starts with it.
API_PREFIX = b"/api/v1/"

TASKS = "tasks"
TASK = "task"
HEARTBEAT = "heartbeat"
# The one method each endpoint answers.
_METHODS = {TASKS: b"GET", TASK: b"PUT", HEARTBEAT: b"POST"}
# Longest path segment (a task or agent id, percent-encoded) looked at.
_MAX_SEGMENT = 1024
_MAX_ATTEMPT_ID = 256


@runtime_checkable
class AgentTasks(Protocol):
    """The task side the agent API serves (the control plane's :class:`TaskService`)."""

    def offer(self, agent_id: str) -> list[TaskRecord]:
        """The tasks the agent should run now; pending ones become delivered."""

    def report(
        self, agent_id: str, task_id: str, final: TaskFinalPayload, attempt_id: str | None = None
    ) -> ReportOutcome:
        """Take the agent's report of an attempt's end."""


@dataclass(frozen=True)
class Endpoint:
    """A request path as the API reads it: which endpoint, and the id in it (or "")."""

    name: str
    segment: str = ""

    @property
    def method(self) -> bytes:
        """The one method the endpoint answers."""
        return _METHODS[self.name]


def _segment(raw: bytes) -> str | None:
    if not raw or b"/" in raw or len(raw) > _MAX_SEGMENT:
        return None
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


def route(path: bytes) -> Endpoint | None:
    """The endpoint of a request path (without its query), or None: not found."""
    if not path.startswith(API_PREFIX):
        return None
    parts = path[len(API_PREFIX) :].split(b"/")
    if parts == [b"tasks"]:
        return Endpoint(TASKS)
    if len(parts) == 2 and parts[0] == b"tasks":
        segment = _segment(parts[1])
        return None if segment is None else Endpoint(TASK, segment)
    if len(parts) == 3 and parts[0] == b"agents" and parts[2] == b"heartbeat":
        segment = _segment(parts[1])
        return None if segment is None else Endpoint(HEARTBEAT, segment)
    return None


def task_json(record: TaskRecord) -> dict[str, Any]:
    """A task as §9.1 lists it (Go's task object; ``priority`` is always 0 here)."""
    final = record.final
    return {
        "id": record.task_id,
        "execution_attempt_id": record.execution_attempt_id,
        "command": record.command,
        "status": record.status,
        "priority": 0,
        "output": final.output if final is not None else "",
        "error": final.error if final is not None else "",
        "exit_code": record.exit_code if record.exit_code is not None else 0,
        "created_at": format_sent_at(record.created_at),
        "updated_at": format_sent_at(record.updated_at),
    }


class _RefusedError(Exception):
    """An authenticated request refused: the status and the message the agent reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _signed_headers(request: Request) -> dict[str, str]:
    """The four signed headers, lower-cased, as Autobahn reads an upgrade's."""
    headers: dict[str, str] = {}
    for name in SIGNED_HEADERS:
        values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
        if values:
            # Repeated: joined, as Autobahn joins them, so the format checks refuse it.
            headers[name.lower()] = ", ".join(v.decode("iso-8859-1") for v in values)
    return headers


def _parse_report(body: bytes) -> tuple[TaskFinalPayload, str | None]:
    """
    The final and the attempt id a report's body holds.

    :raises ProtocolError: It is not such a body.
    """
    data = loads_frame(body)
    if not isinstance(data, dict):
        raise ProtocolError(INVALID_PAYLOAD, "the body must be a JSON object")
    final = TaskFinalPayload.from_dict(data, at="body")
    attempt = data.get("execution_attempt_id")
    if attempt is not None and (
        not isinstance(attempt, str) or not 0 < len(attempt) <= _MAX_ATTEMPT_ID
    ):
        raise ProtocolError(
            INVALID_PAYLOAD,
            f"body.execution_attempt_id must be a string of 1 to {_MAX_ATTEMPT_ID} characters",
        )
    return final, attempt


class AgentAPI(Resource):
    """The agent API's endpoints (see the module docstring); a leaf under ``/api/v1/``."""

    isLeaf = True

    def __init__(
        self,
        authenticator: UpgradeAuthenticator,
        clock: Callable[[], float],
        body_limit: int,
    ) -> None:
        """
        :param authenticator: The upgrade's, and its replay memory.
        :param clock: Wall-clock Unix time (heartbeat times).
        :param body_limit: The largest request body taken, in bytes.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self._authenticator = authenticator
        self._clock = clock
        #: The largest request body taken (bytes).
        self.body_limit = body_limit
        self._tasks: AgentTasks | None = None
        self._heartbeats: dict[str, float] = {}

    def attach_tasks(self, tasks: AgentTasks) -> None:
        """Serve this task side (until then the task endpoints answer 503)."""
        self._tasks = tasks

    def takes_body(self, method: bytes, path: bytes) -> bool:
        """Whether a request with this method and path may have a body."""
        endpoint = route(path)
        return endpoint is not None and endpoint.name == TASK and method == endpoint.method

    def last_heartbeat(self, agent_id: str) -> float | None:
        """When the agent's last accepted heartbeat came (Unix time), if one did."""
        return self._heartbeats.get(agent_id)

    # -- a request ------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        """Route, check the method, authenticate, then serve (once the nonce is stored)."""
        endpoint = route(request.path)
        if endpoint is None:
            return _json(request, 404, {"message": "not found"})
        if request.method != endpoint.method:
            request.setHeader(b"Allow", endpoint.method)  # type: ignore[no-untyped-call]
            return _json(
                request, 405, {"message": f"{endpoint.method.decode()} is the method here"}
            )
        headers = _signed_headers(request)
        try:
            credentials = self._authenticator.check(headers, kind="signed requests")
        except UpgradeRefusedError as refused:
            return self._refuse(
                request, refused.status, refused.reason, headers.get(HEADER_AGENT_ID.lower())
            )
        agent_id = credentials.agent_id
        stored = self._authenticator.commit(credentials)
        if stored is None:
            return self._serve(request, endpoint, agent_id)
        return self._later(request, stored, endpoint, agent_id)

    def _later(
        self, request: Request, stored: Deferred[None], endpoint: Endpoint, agent_id: str
    ) -> int:
        """Serve once the nonce is on disk: a restart must not accept it again."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def committed(_: object) -> bytes:
            # Nobody waits for the answer any more: leave the tasks as they are.
            return b"" if gone else self._serve(request, endpoint, agent_id)

        def failed(failure: Failure) -> bytes:
            log.error(
                "replay store write failed, refusing the request: {error}",
                error=str(failure.value),
            )
            return self._refuse(
                request, 503, "replay store unavailable, try again later", agent_id
            )

        def answer(body: bytes) -> None:
            if not gone:
                # A length, not chunks: as a synchronous answer has.
                request.setHeader(b"Content-Length", b"%d" % len(body))  # type: ignore[no-untyped-call]
                request.write(body)  # type: ignore[no-untyped-call]
                request.finish()  # type: ignore[no-untyped-call]

        def broken(failure: Failure) -> None:
            log.failure("agent API request failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()  # type: ignore[no-untyped-call]

        stored.addCallbacks(committed, failed).addCallback(answer).addErrback(broken)
        return NOT_DONE_YET

    def _serve(self, request: Request, endpoint: Endpoint, agent_id: str) -> bytes:
        """The answer to an authenticated request."""
        try:
            if self._tasks is None:
                raise _RefusedError(503, "tasks are not available on this control plane")
            if endpoint.name == TASKS:
                return _json(request, 200, [task_json(t) for t in self._tasks.offer(agent_id)])
            if endpoint.name == HEARTBEAT:
                return self._heartbeat(request, endpoint.segment, agent_id, self._tasks)
            return self._report(request, endpoint.segment, agent_id, self._tasks)
        except _RefusedError as refused:
            return self._refuse(request, refused.status, refused.message, agent_id)
        except TaskStoreError as e:
            log.error("task store failed, agent API request refused: {error}", error=str(e))
            return self._refuse(request, 503, "the task store is unavailable, try again later",
                                agent_id)

    def _heartbeat(
        self, request: Request, path_agent_id: str, agent_id: str, tasks: AgentTasks
    ) -> bytes:
        if path_agent_id != agent_id:
            raise _RefusedError(
                403, "the agent id in the path is not the one that signed the request"
            )
        self._heartbeats[agent_id] = self._clock()
        pending = [task_json(t) for t in tasks.offer(agent_id)]
        return _json(request, 200, {"message": "heartbeat received", "pending_tasks": pending})

    def _report(self, request: Request, task_id: str, agent_id: str, tasks: AgentTasks) -> bytes:
        assert request.content is not None  # the channel gives every request a body file
        try:
            final, attempt = _parse_report(request.content.read())
        except ProtocolError as e:
            raise _RefusedError(400, e.message) from None
        try:
            outcome = tasks.report(agent_id, task_id, final, attempt)
        except UnknownTaskError:
            raise _RefusedError(404, "no such task") from None
        except TaskRefusedError as e:
            raise _RefusedError(409, e.message) from None
        message = (
            "report stored"
            if outcome.applied
            else "this attempt's final was already received; nothing changed"
        )
        return _json(
            request, 200,
            {"message": message, "applied": outcome.applied, "status": outcome.task.status},
        )

    def _refuse(
        self, request: Request, status: int, reason: str, agent_id: str | None
    ) -> bytes:
        """A refusal: one log line (never a header's value but the agent id), a JSON answer."""
        log.warn(
            "agent API request refused: {reason} (HTTP {status}) agent_id={agent_id} "
            "remote={remote} request={method} {path}",
            reason=reason,
            status=status,
            agent_id=printable(agent_id),
            remote=format_address(request.getClientAddress()),  # type: ignore[no-untyped-call]
            method=printable(request.method.decode("iso-8859-1"), 16),
            path=printable(request.path.decode("iso-8859-1")),
        )
        return _json(request, status, {"message": reason})


def _json(request: Request, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
    data = json.dumps(body).encode("utf-8") + b"\n"
    if request.method == b"HEAD":  # only ever refused: the headers, no body
        request.setHeader(b"Content-Length", b"%d" % len(data))  # type: ignore[no-untyped-call]
        return b""
    return data
