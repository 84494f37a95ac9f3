"""
The operator API: tasks and agents over HTTP, JSON, behind a bearer token
(:class:`OperatorAPI`, served under ``/operator/v1/`` on the operator
listener, next to ``GET /status``).

===========================================  ============================================
``GET /operator/v1/agents``                  every agent: authorized, its session, tasks
``GET /operator/v1/tasks``                   tasks, newest first (``agent_id``, ``status``,
                                             ``limit`` 1–1000, default 100)
``POST /operator/v1/tasks``                  ``{"agent_id", "command"}`` → 201, the task
``GET /operator/v1/tasks/{id}``              the task, its attempts, its output (tails)
``POST /operator/v1/tasks/{id}/cancel``      cancel it → the task
``GET /operator/v1/tasks/{id}/output``       its output as NDJSON, live with ``follow=1``
                                             (:mod:`~hostlink_tw.controlplane.operatorfollow`)
===========================================  ============================================

Every request needs ``Authorization: Bearer <token>`` (compared in constant
time); without it, or with another token, the answer is 401 before
anything else is looked at.  Errors are JSON, ``{"error": code, "message":
text}``, with the HTTP status that fits: 400 (a bad body or parameter, a
refused command), 401, 404 (no such task, agent or path), 405, 409, 411,
413, 429 (the agent's pending-task limit), 503 (the task store failed), 500.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hostlink_tw.controlplane.operatorfollow import OutputFollower, task_document
from hostlink_tw.controlplane.operatortoken import tokens_equal
from hostlink_tw.controlplane.taskdb import TaskStoreError
from hostlink_tw.controlplane.taskmodel import (
    TASK_STATUSES,
    TaskRefusedError,
    UnknownTaskError,
)
from hostlink_tw.wire.payloads import STREAM_STDERR, STREAM_STDOUT

if TYPE_CHECKING:
    from hostlink_tw.controlplane.plane import ControlPlane

__all__ = [
    "API_PREFIX",
    "MAX_LIST_LIMIT",
    "SHOW_OUTPUT_BYTES",
    "OperatorAPI",
    "error_body",
    "max_request_bytes",
]

log = Logger()

#: Where the API lives on the operator listener.
API_PREFIX = "/operator/v1"
#: The most tasks one list returns.
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
#: The most of each stream ``GET /operator/v1/tasks/{id}`` includes (its end).
SHOW_OUTPUT_BYTES = 1 << 20
#: The ``Bearer`` realm a 401 names.
REALM = b'Bearer realm="hostlink-operator"'

# TaskRefusedError codes whose HTTP status is not 400.
_REFUSAL_STATUS = {
    "unknown_agent": 404,
    "too_many_pending": 429,
    "task_cancelled": 409,
    "task_finished": 409,
}
_STREAMS = (STREAM_STDOUT, STREAM_STDERR)


class _ProblemError(Exception):
    """An answer other than success: the HTTP status and the JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def max_request_bytes(max_command_bytes: int) -> int:
    """
    The longest request body worth reading: a command of ``max_command_bytes``
    written with JSON escapes (up to 6 bytes each), and room for the rest.
    """
    return 6 * max_command_bytes + 64 * 1024


def error_body(code: str, message: str) -> bytes:
    """The JSON document of an error answer."""
    return json.dumps({"error": code, "message": message}).encode("ascii") + b"\n"


def _json_body(document: Any) -> bytes:
    return json.dumps(document, indent=2).encode("ascii") + b"\n"


