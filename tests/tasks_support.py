"""
Support for the end-to-end task tests (no test cases here): the agent's
environment, an in-process agent, a tap on what the control plane receives
(:class:`WireTap`) and a way to lose frames in flight (:class:`OutputLoss`),
bounded waits, and the task process groups a test must see gone.

Both kinds of agent take their settings from the same ``HOSTLINK_*``
environment (:func:`agent_environ`): the in-process one through
:func:`hostlink_tw.config.load_settings`, a real process
(:class:`tests.process_support.AgentProcess`) by inheriting it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from hostlink_tw.agent.process import group_alive
from hostlink_tw.config import load_settings
from hostlink_tw.controlplane import ControlPlane, OutputChunk, start_control_plane
from hostlink_tw.identity import AgentState, write_identity
from hostlink_tw.service import HostlinkService
from hostlink_tw.wire.envelope import Envelope
from hostlink_tw.wire.vocabulary import AGENT_HELLO, TASK_FINAL, TASK_OUTPUT

from . import taskgen
from .test_client_support import AGENT, key

__all__ = [
    "AGENT",
    "MiB",
    "InProcessAgent",
    "OutputLoss",
    "Sent",
    "WireTap",
    "agent_environ",
    "gen",
    "group_alive",
    "kill_group_later",
    "read_pgid",
    "sleep",
    "start_cp",
    "store_finals",
    "store_output_count",
    "stored_bytes",
    "wait_until",
]

MiB = 1024 * 1024

#: Upper bound of every single wait (a healthy run needs a fraction of it).
WAIT = 20.0


def sleep(seconds: float) -> Deferred[None]:
    """Fires after ``seconds`` on the real reactor."""
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def wait_until(
    predicate: Callable[[], object], what: str, timeout: float = WAIT, interval: float = 0.02
) -> Generator[Deferred[Any], Any, None]:
    """Poll ``predicate`` until it is true; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(interval)


def gen(*args: object) -> str:
    """The shell command running tests/taskgen.py with ``args``."""
    return shlex.join([sys.executable, taskgen.__file__, *map(str, args)])


@inlineCallbacks
def start_cp(
    test: TestCase, directory: str, port: int = 0
) -> Generator[Deferred[Any], Any, ControlPlane]:
    """A control plane on 127.0.0.1 with its tasks in ``directory``/cp.db, stopped by a cleanup."""
    cp = yield start_control_plane(
        {AGENT: key().public_key()},
        listen=f"tcp:{port}:interface=127.0.0.1",
        ping_interval=0,
        tasks_database=os.path.join(directory, "cp.db"),
    )
    test.addCleanup(cp.stop)
    return cp


def agent_environ(ws_url: str, directory: str, **settings: str) -> dict[str, str]:
    """
    The ``HOSTLINK_*`` environment of a test agent whose identity (the test
    key, agent id :data:`AGENT`) and task store are under ``directory``;
    ``settings`` add or replace variables (``HOSTLINK_TASK_TIMEOUT="500ms"``).
    """
    state = os.path.join(directory, "state")
    key_path = os.path.join(state, "agent.key")
    if not os.path.exists(key_path):
        write_identity(state, key_path, AgentState(agent_id=AGENT), key())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOSTLINK_WS_ENABLED": "true",
        "HOSTLINK_WS_URL": ws_url,
        # The HTTP paths (heartbeats, polling) go to the same control plane,
        # never to the production default.
        "SH_CONTROL_PLANE_URL": ws_url.replace("ws", "http", 1).split("/api/v1/", 1)[0],
        "HOSTLINK_STATE_PATH": state,
        "HOSTLINK_PRIVATE_KEY_PATH": key_path,
        "HOSTLINK_WS_RECONNECT_MIN": "100ms",
        "HOSTLINK_WS_RECONNECT_MAX": "1s",
        "HOSTLINK_WS_DELIVERY_ENABLED": "true",
        "HOSTLINK_WS_RESULTS_ENABLED": "true",
        "HOSTLINK_LOCAL_STORE_PATH": os.path.join(directory, "agent.db"),
        "HOSTLINK_TASK_KILL_GRACE": "500ms",
        "HOSTLINK_TASK_WORKDIR": directory,
    }
    env.update(settings)
    return env


class InProcessAgent:
    """
    :class:`~hostlink_tw.service.HostlinkService` on the test's reactor,
    configured from ``env`` as ``twistd hostlink`` would be; stopped by a
    cleanup (its runner first: running groups are killed).
    """

    def __init__(self, test: TestCase, env: dict[str, str]) -> None:
        self.settings = load_settings(env)
        assert not self.settings.errors, self.settings.errors
        self.service = HostlinkService(self.settings, reactor=reactor)
        self.service.startService()
        test.addCleanup(self.stop)

    def stop(self) -> Deferred[None]:
        """Stop the service (once; later calls do nothing)."""
        if not self.service.running:
            return succeed(None)
        return self.service.stopService()


