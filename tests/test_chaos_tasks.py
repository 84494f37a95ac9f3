"""
The quick faults of the chaos-with-tasks table (``make chaos`` runs them
all): a real ``twistd -n hostlink`` agent with tasks on, the reference control
plane, tasks through the operator API (:mod:`evidence.chaos_tasks`).  Plus the
verdict's own checks, so a broken judge cannot make a fault pass vacuously.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from typing import ClassVar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from evidence.chaos_tasks import QUICK, QUICK_FAULTS, run_task_fault
from evidence.faults import reap_all
from evidence.taskfaults import StoredTask, TaskBook, TaskSpec, WireLog, WireMessage
from evidence.tasktable import TaskRow, TaskVerdict, format_rst, format_table, judge

from . import taskgen

NO_PROC = None if os.path.exists("/proc/self/status") else "needs Linux /proc"


class JudgeTests(SynchronousTestCase):
    """Each column of the table catches what it claims to catch."""

    spec = TaskSpec("t00", 5000, 0.0, 7, exit_code=3, err_nbytes=100)
    out = taskgen.stream_bytes(5000, 7)
    #: The real task, run once for all these tests (trial has no setUpClass):
    #: its runs line and done file are what the judge reads.
    ran: ClassVar[tuple[TaskBook, subprocess.CompletedProcess[bytes]] | None] = None

    def _run_once(self) -> tuple[TaskBook, subprocess.CompletedProcess[bytes]]:
        if JudgeTests.ran is None:
            book = TaskBook(os.path.abspath(self.mktemp()))
            result = subprocess.run(["/bin/sh", "-c", book.command(self.spec)],
                                    capture_output=True, timeout=60, check=False)
            JudgeTests.ran = (book, result)
        return JudgeTests.ran

    def setUp(self) -> None:
        ran, result = self._run_once()
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual(result.stdout, self.out)
        self.err = result.stderr
        self.book = TaskBook(self.mktemp())
        self.book.command(self.spec)
        for path in (ran.runs_file("t00"), ran.done_file("t00")):
            shutil.copy(path, self.book.dir)
        self.wire = WireLog()
        self.wire.messages.append(WireMessage("task.final", "m1", "task-1", "a1",
                                              status="failed", exit_code=3))

    def stored(self, **changes: object) -> StoredTask:
        task = StoredTask("task-1", "cmd", "failed", 3, "a1", False, 1,
                          [("m1", {"status": "failed", "exit_code": 3})], self.out, self.err)
        return replace(task, **changes)  # type: ignore[arg-type]

    def judge(self, stored: StoredTask, interrupted: bool = False) -> TaskVerdict:
        return judge(self.book, stored, self.wire, "t00", interrupted)

    def test_a_task_run_once_delivered_once_complete_passes(self) -> None:
        v = self.judge(self.stored())
        self.assertEqual((v.ran_once, v.delivered_once, v.output_complete), (True, True, True))
        self.assertEqual(v.problems, [])

    def test_a_second_run_is_caught(self) -> None:
        with open(self.book.runs_file("t00"), "a") as f:
            f.write("run pgid=1\n")
        self.assertFalse(self.judge(self.stored()).ran_once)

    def test_a_conflicting_second_final_is_caught(self) -> None:
        self.wire.messages.append(WireMessage("task.final", "m2", "task-1", "a1",
                                              status="completed", exit_code=0))
        self.assertFalse(self.judge(self.stored()).delivered_once)

    def test_a_resent_final_is_counted_not_failed(self) -> None:
        self.wire.messages.append(self.wire.messages[0])
        v = self.judge(self.stored())
        self.assertTrue(v.delivered_once)
        self.assertEqual(v.resent_finals, 1)

    def test_a_wrong_exit_code_or_a_second_attempt_is_caught(self) -> None:
        self.assertFalse(self.judge(self.stored(
            finals=[("m1", {"status": "completed", "exit_code": 0})])).delivered_once)
        self.assertFalse(self.judge(self.stored(attempts=2)).delivered_once)

    def test_a_lost_chunk_or_a_truncation_is_caught(self) -> None:
        self.assertFalse(self.judge(self.stored(stdout=self.out[:1000] + self.out[2000:]))
                         .output_complete)
        self.assertFalse(self.judge(self.stored(truncated=True)).output_complete)

    def test_an_interrupted_task_must_have_run_at_most_once(self) -> None:
        os.remove(self.book.done_file("t00"))
        final = [("local-interrupted-x", {"status": "interrupted", "exit_code": -1})]
        self.wire.messages[:] = [WireMessage("task.final", "local-interrupted-x", "task-1", "a1",
                                             status="interrupted", exit_code=-1)]
        cut = self.out[:3000] + "\ufffd".encode()
        stored = self.stored(status="interrupted", exit_code=-1, finals=final, stdout=cut)
        self.assertTrue(self.judge(stored, interrupted=True).interrupted_ok)
        self.assertFalse(self.judge(replace(stored, stdout=b"x" + cut), interrupted=True)
                         .interrupted_ok)
        with open(self.book.runs_file("t00"), "a") as f:
            f.write("run pgid=1\n")
        self.assertFalse(self.judge(stored, interrupted=True).interrupted_ok)

    def test_wire_log_lines_round_trip(self) -> None:
        wire = WireLog()
        wire.add_lines([(0.0, f"2026 [stdout#info] {m.line()}") for m in self.wire.messages])
        self.assertEqual(wire.messages, self.wire.messages)
        self.assertNotIn("data", json.loads(self.wire.messages[0].line().split(" ", 1)[1]))


class TableTests(SynchronousTestCase):
    def test_row_verdict_and_rst(self) -> None:
        row = TaskRow("agent SIGKILL", submitted=3, judged=2, ran_once=2, delivered_once=2,
                      output_complete=1, interrupted=1, interrupted_ok=1)
        self.assertFalse(row.ok)
        row.output_complete = 2
        self.assertTrue(row.ok)
        rst = format_rst([row]).splitlines()
        self.assertEqual(rst[0], rst[2])
        self.assertEqual(rst[0], rst[-1])
        self.assertTrue(rst[3].startswith("agent SIGKILL"))
        self.assertIn("1/1", format_table([row]))


class QuickTaskChaosTests(TestCase):
    """Each quick fault against a real agent process: 100 % / 100 % / 100 %."""

    timeout = 120
    skip = NO_PROC

    def _fault(self, name: str) -> Deferred[None]:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.addCleanup(reap_all)

        async def run() -> None:
            row = await run_task_fault(name, QUICK_FAULTS[name], QUICK, workdir)
            self.assertTrue(row.ok, row.describe())
            self.assertGreater(row.submitted, 0)

        return Deferred.fromCoroutine(run())

    def test_control_plane_killed_mid_stream(self) -> Deferred[None]:
        return self._fault("control plane SIGKILL + restart")

    def test_agent_killed_mid_task(self) -> Deferred[None]:
        return self._fault("agent SIGKILL mid-task + restart")