def _tail(text: str, limit: int) -> tuple[str, int]:
    """The end of ``text`` in ``limit`` UTF-8 bytes (whole characters), and the bytes left out."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text, 0
    start = len(encoded) - limit
    # Step forward over continuation bytes (10xxxxxx) to a character boundary.
    while start < len(encoded) and (encoded[start] & 0xC0) == 0x80:
        start += 1
    return encoded[start:].decode("utf-8", "surrogatepass"), start


class OperatorAPI(Resource):
    """The ``/operator/v1/`` tree of one control plane (a leaf: it routes the whole path)."""

    isLeaf = True

    def __init__(self, control_plane: ControlPlane, token: str) -> None:
        """
        :param control_plane: Whose tasks and agents (``tasks``, ``agents``,
            ``sessions()``, ``reactor``).
        :param token: The bearer token every request must present.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self._cp = control_plane
        self._expected = f"Bearer {token}".encode("ascii")

    # -- the request -------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        """Authenticate, route, answer; every failure is a JSON error."""
        try:
            self._authenticate(request)
            handler, arguments = self._route(request)
            return handler(request, *arguments)
        except _ProblemError as p:
            return self._error(request, p.status, p.code, p.message)
        except UnknownTaskError as e:
            return self._error(request, 404, "unknown_task", str(e))
        except TaskRefusedError as e:
            return self._error(request, _REFUSAL_STATUS.get(e.code, 400), e.code, e.message)
        except TaskStoreError as e:
            log.error("operator API: the task store failed: {error}", error=str(e))
            return self._error(request, 503, "store_unavailable", "the task store failed; see "
                               "the control plane's log")
        except Exception:  # noqa: BLE001 - a bug must not become a traceback page
            log.failure("operator API: answering {method} {path}",
                        method=request.method, path=request.path)
            return self._error(request, 500, "internal_error",
                               "the control plane failed; see its log")

    def _authenticate(self, request: Request) -> None:
        presented = request.getHeader(b"Authorization")
        if presented is None:
            raise _ProblemError(401, "unauthorized",
                           "this API needs 'Authorization: Bearer <token>' (the token is in the "
                           "control plane's operator.token file)")
        if not tokens_equal(presented.strip(), self._expected):
            raise _ProblemError(401, "unauthorized", "wrong operator token")

    def _route(self, request: Request) -> tuple[Callable[..., bytes | int], tuple[str, ...]]:
        path = request.path.decode("ascii", "replace")
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            raise _ProblemError(404, "not_found", "no such path")
        try:
            parts = [unquote(p, errors="strict") for p in path[len(API_PREFIX):].split("/")[1:]]
        except UnicodeDecodeError:
            raise _ProblemError(404, "not_found", "no such path") from None
        method = request.method
        table: dict[bytes, Callable[..., bytes | int]]
        arguments: tuple[str, ...] = ()
        if parts == ["agents"]:
            table = {b"GET": self._agents}
        elif parts == ["tasks"]:
            table = {b"GET": self._list, b"POST": self._create}
        elif len(parts) == 2 and parts[0] == "tasks" and parts[1]:
            table, arguments = {b"GET": self._show}, (parts[1],)
        elif len(parts) == 3 and parts[0] == "tasks" and parts[1] and parts[2] == "cancel":
            table, arguments = {b"POST": self._cancel}, (parts[1],)
        elif len(parts) == 3 and parts[0] == "tasks" and parts[1] and parts[2] == "output":
            table, arguments = {b"GET": self._output}, (parts[1],)
        else:
            raise _ProblemError(404, "not_found", "no such path")
        handler = table.get(method)
        if handler is None:
            allowed = b", ".join(sorted(table))
            request.setHeader(b"Allow", allowed)  # type: ignore[no-untyped-call]
            raise _ProblemError(405, "method_not_allowed",
                           f"use {allowed.decode('ascii')} here, not "
                           f"{method.decode('ascii', 'replace')[:20]}")
        return handler, arguments

    # -- the endpoints ------------------------------------------------------------

    def _agents(self, request: Request) -> bytes:
        cp = self._cp
        authorized = cp.agents
        sessions = {s.agent_id: s for s in cp.sessions()}
        agents = []
        for agent_id in sorted(set(authorized) | set(sessions)):
            session = sessions.get(agent_id)
            agents.append({
                "agent_id": agent_id,
                "authorized": agent_id in authorized,
                "session": None if session is None else session.snapshot(),
                "accepts_tasks": cp.tasks.accepts_deliveries(agent_id),
                "unfinished_tasks": cp.tasks.store.count_unfinished(agent_id),
            })
        return self._ok(request, {"agents": agents})

    def _list(self, request: Request) -> bytes:
        agent_id = _query(request, "agent_id")
        status = _query(request, "status")
        if status is not None and status not in TASK_STATUSES:
            raise _ProblemError(400, "invalid_request",
                           f"status must be one of {', '.join(TASK_STATUSES)}")
        limit = _query_int(request, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        records = self._cp.tasks.list(agent_id)
        if status is not None:
            records = [r for r in records if r.status == status]
        newest = records[::-1][:limit]
        return self._ok(request, {
            "tasks": [task_document(r) for r in newest],
            "total": len(records),
        })

    def _create(self, request: Request) -> bytes:
        document = _read_json(request)
        agent_id, command = document.get("agent_id"), document.get("command")
        if not isinstance(agent_id, str) or not agent_id:
            raise _ProblemError(400, "invalid_request", "agent_id must be a non-empty string")
        if not isinstance(command, str):
            raise _ProblemError(400, "invalid_request", "command must be a string")
        record = self._cp.tasks.create(agent_id, command)
        request.setResponseCode(201)
        request.setHeader(  # type: ignore[no-untyped-call]
            b"Location", f"{API_PREFIX}/tasks/{record.task_id}".encode("ascii")
        )
        return self._ok(request, task_document(record), status=201)

    def _show(self, request: Request, task_id: str) -> bytes:
        tasks = self._cp.tasks
        document = task_document(tasks.get(task_id))
        document["attempts"] = [
            {
                "execution_attempt_id": a.execution_attempt_id,
                "state": a.state,
                "current": a.current,
                "deliveries": a.deliveries,
            }
            for a in tasks.attempts(task_id)
        ]
        for stream, text in zip(_STREAMS, tasks.output(task_id), strict=True):
            shown, omitted = _tail(text, SHOW_OUTPUT_BYTES)
            document[stream] = shown
            document[f"{stream}_omitted_bytes"] = omitted
        return self._ok(request, document)

    def _cancel(self, request: Request, task_id: str) -> bytes:
        return self._ok(request, task_document(self._cp.tasks.cancel(task_id)))

    def _output(self, request: Request, task_id: str) -> int:
        follow = _query_flag(request, "follow")
        attempt = _query(request, "attempt")
        after = {
            stream: _query_int(request, f"after_{stream}", 0, 0, 2**62)
            for stream in _STREAMS
        }
        follower = OutputFollower(
            request, self._cp.tasks, task_id, clock=self._cp.reactor,
            attempt=attempt, after=after, follow=follow,
        )
        follower.start()  # UnknownTaskError before anything is sent: a 404
        return NOT_DONE_YET

    # -- answers ---------------------------------------------------------------------

    @staticmethod
    def _ok(request: Request, document: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        request.setHeader(b"Cache-Control", b"no-store")  # type: ignore[no-untyped-call]
        return _json_body(document)

    @staticmethod
    def _error(request: Request, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status, HTTPStatus(status).phrase.encode("ascii"))
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        request.setHeader(b"Cache-Control", b"no-store")  # type: ignore[no-untyped-call]
        if status == 401:
            request.setHeader(b"WWW-Authenticate", REALM)  # type: ignore[no-untyped-call]
        return error_body(code, message)


# -- request parsing ---------------------------------------------------------------------


def _query(request: Request, name: str) -> str | None:
    """The one value of a query parameter, or None; two values or bad UTF-8 are a 400."""
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise _ProblemError(400, "invalid_request", f"{name} is given more than once")
    try:
        value: str = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _ProblemError(400, "invalid_request", f"{name} is not UTF-8") from None
    return value


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = _query(request, name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise _ProblemError(400, "invalid_request",
                       f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _query_flag(request: Request, name: str) -> bool:
    text = _query(request, name)
    if text is None:
        return False
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no", ""):
        return False
    raise _ProblemError(400, "invalid_request", f"{name} must be 1 or 0")


def _read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (the channel bounded its size)."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise _ProblemError(400, "invalid_request",
                       'the body must be a JSON object: {"agent_id": ..., "command": ...}')
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _ProblemError(400, "invalid_request", "the body is not valid JSON (UTF-8)") from None
    if not isinstance(document, dict):
        raise _ProblemError(400, "invalid_request",
                       'the body must be a JSON object: {"agent_id": ..., "command": ...}')
    return document


def _no_constant(name: str) -> float:
    # NaN and Infinity are not JSON.
    raise ValueError(name)
