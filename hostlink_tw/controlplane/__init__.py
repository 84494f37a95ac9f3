"""
The reference Hostlink control plane: a real agent gateway for tests, demos
and local development.

It serves the server side of the Hostlink agent protocol (docs/protocol.rst) over
Autobahn and Twisted Web, on any Twisted server endpoint (``tcp:…`` plain,
``ssl:…`` TLS).  The gateway listener serves only:

* ``GET /api/v1/agents/ws`` — the agent gateway (WebSocket upgrade).  Every
  upgrade is authenticated from the four signed headers (PROTOCOL §2):
  agent known, timestamp within ±``max_skew`` of our clock, RSA-PSS signature
  valid (salt length auto-detected, as Go's ``VerifyPSS(…, nil)``), nonce not
  seen inside the window.  Refusals are HTTP 401 with a short text body and
  one log line; a full nonce memory answers 503.
* The agent API, PROTOCOL §9.1 (:mod:`~hostlink_tw.controlplane.agentapi`),
  every request authenticated exactly as the upgrade, against the same
  replay memory (a nonce used on either is refused on both; refusals are 401
  with ``{"message": …}`` and one log line):

  - ``GET /api/v1/tasks`` — 200, a JSON array of the agent's tasks
    ``{id, execution_attempt_id, command, status, priority, output, error,
    exit_code, created_at, updated_at}``: its ``pending`` and ``delivered``
    ones, oldest first, with the attempt a session would deliver (a pending
    one becomes ``delivered``; never a second attempt).  Not listed:
    ``received``/``running`` tasks (the agent has them), finished ones, a task
    whose older attempt the agent may still hold, pending ones beyond
    ``delivery_window``.
  - ``PUT /api/v1/tasks/{id}`` — the agent's final (``status``,
    ``exit_code``, ``output``, ``error``; optionally the truncation flags and
    its ``execution_attempt_id``): 200 once taken, and again for a repeat or a
    final the session brought first (taken once, the first wins).  400 a body
    that is not such a final, 404 a task that is not the agent's, 409 an
    attempt the task does not have or never delivered.
  - ``POST /api/v1/agents/{agent_id}/heartbeat`` (no body) — 200
    ``{"message": …, "pending_tasks": [task, …]}`` (as ``GET``); 403 when the
    path's id is not the signer's.
* ``GET /healthz`` — ``200 ok``.
* anything else — 404.

Every answer but an accepted upgrade closes its connection, a request with a
body is refused (413) unread — but for a report, whose body (with a
``Content-Length``, else 411) may have ``max_message_bytes`` — and a
connection that is not an accepted WebSocket ``handshake_timeout`` after TCP
connect is aborted, whatever it has sent.  Unauthenticated connections are
capped apart from sessions (``max_pending_connections``; a new one closes
the oldest), so they cannot take the sessions' place (``max_connections``);
agent API requests count as such connections.  A peer that stops reading is
aborted once ``max_send_buffer_bytes`` wait to be sent to it.  The listen
backlog is Twisted's default of 50 pending TCP handshakes; a storm of more
agents needs a larger one in the endpoint (``tcp:8080:backlog=1024``; the
kernel caps it at ``net.core.somaxconn``).

A separate *operator* listener (:meth:`ControlPlane.listen_operator`; loopback
by default) serves ``GET /status``: JSON, the open sessions with each agent's
id and remote address, which is why it is not on the gateway.

Sessions
========
The agent's first message must be ``agent.hello``; it is answered with
``agent.hello_ack`` acking its ``message_id``, and from then on the session is
*active*.  Each inbound frame is validated against the authenticated agent
id; an invalid one gets an ``error`` envelope (``retryable: false``) and a
close.

Tasks (phase 2)
===============
The control plane runs shell commands on agents (PROTOCOL §7–§8, the server
side; :mod:`~hostlink_tw.controlplane.tasks`).  A phase-2 hello's reconnect
snapshot is answered with directives (finals already stored, attempts to
discard, where each stream's replay resumes, ``delivery_enabled``); tasks
go out as ``task.deliver`` to sessions whose hello advertised delivery, are
re-delivered on each new session until received, and never run as two
attempts at once; ``task.received``/``started``/``output``/``final`` are
stored, de-duplicated and acked (an output gap is a retryable
``output_sequence_gap`` error).  Tasks and their output live in
``tasks.db`` beside the agents file and survive a restart.

Close codes this control plane sends:

==========  ===========================================================
1000        closed on request (:meth:`Session.close` default)
1001        the control plane is stopping (:meth:`ControlPlane.stop`)
1007        a frame is not valid UTF-8 or not valid JSON (:data:`CLOSE_INVALID_PAYLOAD`)
1008        a policy violation: invalid envelope, binary frame, wrong first
            message, a type an agent may not send (:data:`CLOSE_POLICY`)
1009        a message larger than ``max_message_bytes`` (:data:`CLOSE_TOO_BIG`)
4001        replaced: the same agent opened a newer session (:data:`CLOSE_REPLACED`)
==========  ===========================================================

In-process use (tests, demos)
=============================
::

    from hostlink_tw.controlplane import start_control_plane

    cp = yield start_control_plane({"agent-1": public_key})   # RSAPublicKey or base64/PEM text
    cp.ws_url                       # "ws://127.0.0.1:<port>/api/v1/agents/ws"
    session = yield cp.wait_active("agent-1", timeout=10)   # hello_ack sent
    session = yield cp.wait_active("agent-1", new=True, timeout=10)   # the next one
    yield session.when_closed()           # fires with the close code
    envelope = yield cp.wait_message("agent-1", "task.received", timeout=10)
    cp.send_envelope("agent-1", make_envelope(ACK, "agent-1", {...}))
    cp.close("agent-1", 1008, "policy")   # any code, 1001/1008/… included
    cp.abort("agent-1")                   # drop TCP, no close frame
    cp.answer_pings = False               # stop answering the agent's pings
    cp.refuse_upgrades(503, duration=5)   # refuse every upgrade for 5 s
    cp.stall_upgrades()                   # hold upgrades unanswered (clear_stall() releases)
    cp.withhold_hello_ack = True          # hellos stay unanswered
    cp.attempts                           # upgrade attempts and verdicts (the last 10,000+)
    cp.record_messages = 1 << 20          # keep 1 MiB of inbound envelopes per session
    cp.session("agent-1").received        # ... here
    task = cp.tasks.create("agent-1", "echo hi")          # a TaskRecord
    task = yield cp.tasks.wait_final(task.task_id, timeout=10)
    stdout, stderr = cp.tasks.output(task.task_id)
    cp.tasks.get(task_id); cp.tasks.list("agent-1"); cp.tasks.cancel(task_id)
    cp.tasks.offer("agent-1"); cp.tasks.report("agent-1", task_id, final)   # the HTTP paths
    cp.tasks.on_output(callback, task_id)  # each stored chunk; returns unsubscribe
    cp.hold_acks(); cp.release_acks()     # withhold task acks (the agent's spool fills)
    cp.redeliver(task_id)                 # the same task.deliver again
    cp.new_attempt(task_id)               # a new execution_attempt_id
    yield cp.listen_operator()            # GET cp.operator_url + "/status"
    yield cp.stop()                       # closes everything, stops listening

:meth:`ControlPlane.wait_active` fires when the control plane has *sent* the
hello_ack; the agent learns it a moment later.  Autobahn's own timers run
on the global reactor; everything else (keepalive, handshake deadline,
chaos durations) on the ``reactor`` given.

Options (keyword arguments of :class:`ControlPlane` and :func:`start_control_plane`):
``agents_file``, ``clock`` (wall-clock Unix time for the timestamp window),
``max_skew`` (300 s), ``max_message_bytes`` (1 MiB), ``handshake_timeout``
(10 s from TCP connect to an accepted WebSocket), ``ping_interval`` (30 s)
and ``ping_timeout`` (20 s) for our keepalive, ``max_connections`` (1000
sessions; above it 503), ``max_pending_connections`` (256 connections not
yet upgraded), ``max_send_buffer_bytes`` (4 MiB), ``nonce_cache_size``
(100,000), ``nonce_quota`` (1000 upgrades and agent API requests per agent
inside the window; above it 429), ``database``
(the replay window's SQLite file, by default ``controlplane.db`` beside the
agents file; memory only without one), ``record_messages`` (0 bytes),
``reload_interval`` (1 s agents-file poll), ``tasks_database`` (the tasks'
SQLite file, by default ``tasks.db`` beside the agents file; memory only
without one), ``delivery_enabled`` (true), ``max_pending_tasks`` (1000 per
agent), ``max_command_bytes`` (64 KiB), ``max_output_bytes`` (64 MiB per
attempt and stream), ``delivery_window`` (16 attempts delivered and not
started per agent).  As a daemon it runs under
twistd: ``twistd -n hostlink-controlplane --agents agents.json``
(:mod:`hostlink_tw.controlplane.tap`).

Modules
=======
One concern each; every name used above is importable from this package.

* :mod:`~hostlink_tw.controlplane.plane` — :class:`ControlPlane` and
  :func:`start_control_plane`, which assemble the pieces below.
* :mod:`~hostlink_tw.controlplane.settings` — limits, timings, defaults.
* :mod:`~hostlink_tw.controlplane.agents` — the authorized agents: the file,
  reloads, polling.
* :mod:`~hostlink_tw.controlplane.upgrade` — the signed-upgrade rules.
* :mod:`~hostlink_tw.controlplane.replay` — the nonce memory and its SQLite
  store.
* :mod:`~hostlink_tw.controlplane.connections` — every TCP connection: the
  handshake deadline, the pending cap, send buffers.
* :mod:`~hostlink_tw.controlplane.web` — the operator listener's HTTP
  (``/status``).
* :mod:`~hostlink_tw.controlplane.gatewaysite` — the gateway listener's HTTP:
  routes (``/healthz``, the agent API, 404), which requests may have a body.
* :mod:`~hostlink_tw.controlplane.agentapi` — the agent API (§9.1).
* :mod:`~hostlink_tw.controlplane.gateway` — the Autobahn server protocol
  and factory.
* :mod:`~hostlink_tw.controlplane.hooks` — where a layer on top may change
  what the gateway does (its defaults are the real gateway).
* :mod:`~hostlink_tw.controlplane.inbound` — what a session does with each
  message type.
* :mod:`~hostlink_tw.controlplane.sessions` — :class:`Session` and the
  registry of open sessions with their waiters.
* :mod:`~hostlink_tw.controlplane.testlayer` — the test and chaos knobs, as
  gateway hooks on top of the real gateway.
* :mod:`~hostlink_tw.controlplane.trackers` — receive-side de-duplication
  and output sequences (phase 2's task intake).
* :mod:`~hostlink_tw.controlplane.tasks` — :class:`TaskService`, the task API.
* :mod:`~hostlink_tw.controlplane.taskmodel` — task statuses, records, refusals.
* :mod:`~hostlink_tw.controlplane.taskdb`, :mod:`~hostlink_tw.controlplane.taskstore`,
  :mod:`~hostlink_tw.controlplane.taskoutput` — the tasks' SQLite file.
* :mod:`~hostlink_tw.controlplane.taskdispatch` — hellos answered, tasks delivered.
* :mod:`~hostlink_tw.controlplane.taskhello` — the directives for a snapshot (pure).
* :mod:`~hostlink_tw.controlplane.taskintake` — the agent's ``task.*`` messages.
* :mod:`~hostlink_tw.controlplane.taskhttp` — tasks offered and reported over HTTP.
* :mod:`~hostlink_tw.controlplane.tap` — ``twistd hostlink-controlplane``.
"""