@dataclass(frozen=True)
class Sent:
    """One envelope the control plane received (what a test counts; never the output data)."""

    type: str
    message_id: str
    task_id: str | None
    attempt_id: str | None
    stream: str | None = None
    sequence: int | None = None


class WireTap:
    """
    Every envelope that reached the control planes it is attached to, in
    order, with markers a test adds (``mark``): the one place where a
    re-sent message is visible (the control plane stores each one once).
    """

    def __init__(self) -> None:
        self.events: list[Sent | str] = []

    def attach(self, cp: ControlPlane) -> None:
        """Record what ``cp`` receives from now on (through its test layer's inbound hook)."""
        controls = cp.controls
        inbound = controls.inbound

        def tap(session: Any, envelope: Envelope, size: int) -> None:
            self._record(envelope)
            inbound(session, envelope, size)

        controls.inbound = tap  # type: ignore[method-assign]

    def _record(self, envelope: Envelope) -> None:
        payload = envelope.payload
        self.events.append(
            Sent(
                envelope.type,
                envelope.message_id,
                envelope.task_id,
                envelope.execution_attempt_id,
                payload.get("stream") if envelope.type == TASK_OUTPUT else None,
                envelope.sequence,
            )
        )
        if envelope.type == AGENT_HELLO:
            # A final in the reconnect snapshot reaches the control plane too.
            for final in payload.get("unacked_finals") or []:
                self.events.append(
                    Sent("hello.unacked_final", str(final.get("message_id")),
                         final.get("task_id"), final.get("execution_attempt_id"))
                )

    def mark(self, label: str) -> None:
        """Note a moment (a close, a restart) among the envelopes."""
        self.events.append(label)

    def sent(self, kind: str, attempt_id: str | None = None) -> list[Sent]:
        """The envelopes of type ``kind`` (of one attempt, if given), in arrival order."""
        return [
            e for e in self.events
            if isinstance(e, Sent) and e.type == kind
            and (attempt_id is None or e.attempt_id == attempt_id)
        ]

    def finals(self, attempt_id: str) -> list[Sent]:
        """The ``task.final`` messages of the attempt, in arrival order."""
        return self.sent(TASK_FINAL, attempt_id)

    def index(self, event: Sent | str) -> int:
        """Where ``event`` is among everything recorded."""
        return self.events.index(event)


class OutputLoss:
    """
    From now until :meth:`stop`, every ``task.output`` reaching ``cp`` vanishes
    before the control plane handles it (not stored, not acked), as frames
    in flight are lost when a TCP connection drops.  ``lost`` lists them.
    """

    def __init__(self, cp: ControlPlane) -> None:
        self.lost: list[Envelope] = []
        self._intake = cp.tasks.intake
        self._handle = handle = self._intake.handle

        def lossy(connection: Any, session: Any, envelope: Envelope) -> None:
            if envelope.type == TASK_OUTPUT:
                self.lost.append(envelope)
                return
            handle(connection, session, envelope)

        self._intake.handle = lossy  # type: ignore[method-assign]

    def stop(self) -> None:
        """Let output through again."""
        self._intake.handle = self._handle  # type: ignore[method-assign]


def stored_bytes(chunks: list[OutputChunk], stream: str) -> bytes:
    """One stream of the stored chunks, joined, as bytes."""
    return b"".join(c.data.encode() for c in chunks if c.stream == stream)


def read_pgid(path: str) -> int:
    """The process group a task wrote with ``echo $$ > path`` (its shell leads the group)."""
    with open(path) as f:
        return int(f.read().strip())


def kill_group_later(test: TestCase, pgid: int) -> None:
    """A cleanup that SIGKILLs the group if a failed test left it alive."""

    def kill() -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    test.addCleanup(kill)


def store_output_count(path: str) -> int:
    """How many output chunks the agent store holds unacked (acked ones are deleted);
    a test may read a running agent's store: it is in WAL mode."""
    with closing(sqlite3.connect(path, timeout=5)) as db:
        return int(
            db.execute("SELECT count(*) FROM outbox WHERE type = 'task.output'").fetchone()[0]
        )


def store_finals(path: str) -> list[tuple[str, str, int]]:
    """The agent store's finals: (message_id, status, acked), read while no agent runs."""
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT message_id, payload, acked FROM outbox WHERE type = 'task.final' "
            "ORDER BY rowid"
        ).fetchall()
    return [(r[0], json.loads(r[1])["status"], int(r[2])) for r in rows]

