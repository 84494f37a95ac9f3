"""
The follow loop of ``hostlink-tw task run``/``task logs`` (cli_taskrun.py)
against a scripted operator API: resuming, the delivery wait and its
progress line, giving up, and the exit statuses.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.cli_taskrun import (
    EXIT_CANCELLED,
    EXIT_CLI,
    EXIT_INTERRUPTED,
    EXIT_KILLED,
    CommandFailedError,
    Follower,
    Terminal,
    exit_status,
)
from hostlink_tw.operatorclient import OperatorError, UnreachableError

TASK = {"task_id": "task-1", "agent_id": "agent-1", "execution_attempt_id": "att-1",
        "status": "pending"}


def status(name: str, attempt: str = "att-1", **more: Any) -> dict[str, Any]:
    return {"event": "status", "task": {**TASK, "status": name,
                                        "execution_attempt_id": attempt, **more}}


def output(stream: str, sequence: int, data: str, attempt: str = "att-1") -> dict[str, Any]:
    return {"event": "output", "stream": stream, "sequence": sequence, "data": data,
            "execution_attempt_id": attempt}


def end(name: str = "completed", code: int | None = 0) -> dict[str, Any]:
    return {"event": "end", "task": {**TASK, "status": name, "exit_code": code}}


class Broken:
    """Where a scripted stream breaks off."""


class FakeStream:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def __enter__(self) -> FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for event in self.events:
            if event is Broken:
                raise UnreachableError("lost the control plane: the answer ended early")
            yield event
        raise UnreachableError("lost the control plane: the answer ended early")


class FakeClient:
    """Answers each stream() with the next script (an exception is raised)."""

    def __init__(self, clock: FakeClock, *scripts: Any) -> None:
        self.clock = clock
        self.scripts = list(scripts)
        self.queries: list[dict[str, str]] = []
        self.requests: list[tuple[str, str]] = []

    def stream(self, path: str, query: dict[str, str]) -> FakeStream:
        self.queries.append(dict(query))
        script = self.scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        return FakeStream(script)

    def request(self, method: str, path: str, document: Any = None) -> dict[str, Any]:
        self.requests.append((method, path))
        return {**TASK, "status": "cancelled"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TtyErr(io.StringIO):
    def isatty(self) -> bool:
        return True


class FollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeClock()
        self.out, self.err = io.StringIO(), io.StringIO()

    def follower(self, *scripts: Any, progress: bool = False, **options: Any) -> Follower:
        if progress:
            self.err = TtyErr()
        self.client = FakeClient(self.clock, *scripts)
        terminal = Terminal(self.out, self.err, progress=progress, name="hostlink-tw task run")
        return Follower(self.client, TASK, terminal, clock=self.clock,  # type: ignore[arg-type]
                        sleep=self.clock.sleep, **options)

    def test_output_to_its_stream_and_the_end(self) -> None:
        follower = self.follower([status("running"), output("stdout", 1, "a\n"),
                                  output("stderr", 1, "b\n"), end("failed", 3)])
        task = follower.run()
        self.assertEqual((self.out.getvalue(), self.err.getvalue()), ("a\n", "b\n"))
        self.assertEqual(exit_status(task), 3)

    def test_resumes_after_the_last_sequences_and_skips_repeats(self) -> None:
        follower = self.follower(
            [status("running"), output("stdout", 1, "1"), output("stdout", 2, "2"),
             output("stderr", 1, "e1"), Broken],
            UnreachableError("connection refused"),
            [status("running"), output("stdout", 2, "2"), output("stdout", 3, "3"), end()],
        )
        follower.run()
        self.assertEqual(self.out.getvalue(), "123")
        self.assertEqual(self.err.getvalue(), "e1")
        self.assertEqual(self.client.queries[-1], {"follow": "1", "attempt": "att-1",
                                                   "after_stdout": "2", "after_stderr": "1"})

    def test_a_new_attempt_starts_its_sequences_again(self) -> None:
        follower = self.follower([status("running"), output("stdout", 1, "old "),
                                  status("pending", attempt="att-2"),
                                  output("stdout", 1, "new", attempt="att-2"), end()])
        follower.run()
        self.assertEqual(self.out.getvalue(), "old new")

    def test_gives_up_after_the_reconnect_budget(self) -> None:
        follower = self.follower([status("running"), Broken],
                                 *[UnreachableError("connection refused")] * 200,
                                 reconnect_for=5.0)
        with self.assertRaises(CommandFailedError) as raised:
            follower.run()
        self.assertEqual(raised.exception.status, EXIT_CLI)
        self.assertIn("gave up after 5s", raised.exception.message)
        self.assertIn("hostlink-tw task show task-1", raised.exception.message)
        self.assertGreaterEqual(self.clock.now - 100.0, 5.0)
        self.assertLess(self.clock.now - 100.0, 7.0)

    def test_delivery_wait_expires_cancels_and_fails(self) -> None:
        heartbeats = [{"event": "heartbeat"}] * 10
        follower = self.follower([status("pending"), *heartbeats], wait=3.0)
        self.clock.now += 0.0

        def tick(event: dict[str, Any]) -> bool:
            self.clock.now += 1.0
            return original(event)

        original = follower._handle
        follower._handle = tick  # type: ignore[method-assign]
        with self.assertRaises(CommandFailedError) as raised:
            follower.run()
        self.assertEqual(raised.exception.status, EXIT_CLI)
        self.assertIn("did not take task task-1 within 3s", raised.exception.message)
        self.assertEqual(self.client.requests, [("POST", "/tasks/task-1/cancel")])

    def test_progress_line_only_on_a_terminal_and_cleared_once_taken(self) -> None:
        follower = self.follower([status("pending"), {"event": "heartbeat"},
                                  status("running"), output("stderr", 1, "x\n"), end()],
                                 progress=True, wait=60.0)
        follower.run()
        text = self.err.getvalue()
        self.assertIn("\r\x1b[Khostlink-tw task run: waiting for agent agent-1 to take task "
                      "task-1 (no session with delivery yet; 0s of 60s)", text)
        # Cleared before the task's own stderr.
        self.assertTrue(text.endswith("\r\x1b[Kx\n"), repr(text))
        self.err = io.StringIO()  # not a terminal: no progress line
        follower = self.follower([status("pending"), status("running"), end()], wait=60.0)
        follower.run()
        self.assertEqual(self.err.getvalue(), "")

    def test_refusal_before_any_event(self) -> None:
        follower = self.follower(OperatorError("no task 'task-1'", status=404,
                                               code="unknown_task"), refused_status=1)
        with self.assertRaises(CommandFailedError) as raised:
            follower.run()
        self.assertEqual((raised.exception.status, raised.exception.message),
                         (1, "no task 'task-1'"))

    def test_task_forgotten_after_a_restart(self) -> None:
        follower = self.follower([status("running"), Broken],
                                 OperatorError("no task", status=404, code="unknown_task"))
        with self.assertRaises(CommandFailedError) as raised:
            follower.run()
        self.assertEqual(raised.exception.status, EXIT_CLI)
        self.assertIn("no longer knows task task-1", raised.exception.message)


class ExitStatusTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases = [
            ("completed", 0, 0), ("failed", 1, 1), ("failed", 255, 255),
            ("failed", -1, EXIT_KILLED), ("failed", 256, 1), ("failed", None, 1),
            ("interrupted", -1, EXIT_INTERRUPTED),
            ("cancelled", None, EXIT_CANCELLED), ("running", None, EXIT_CLI),
        ]
        for name, code, expected in cases:
            self.assertEqual(exit_status({"status": name, "exit_code": code}), expected,
                             (name, code))
        self.assertEqual((EXIT_KILLED, EXIT_INTERRUPTED, EXIT_CANCELLED), (137, 143, 130))