from __future__ import annotations

from hostlink_tw.controlplane.agents import AgentsFileError, load_agents_file, parse_agents
from hostlink_tw.controlplane.plane import ControlPlane, start_control_plane
from hostlink_tw.controlplane.replay import NonceCache, ReplayStoreError
from hostlink_tw.controlplane.sessions import NoSessionError, Session
from hostlink_tw.controlplane.settings import (
    DEFAULT_DELIVERY_WINDOW,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_COMMAND_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_MAX_PENDING_TASKS,
    DEFAULT_MAX_SEND_BUFFER_BYTES,
    DEFAULT_MAX_SKEW,
    DEFAULT_NONCE_CACHE_SIZE,
    DEFAULT_NONCE_QUOTA,
    DEFAULT_OPERATOR_LISTEN,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
)
from hostlink_tw.controlplane.taskdb import TASKS_DATABASE_NAME, TaskStoreError
from hostlink_tw.controlplane.taskhttp import ReportOutcome
from hostlink_tw.controlplane.taskmodel import (
    TASK_STATUSES,
    AttemptRecord,
    OutputChunk,
    TaskRecord,
    TaskRefusedError,
    UnknownTaskError,
)
from hostlink_tw.controlplane.tasks import TaskService
from hostlink_tw.controlplane.testlayer import ACKS_HELD_MAX, ATTEMPTS_KEPT
from hostlink_tw.controlplane.upgrade import ConnectionAttempt

