"""Tests for hostlink_tw.agent.runner: real short processes (PROTOCOL §8.3, §8.4, §8.8).

Every test runs ``/bin/sh`` on the global reactor and waits for every process
of every group it started to be gone (``os.killpg(pgid, 0)`` raising
``ProcessLookupError``) before it ends.  Orphaned grandchildren are reaped by
init: where init is slow to reap, the test that leaves a zombie waits for it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hostlink_tw.agent import process as process_module
from hostlink_tw.agent.process import (
    ProcessSettings,
    TaskProcess,
    group_alive,
    session_argv,
    task_environment,
)
from hostlink_tw.agent.runner import RunResult, TaskRunner, TaskSpec


def _live_members(pgid: int) -> list[int]:
    """The pids of group *pgid* that are alive (not zombies), read from /proc."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            alive.append(int(name))
    return alive


def _sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def _group_gone(pgid: int, within: float = 5.0) -> Generator[Deferred[Any], Any, None]:
    """Wait until nothing of group *pgid*, not even a zombie, is left; kill it if it lingers."""
    for _ in range(int(within / 0.02)):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        yield _sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    raise AssertionError(f"process group {pgid} outlived its test")


@inlineCallbacks
def _process_gone(pid: int, within: float = 5.0) -> Generator[Deferred[Any], Any, None]:
    """Wait until process *pid* (an orphan init reaps) is gone."""
    for _ in range(int(within / 0.02)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        yield _sleep(0.02)
    raise AssertionError(f"process {pid} outlived its test")


def _spec(name: str, command: str) -> TaskSpec:
    return TaskSpec(task_id=name, attempt_id=f"{name}-attempt", command=command)


class _Sink:
    """Records what the runner reports, and checks the order it reports in."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.pids: dict[str, int] = {}
        self.data: dict[tuple[str, str], bytearray] = defaultdict(bytearray)
        self.chunks: list[tuple[str, str, bytes, bool]] = []
        self.results: dict[str, RunResult] = {}
        # Processes of the group alive when ended() came: must be none.
        self.alive_at_end: dict[str, list[int]] = {}
        self.violations: list[str] = []
        self.on_output: Callable[[TaskSpec, int], None] | None = None
        self._ended: dict[str, list[Deferred[RunResult]]] = defaultdict(list)
        self._started: dict[str, list[Deferred[int]]] = defaultdict(list)

    def started(self, spec: TaskSpec, pid: int) -> None:
        self.events.append(("started", spec.task_id))
        self.pids[spec.task_id] = pid
        for waiter in self._started.pop(spec.task_id, []):
            waiter.callback(pid)

    def output(self, spec: TaskSpec, stream: str, chunk: bytes, truncated_locally: bool) -> None:
        if spec.task_id in self.results or spec.task_id not in self.pids:
            self.violations.append(f"output of {spec.task_id} outside started..ended")
        self.chunks.append((spec.task_id, stream, chunk, truncated_locally))
        self.data[spec.task_id, stream] += chunk
        if self.on_output is not None:
            self.on_output(spec, len(chunk))

    def ended(self, spec: TaskSpec, result: RunResult) -> None:
        if spec.task_id in self.results:
            self.violations.append(f"{spec.task_id} ended twice")
        self.events.append(("ended", spec.task_id))
        self.results[spec.task_id] = result
        pid = self.pids.get(spec.task_id)
        self.alive_at_end[spec.task_id] = [] if pid is None else _live_members(pid)
        for waiter in self._ended.pop(spec.task_id, []):
            waiter.callback(result)

    def wait_ended(self, task_id: str) -> Deferred[RunResult]:
        if task_id in self.results:
            return succeed(self.results[task_id])
        waiter: Deferred[RunResult] = Deferred()
        self._ended[task_id].append(waiter)
        return waiter

    def wait_started(self, task_id: str) -> Deferred[int]:
        if task_id in self.pids:
            return succeed(self.pids[task_id])
        waiter: Deferred[int] = Deferred()
        self._started[task_id].append(waiter)
        return waiter

    def received(self, task_id: str) -> int:
        return sum(len(c) for t, _, c, _ in self.chunks if t == task_id)


class RunnerTestCase(TestCase):
    timeout = 20

    def make(self, **kwargs: Any) -> tuple[TaskRunner, _Sink]:
        sink = _Sink()
        kwargs.setdefault("kill_grace", 0.3)
        runner = TaskRunner(sink, **kwargs)
        runner.startService()
        self.addCleanup(self._clean, runner, sink)
        return runner, sink

    @inlineCallbacks
    def _clean(self, runner: TaskRunner, sink: _Sink) -> Generator[Deferred[Any], Any, None]:
        if runner.running:
            yield runner.stopService()
        for pid in sink.pids.values():
            yield _group_gone(pid)
        self.assertEqual(sink.violations, [])

    @inlineCallbacks
    def run_one(self, command: str, **kwargs: Any) -> Generator[Deferred[Any], Any, RunResult]:
        """Run *command* alone; check its group is gone when it ended."""
        runner, sink = self.make(**kwargs)
        runner.submit(_spec("t", command))
        result = yield sink.wait_ended("t")
        self.assertEqual(sink.alive_at_end["t"], [])
        self.sink = sink
        return result


class ExitTests(RunnerTestCase):
    @inlineCallbacks
    def test_exit_zero_is_completed(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("echo out; echo err >&2")
        self.assertEqual((result.status, result.exit_code, result.signal), ("completed", 0, None))
        self.assertEqual((result.output, result.error), ("out\n", "err\n"))
        self.assertFalse(result.output_truncated or result.error_truncated or result.timed_out)
        self.assertEqual(result.final_payload(), {
            "status": "completed", "exit_code": 0, "output": "out\n", "error": "err\n",
            "output_truncated": False, "error_truncated": False})
        self.assertEqual(self.sink.events, [("started", "t"), ("ended", "t")])

    @inlineCallbacks
    def test_non_zero_exit_is_failed_with_its_code(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("exit 3")
        self.assertEqual((result.status, result.exit_code, result.signal), ("failed", 3, None))

    @inlineCallbacks
    def test_killed_by_a_signal_is_failed_minus_one(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("kill -9 $$")
        self.assertEqual((result.status, result.exit_code), ("failed", -1))
        self.assertEqual(result.signal, signal.SIGKILL)

    @inlineCallbacks
    def test_duration_is_measured(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("sleep 0.2")
        self.assertTrue(0.2 <= result.duration < 2, result.duration)


_WHO_AM_I = "read pid comm state ppid pgrp sid rest < /proc/self/stat; echo $$ $pid $pgrp $sid"


class SessionTests(RunnerTestCase):
    @inlineCallbacks
    def check_leader(self, use_setsid: bool) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one(_WHO_AM_I, use_setsid=use_setsid)
        pid = self.sink.pids["t"]
        # The shell is the pid Twisted spawned (setsid did not fork), and it
        # leads its own process group and session.
        self.assertEqual(result.output.split(), [str(pid)] * 4)
        self.assertNotEqual(pid, os.getpgrp())

    def test_setsid_execs_the_shell_as_group_leader(self) -> Deferred[None]:
        if shutil.which("setsid") is None:
            self.skipTest("util-linux setsid is not installed")
        return self.check_leader(True)

    def test_trampoline_execs_the_shell_as_group_leader(self) -> Deferred[None]:
        return self.check_leader(False)

    def test_argv(self) -> None:
        self.assertEqual(session_argv("echo", "/usr/bin/setsid"),
                         ["/usr/bin/setsid", "/bin/sh", "-c", "echo"])
        self.assertEqual(session_argv("echo", None)[0], sys.executable)
        self.assertEqual(session_argv("echo", None)[-1], "echo")


class EnvironmentTests(RunnerTestCase):
    @inlineCallbacks
    def test_hostlink_and_sh_variables_are_removed(self) -> Generator[Deferred[Any], Any, None]:
        environ = {"PATH": os.environ["PATH"], "HOSTLINK_X": "secret", "SH_Y": "secret",
                   "KEEP": "kept", "XHOSTLINK_Z": "kept", "hostlink_w": "kept"}
        result = yield self.run_one("env", environ=environ)
        names = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
        self.assertNotIn("HOSTLINK_X", names)
        self.assertNotIn("SH_Y", names)
        for name in ("KEEP", "XHOSTLINK_Z", "hostlink_w"):
            self.assertEqual(names[name], "kept")

    @inlineCallbacks
    def test_the_agents_environment_by_default(self) -> Generator[Deferred[Any], Any, None]:
        self.patch(os, "environ", {**os.environ, "HOSTLINK_TEST_SECRET": "s",
                                   "RUNNER_TEST_KEPT": "k"})
        result = yield self.run_one("env")
        self.assertIn("RUNNER_TEST_KEPT=k\n", result.output)
        self.assertNotIn("HOSTLINK_TEST_SECRET", result.output)

    def test_task_environment(self) -> None:
        self.assertEqual(task_environment({"HOSTLINK_A": "1", "SH_B": "2", "C": "3"}), {"C": "3"})

    @inlineCallbacks
    def test_workdir(self) -> Generator[Deferred[Any], Any, None]:
        workdir = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, workdir)
        result = yield self.run_one("pwd -P", workdir=workdir)
        self.assertEqual(result.output, os.path.realpath(workdir) + "\n")

    @inlineCallbacks
    def test_the_agents_directory_by_default(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("pwd -P")
        self.assertEqual(result.output, os.path.realpath(os.getcwd()) + "\n")

    @inlineCallbacks
    def test_a_missing_workdir_fails_without_starting(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("echo never", workdir="/nonexistent/hostlink-test")
        self.assertEqual((result.status, result.exit_code), ("failed", -1))
        self.assertIn("could not start the task", result.error)
        self.assertEqual(self.sink.events, [("ended", "t")])

    @inlineCallbacks
    def test_a_command_execve_refuses_fails_without_starting(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.submit(_spec("nul", "echo a\0b"))
        runner.submit(_spec("huge", "true " + "x" * 300_000))  # past MAX_ARG_STRLEN
        runner.submit(_spec("fine", "true"))
        yield sink.wait_ended("fine")
        for name in ("nul", "huge"):
            self.assertEqual(sink.results[name].status, "failed")
            self.assertIn("could not start the task", sink.results[name].error)
        self.assertEqual(sink.events, [("ended", "nul"), ("ended", "huge"),
                                       ("started", "fine"), ("ended", "fine")])

    @inlineCallbacks
    def test_stdin_is_dev_null(self) -> Generator[Deferred[Any], Any, None]:
        # cat would wait for ever on an inherited terminal or pipe.
        result = yield self.run_one("readlink /proc/$$/fd/0; cat; echo rc=$?")
        self.assertEqual(result.output, "/dev/null\nrc=0\n")


def _lines(text: bytes, size: int) -> bytes:
    return (text * (size // len(text) + 1))[:size]


class OutputTests(RunnerTestCase):
    @inlineCallbacks
    def test_both_streams_complete_and_in_order(self) -> Generator[Deferred[Any], Any, None]:
        out_size, err_size = 3_000_000, 2_000_000
        command = (f"(yes fedcba9876543210 | head -c {err_size} >&2) & "
                   f"yes 0123456789abcdef | head -c {out_size}; wait")
        result = yield self.run_one(command, flush_threshold=4096, final_output_bytes=1000)
        expected_out = _lines(b"0123456789abcdef\n", out_size)
        expected_err = _lines(b"fedcba9876543210\n", err_size)
        data = self.sink.data
        self.assertEqual(hashlib.sha256(data["t", "stdout"]).hexdigest(),
                         hashlib.sha256(expected_out).hexdigest())
        self.assertEqual(hashlib.sha256(data["t", "stderr"]).hexdigest(),
                         hashlib.sha256(expected_err).hexdigest())
        self.assertTrue(all(0 < len(chunk) <= 4096 for _, _, chunk, _ in self.sink.chunks))
        self.assertFalse(any(flag for *_, flag in self.sink.chunks))
        # The final keeps each stream's last bytes.
        self.assertEqual(result.output, expected_out[-1000:].decode())
        self.assertEqual(result.error, expected_err[-1000:].decode())
        self.assertTrue(result.output_truncated and result.error_truncated)

    @inlineCallbacks
    def test_chunks_never_split_a_character(self) -> Generator[Deferred[Any], Any, None]:
        yield self.run_one("yes 'é€𝄞' | head -c 400000", flush_threshold=1024)
        chunks = [chunk for _, _, chunk, _ in self.sink.chunks]
        self.assertGreater(len(chunks), 100)
        for chunk in chunks:
            chunk.decode("utf-8")  # raises on a split character

    @inlineCallbacks
    def test_past_the_limit_is_discarded(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("head -c 250000 /dev/zero", output_limit=100_000,
                                    flush_threshold=4096)
        self.assertEqual(bytes(self.sink.data["t", "stdout"]), b"\0" * 100_000)
        flags = [flag for *_, flag in self.sink.chunks]
        self.assertEqual(flags, [False] * (len(flags) - 1) + [True])
        self.assertEqual((result.status, result.output_truncated), ("completed", True))

    @inlineCallbacks
    def test_exactly_the_limit_is_not_truncated(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("head -c 100000 /dev/zero", output_limit=100_000,
                                    flush_threshold=4096)
        self.assertEqual(len(self.sink.data["t", "stdout"]), 100_000)
        self.assertFalse(any(flag for *_, flag in self.sink.chunks))
        self.assertFalse(result.output_truncated)

    @inlineCallbacks
    def test_pending_output_is_flushed_on_the_interval(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        yield self.run_one("echo a; sleep 0.5; echo b", flush_interval=0.05)
        # "a" went out alone: flushed while the task slept.
        self.assertEqual([chunk for *_, chunk, _ in self.sink.chunks], [b"a\n", b"b\n"])

    @inlineCallbacks
    def test_paused_output_blocks_the_writer(self) -> Generator[Deferred[Any], Any, None]:
        size = 20_000_000
        runner, sink = self.make(flush_threshold=65536)
        sink.on_output = lambda spec, n: runner.pause_output()
        runner.submit(_spec("t", f"head -c {size} /dev/zero"))
        yield sink.wait_started("t")
        yield _sleep(0.3)
        paused_at = sink.received("t")
        yield _sleep(0.3)
        self.assertEqual(sink.received("t"), paused_at)
        self.assertLess(paused_at, size)
        self.assertEqual(sink.results, {})
        sink.on_output = None
        runner.resume_output()
        result = yield sink.wait_ended("t")
        self.assertEqual((result.status, sink.received("t")), ("completed", size))

    @inlineCallbacks
    def test_a_task_started_while_paused_starts_paused(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.pause_output()
        runner.submit(_spec("t", "echo hi"))
        yield sink.wait_started("t")
        yield _sleep(0.5)  # longer than the kill grace: still not ended
        self.assertEqual((sink.chunks, sink.results), ([], {}))
        runner.resume_output()
        result = yield sink.wait_ended("t")
        self.assertEqual((result.status, result.output), ("completed", "hi\n"))


class KillTests(RunnerTestCase):
    @inlineCallbacks
    def test_timeout_terms_then_kills(self) -> Generator[Deferred[Any], Any, None]:
        # The shell traps TERM and goes on (a builtin loop: no child to orphan).
        result = yield self.run_one("trap 'echo TERM >&2' TERM; while :; do :; done",
                                    timeout=0.3, kill_grace=0.3)
        self.assertEqual((result.status, result.exit_code, result.timed_out),
                         ("failed", -1, True))
        self.assertEqual(result.signal, signal.SIGKILL)
        self.assertEqual(result.error, "TERM\ntask timed out after 300ms")
        self.assertTrue(0.6 <= result.duration < 3, result.duration)

    @inlineCallbacks
    def test_timeout_line_alone(self) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("exec sleep 30", timeout=0.2, kill_grace=5)
        self.assertEqual((result.status, result.exit_code, result.signal),
                         ("failed", -1, signal.SIGTERM))
        self.assertEqual(result.error, "task timed out after 200ms")
        self.assertLess(result.duration, 2)

    @inlineCallbacks
    def test_a_grandchild_holding_the_pipes_is_killed_after_the_grace(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        result = yield self.run_one("sleep 30 & echo $!", kill_grace=0.3)
        grandchild = int(result.output)
        self.assertEqual((result.status, result.exit_code), ("completed", 0))
        self.assertTrue(0.3 <= result.duration < 2, result.duration)
        self.assertNotIn(grandchild, _live_members(self.sink.pids["t"]))

    @inlineCallbacks
    def test_a_grandchild_left_behind_is_killed_at_exit(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        # It holds no pipe: nothing waits for the grace, yet it is killed.
        result = yield self.run_one("sleep 30 >/dev/null 2>&1 & echo $!", kill_grace=5)
        self.assertEqual(result.status, "completed")
        self.assertLess(result.duration, 2)
        self.assertFalse(group_alive(self.sink.pids["t"]))


    @inlineCallbacks
    def test_an_escaped_process_does_not_hold_the_task(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        # A process with its own session is out of the group's reach: its
        # pipes are closed on our side after the grace and a short wait.
        if shutil.which("setsid") is None:
            self.skipTest("util-linux setsid is not installed")
        result = yield self.run_one("setsid sleep 30 & echo $!", kill_grace=0.2)
        escaped = int(result.output)
        self.addCleanup(_process_gone, escaped)
        os.kill(escaped, signal.SIGKILL)
        self.assertEqual(result.status, "completed")
        self.assertTrue(0.2 + process_module.ESCAPED_PIPE_WAIT <= result.duration < 3,
                        result.duration)


class QueueTests(RunnerTestCase):
    @inlineCallbacks
    def test_one_at_a_time_in_order(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        for name in "abc":
            runner.submit(_spec(name, f"sleep 0.05; echo {name}"))
        self.assertEqual([t.spec.task_id for t in runner.running_tasks()], ["a"])
        self.assertEqual([s.task_id for s in runner.queued()], ["b", "c"])
        self.assertTrue(runner.knows("b", "b-attempt"))
        self.assertFalse(runner.knows("b", "other"))
        yield sink.wait_ended("c")
        self.assertEqual(sink.events, [(e, n) for n in "abc" for e in ("started", "ended")])
        self.assertEqual((runner.running_tasks(), runner.queued()), ([], []))

    @inlineCallbacks
    def test_a_known_attempt_is_not_queued_twice(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.submit(_spec("a", "sleep 0.1"))
        runner.submit(_spec("b", "true"))
        runner.submit(_spec("a", "sleep 0.1"))
        runner.submit(_spec("b", "true"))
        self.assertEqual([s.task_id for s in runner.queued()], ["b"])
        yield sink.wait_ended("b")
        self.assertEqual(len(sink.events), 4)

    @inlineCallbacks
    def test_concurrency_runs_in_parallel(self) -> Generator[Deferred[Any], Any, None]:
        # a needs b's file: with one slot it could not see it in time.
        marker = os.path.join(tempfile.mkdtemp(), "b")
        self.addCleanup(shutil.rmtree, os.path.dirname(marker))
        runner, sink = self.make(concurrency=2)
        runner.submit(_spec("a", f"i=0; while [ ! -e {marker} ] && [ $i -lt 300 ]; do "
                                 f"sleep 0.01; i=$((i+1)); done; [ -e {marker} ]"))
        runner.submit(_spec("b", f"touch {marker}"))
        runner.submit(_spec("c", "true"))
        self.assertEqual([s.task_id for s in runner.queued()], ["c"])
        a = yield sink.wait_ended("a")
        yield sink.wait_ended("c")
        self.assertEqual(a.status, "completed")
        self.assertEqual(sink.events[:2], [("started", "a"), ("started", "b")])

    @inlineCallbacks
    def test_discard_a_queued_attempt(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.submit(_spec("a", "sleep 0.1"))
        runner.submit(_spec("b", "echo never"))
        runner.submit(_spec("c", "true"))
        self.assertTrue(runner.discard("b", "b-attempt"))
        self.assertFalse(runner.knows("b", "b-attempt"))
        self.assertFalse(runner.discard("b", "b-attempt"))
        self.assertFalse(runner.discard("x", "y"))
        yield sink.wait_ended("c")
        self.assertNotIn("b", sink.pids)

    @inlineCallbacks
    def test_discard_a_running_attempt(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.submit(_spec("a", "trap '' TERM; echo x; exec sleep 30"))
        runner.submit(_spec("b", "true"))
        pid = yield sink.wait_started("a")
        yield _sleep(0.05)
        self.assertTrue(runner.discard("a", "a-attempt"))
        chunks_at_discard = len(sink.chunks)
        self.assertFalse(runner.knows("a", "a-attempt"))
        self.assertEqual(runner.running_tasks(), [])
        # b waits for a's slot: a's group is gone first (SIGKILL after the grace).
        yield sink.wait_ended("b")
        self.assertEqual(_live_members(pid), [])
        self.assertNotIn("a", sink.results)
        self.assertEqual(sink.events, [("started", "a"), ("started", "b"), ("ended", "b")])
        self.assertEqual(len(sink.chunks), chunks_at_discard)  # nothing more of a


class BeforeStartTests(RunnerTestCase):
    @inlineCallbacks
    def test_only_an_approved_attempt_runs(self) -> Generator[Deferred[Any], Any, None]:
        answers = {"a": succeed(False), "b": Deferred(), "c": succeed(True)}
        answers["b"].errback(RuntimeError("store failed"))
        asked: list[str] = []

        def before_start(spec: TaskSpec) -> Deferred[bool]:
            asked.append(spec.task_id)
            return answers[spec.task_id]

        runner, sink = self.make(before_start=before_start)
        for name in "abc":
            runner.submit(_spec(name, "true"))
        yield sink.wait_ended("c")
        self.assertEqual(asked, ["a", "b", "c"])
        self.assertEqual(sink.events, [("started", "c"), ("ended", "c")])

    @inlineCallbacks
    def test_a_pending_answer_holds_the_slot(self) -> Generator[Deferred[Any], Any, None]:
        answer: Deferred[bool] = Deferred()
        answers = {"a": answer, "b": succeed(True)}
        runner, sink = self.make(before_start=lambda spec: answers[spec.task_id])
        runner.submit(_spec("a", "true"))
        runner.submit(_spec("b", "true"))
        yield _sleep(0.05)
        self.assertEqual(([s.task_id for s in runner.queued()], sink.events), (["b"], []))
        self.assertTrue(runner.knows("a", "a-attempt"))
        answer.callback(True)
        yield sink.wait_ended("b")
        self.assertEqual(sink.events, [(e, n) for n in "ab" for e in ("started", "ended")])

    @inlineCallbacks
    def test_approved_after_the_stop_ends_interrupted(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        answer: Deferred[bool] = Deferred()
        runner, sink = self.make(before_start=lambda spec: answer)
        runner.submit(_spec("a", "echo never"))
        stopped = runner.stopService()
        self.assertNoResult(stopped)
        answer.callback(True)
        yield stopped
        self.assertEqual(sink.events, [("ended", "a")])
        self.assertEqual((sink.results["a"].status, sink.results["a"].exit_code),
                         ("interrupted", -1))


class StopTests(RunnerTestCase):
    @inlineCallbacks
    def test_stop_interrupts_and_waits(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make(concurrency=2, kill_grace=0.3)
        runner.submit(_spec("a", "exec sleep 30"))
        runner.submit(_spec("b", "trap '' TERM; echo b; exec sleep 30"))
        runner.submit(_spec("c", "echo never"))
        yield sink.wait_started("b")
        yield _sleep(0.1)
        asked = reactor.seconds()
        yield runner.stopService()
        # b ignores TERM: the SIGKILL one grace later ends it (§8.8: grace + 2 s in all).
        self.assertTrue(0.3 <= reactor.seconds() - asked < 1.3, reactor.seconds() - asked)
        for name in "ab":
            self.assertEqual((sink.results[name].status, sink.results[name].exit_code),
                             ("interrupted", -1))
            self.assertEqual(sink.alive_at_end[name], [])
        self.assertEqual(sink.results["b"].output, "b\n")
        self.assertEqual([s.task_id for s in runner.queued()], ["c"])
        self.assertNotIn("c", sink.pids)

    def test_stop_with_nothing_running(self) -> None:
        runner, _ = self.make()
        self.successResultOf(runner.stopService())

    @inlineCallbacks
    def test_restart_runs_the_queue(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()
        runner.stopService()
        runner.submit(_spec("a", "true"))
        yield _sleep(0.05)
        self.assertEqual(sink.events, [])
        runner.startService()
        result = yield sink.wait_ended("a")
        self.assertEqual(result.status, "completed")


class SinkErrorTests(RunnerTestCase):
    @inlineCallbacks
    def test_a_failing_sink_is_logged(self) -> Generator[Deferred[Any], Any, None]:
        runner, sink = self.make()

        def broken(spec: TaskSpec, pid: int) -> None:
            sink.pids[spec.task_id] = pid
            raise ValueError("sink bug")

        sink.started = broken  # type: ignore[method-assign]
        runner.submit(_spec("a", "true"))
        runner.submit(_spec("b", "true"))
        yield sink.wait_ended("b")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertEqual(sink.results["a"].status, "completed")


class SettingsTests(TestCase):
    def test_out_of_range(self) -> None:
        sink = _Sink()
        for kwargs in ({"concurrency": 0}, {"timeout": -1}, {"kill_grace": -1},
                       {"flush_interval": 0}, {"flush_threshold": 3}, {"output_limit": 0},
                       {"final_output_bytes": -1}):
            self.assertRaises(ValueError, TaskRunner, sink, **kwargs)


# --- the timers of one process, on a Clock ------------------------------------------


class _FakeTransport:
    """The parts of Twisted's Process transport that TaskProcess uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.paused = False
        self.lost = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseConnection(self) -> None:
        self.lost = True


class _FakeReactor(Clock):
    """A Clock whose spawnProcess connects the protocol to a _FakeTransport."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any,
                     path: Any, childFDs: dict[int, Any]) -> _FakeTransport:
        self.spawned.append({"executable": executable, "args": args, "env": env,
                             "path": path, "childFDs": dict(childFDs)})
        transport = _FakeTransport(4242)
        protocol.makeConnection(transport)
        return transport


_EXITED_0 = Failure(ProcessDone(0))


class ProcessTimerTests(SynchronousTestCase):
    """TaskProcess's timers and kills, driven by a Clock: no real process."""

    def setUp(self) -> None:
        self.reactor = _FakeReactor()
        self.signals: list[tuple[float, int]] = []
        self.alive = False
        self.events: list[dict[str, Any]] = []
        self.chunks: list[tuple[str, bytes, bool]] = []
        self.patch(process_module, "kill_group",
                   lambda pgid, signum: self.signals.append((self.reactor.seconds(), signum)))
        self.patch(process_module, "group_alive", lambda pgid: self.alive)

    def spawn(self, paused: bool = False, **settings: Any) -> TaskProcess:
        settings.setdefault("kill_grace", 5.0)
        process = TaskProcess(_spec("t", "cmd"), ProcessSettings(**settings), self.reactor,
                              lambda *chunk: self.chunks.append(chunk),
                              Logger(observer=self.events.append))
        process.spawn(["sh", "-c", "cmd"], {"A": "1"}, None, paused)
        return process

    def end(self, process: TaskProcess, reason: Failure = _EXITED_0) -> None:
        process.processExited(reason)
        process.processEnded(reason)

    def result(self, process: TaskProcess) -> RunResult:
        result: RunResult = self.successResultOf(process.done)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        return result

    def test_spawn(self) -> None:
        process = self.spawn(paused=True)
        (spawned,) = self.reactor.spawned
        self.assertEqual((spawned["args"], spawned["env"]), (["sh", "-c", "cmd"], {"A": "1"}))
        self.assertEqual([spawned["childFDs"][fd] for fd in (1, 2)], ["r", "r"])
        self.assertIsInstance(spawned["childFDs"][0], int)  # /dev/null, closed since
        self.assertRaises(OSError, os.fstat, spawned["childFDs"][0])
        self.assertEqual(process.pid, 4242)
        self.assertTrue(process.transport.paused)  # type: ignore[union-attr]

    def test_pending_output_is_flushed_after_the_interval(self) -> None:
        process = self.spawn(flush_interval=0.1)
        process.childDataReceived(1, b"ab")
        self.reactor.advance(0.05)
        process.childDataReceived(2, b"cd")
        self.assertEqual(self.chunks, [])
        self.reactor.advance(0.05)
        self.assertEqual(self.chunks, [("stdout", b"ab", False), ("stderr", b"cd", False)])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        process.childDataReceived(1, b"e")
        self.reactor.advance(0.1)
        self.assertEqual(self.chunks[-1], ("stdout", b"e", False))

    def test_timeout_terms_then_kills_after_the_grace(self) -> None:
        process = self.spawn(timeout=10, kill_grace=5)
        self.reactor.advance(9.9)
        self.assertEqual(self.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.signals, [(10, signal.SIGTERM)])
        self.reactor.advance(5)
        self.assertEqual(self.signals[1], (15, signal.SIGKILL))
        self.end(process, Failure(ProcessTerminated(signal=signal.SIGKILL)))
        result = self.result(process)
        self.assertEqual((result.status, result.exit_code, result.timed_out, result.signal),
                         ("failed", -1, True, signal.SIGKILL))
        self.assertEqual((result.error, result.duration), ("task timed out after 10s", 15))

    def test_an_exit_cancels_the_timeout(self) -> None:
        process = self.spawn(timeout=10)
        self.reactor.advance(1)
        self.end(process)
        self.reactor.advance(100)
        self.assertNotIn(signal.SIGTERM, [s for _, s in self.signals])
        self.assertEqual(self.result(process).status, "completed")

    def test_the_group_is_killed_when_the_shell_has_ended(self) -> None:
        process = self.spawn()
        self.reactor.advance(2)
        self.end(process)
        self.assertEqual(self.signals, [(2, signal.SIGKILL)])
        self.result(process)

    def test_pipes_held_after_the_exit_get_the_grace(self) -> None:
        process = self.spawn(kill_grace=5)
        process.processExited(_EXITED_0)
        self.reactor.advance(4.9)
        self.assertEqual(self.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.signals, [(5, signal.SIGKILL)])
        # Still open: only a process that left the group holds them.
        self.reactor.advance(process_module.ESCAPED_PIPE_WAIT)
        self.assertTrue(process.transport.lost)  # type: ignore[union-attr]
        self.assertIn("holds its output pipes", self.events[-1]["log_format"])
        process.processEnded(_EXITED_0)
        self.assertEqual(self.result(process).status, "completed")

    def test_paused_pipes_are_not_closed(self) -> None:
        process = self.spawn(kill_grace=1)
        process.pause()
        process.processExited(_EXITED_0)
        self.reactor.advance(1 + 3 * process_module.ESCAPED_PIPE_WAIT)
        self.assertFalse(process.transport.lost)  # type: ignore[union-attr]
        process.resume()
        self.reactor.advance(process_module.ESCAPED_PIPE_WAIT)
        self.assertTrue(process.transport.lost)  # type: ignore[union-attr]

    def test_paused_pipes_of_an_interrupted_task_are_closed(self) -> None:
        # A shutdown with the spool full: no ack will resume the reading.
        process = self.spawn(kill_grace=1)
        process.pause()
        process.interrupt()
        process.processExited(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.reactor.advance(1)
        self.assertFalse(process.transport.lost)  # type: ignore[union-attr]
        self.reactor.advance(process_module.ESCAPED_PIPE_WAIT)
        self.assertTrue(process.transport.lost)  # type: ignore[union-attr]
        self.assertIn("unread output is dropped", self.events[-1]["log_format"])
        process.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.assertEqual(self.result(process).status, "interrupted")

    def test_a_terminated_group_gets_one_grace(self) -> None:
        # The shell exits on TERM but something holds the pipes: the SIGKILL
        # comes one grace after the TERM, not one grace after the exit.
        process = self.spawn(kill_grace=5)
        process.interrupt()
        self.reactor.advance(1)
        process.processExited(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.reactor.advance(4)
        self.assertEqual(self.signals, [(0, signal.SIGTERM), (5, signal.SIGKILL)])
        self.reactor.advance(process_module.ESCAPED_PIPE_WAIT)
        self.assertTrue(process.transport.lost)  # type: ignore[union-attr]
        process.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.assertEqual(self.result(process).status, "interrupted")

    def test_the_end_waits_for_the_group(self) -> None:
        process = self.spawn()
        self.alive = True
        self.end(process)
        self.reactor.pump([0.01] * int(process_module.GROUP_EXIT_WAIT / 0.01 - 5))
        self.assertNoResult(process.done)
        self.alive = False
        self.reactor.advance(0.01)
        self.result(process)

    def test_a_process_that_survives_kill_does_not_hold_the_end(self) -> None:
        process = self.spawn()
        self.alive = True
        self.end(process)
        self.reactor.pump([0.01] * int(process_module.GROUP_EXIT_WAIT / 0.01 + 2))
        self.result(process)
        self.assertIn("survived SIGKILL", self.events[-1]["log_format"])

    def test_interrupt(self) -> None:
        process = self.spawn(kill_grace=5)
        process.childDataReceived(1, b"partial")
        process.interrupt()
        process.interrupt()
        self.assertEqual(self.signals, [(0, signal.SIGTERM)])
        self.reactor.advance(5)
        self.assertEqual(self.signals[-1], (5, signal.SIGKILL))
        self.end(process, Failure(ProcessTerminated(signal=signal.SIGKILL)))
        result = self.result(process)
        self.assertEqual((result.status, result.exit_code, result.output),
                         ("interrupted", -1, "partial"))

    def test_interrupt_after_the_end_does_nothing(self) -> None:
        process = self.spawn()
        self.end(process)
        self.result(process)
        del self.signals[:]
        process.interrupt()
        self.assertEqual((self.signals, self.reactor.getDelayedCalls()), ([], []))

    def test_exit_codes(self) -> None:
        for reason, expected in (
            (Failure(ProcessDone(0)), ("completed", 0, None)),
            (Failure(ProcessTerminated(exitCode=3)), ("failed", 3, None)),
            (Failure(ProcessTerminated(signal=signal.SIGSEGV)), ("failed", -1, signal.SIGSEGV)),
        ):
            process = self.spawn()
            self.end(process, reason)
            result = self.result(process)
            self.assertEqual((result.status, result.exit_code, result.signal), expected)