# Close codes and the gateway path are the wire vocabulary's (re-exported here).
from hostlink_tw.wire.vocabulary import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_TOO_BIG,
    GATEWAY_PATH,
)

__all__ = [
    "ACKS_HELD_MAX",
    "ATTEMPTS_KEPT",
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "CLOSE_TOO_BIG",
    "DEFAULT_DELIVERY_WINDOW",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_COMMAND_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_PENDING_CONNECTIONS",
    "DEFAULT_MAX_PENDING_TASKS",
    "DEFAULT_MAX_SEND_BUFFER_BYTES",
    "DEFAULT_MAX_SKEW",
    "DEFAULT_NONCE_CACHE_SIZE",
    "DEFAULT_NONCE_QUOTA",
    "DEFAULT_OPERATOR_LISTEN",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RELOAD_INTERVAL",
    "GATEWAY_PATH",
    "TASKS_DATABASE_NAME",
    "TASK_STATUSES",
    "AgentsFileError",
    "AttemptRecord",
    "ConnectionAttempt",
    "ControlPlane",
    "NoSessionError",
    "NonceCache",
    "OutputChunk",
    "ReplayStoreError",
    "ReportOutcome",
    "Session",
    "TaskRecord",
    "TaskRefusedError",
    "TaskService",
    "TaskStoreError",
    "UnknownTaskError",
    "load_agents_file",
    "parse_agents",
    "start_control_plane",
]
