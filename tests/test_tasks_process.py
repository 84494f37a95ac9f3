"""
End to end with real agent processes (issue 12, "Tests"): ``twistd -n
hostlink`` against the in-process reference control plane, killed with
SIGKILL or stopped with SIGTERM while a task runs, then started again on the
same local store (PROTOCOL §7.6, §8.8).

Each task writes its shell's pid, the leader of its own process group, to a
file, and counts its runs in another.  Every wait is bounded; cleanups kill
any agent process and task group a failed test leaves behind.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial.unittest import TestCase

from hostlink_tw.controlplane import ControlPlane, TaskRecord
from hostlink_tw.wire.tasks import interrupted_final_message_id

from .process_support import AgentProcess
from .tasks_support import (
    AGENT,
    WAIT,
    WireTap,
    agent_environ,
    group_alive,
    kill_group_later,
    read_pgid,
    start_cp,
    store_finals,
    store_output_count,
    wait_until,
)


class AgentProcessTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:  # type: ignore[override]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cp: ControlPlane = yield start_cp(self, self.dir)
        self.tap = WireTap()
        self.tap.attach(self.cp)
        self.env = agent_environ(self.cp.ws_url, self.dir)
        self.store = self.env["HOSTLINK_LOCAL_STORE_PATH"]
        self.pgid_file = os.path.join(self.dir, "pgid")
        self.runs_file = os.path.join(self.dir, "runs.txt")

    @inlineCallbacks
    def start_agent(self) -> Generator[Deferred[Any], Any, AgentProcess]:
        """An agent process, once its session is active."""
        agent = AgentProcess(self, self.env, self.dir)
        active = self.cp.wait_active(AGENT, new=True, timeout=WAIT)
        try:
            yield active
        except defer.TimeoutError:
            self.fail(f"the agent did not connect:\n{agent.log()}")
        return agent

    @inlineCallbacks
    def run_long_task(self) -> Generator[Deferred[Any], Any, tuple[TaskRecord, int]]:
        """A task running in its own group: (its record, its group id)."""
        task = self.cp.tasks.create(
            AGENT, f"echo $$ > {self.pgid_file}; echo run >> {self.runs_file}; "
            "echo started; sleep 30"
        )
        yield wait_until(
            lambda: self.cp.tasks.get(task.task_id).status == "running"
            and os.path.exists(self.pgid_file)
            and self.cp.tasks.output(task.task_id)[0] == "started\n",
            "the task to run",
        )
        pgid = read_pgid(self.pgid_file)
        kill_group_later(self, pgid)
        self.assertTrue(group_alive(pgid))
        return task, pgid

    @inlineCallbacks
    def stop_agent(self, agent: AgentProcess) -> Generator[Deferred[Any], Any, None]:
        ended = agent.ended
        agent.signal("TERM")
        reason = yield ended
        # twistd re-raises SIGTERM after its clean shutdown.
        if isinstance(reason, ProcessTerminated):
            self.assertEqual(reason.signal, signal.SIGTERM, agent.log())
        else:
            self.assertIsInstance(reason, ProcessDone)
        self.assertNotIn("Traceback", agent.log())

    @inlineCallbacks
    def barrier(self) -> Generator[Deferred[Any], Any, None]:
        """Once a new task's final is in, the agent has applied its hello_ack's directives
        and replayed (§7.2: both come before any live message)."""
        barrier = self.cp.tasks.create(AGENT, "true")
        record = yield self.cp.tasks.wait_final(barrier.task_id, timeout=WAIT)
        self.assertEqual(record.status, "completed")

    def runs(self) -> str:
        with open(self.runs_file) as f:
            return f.read()

    def check_interrupted(self, task: TaskRecord, pgid: int) -> str:
        """The rule of §8.8 and §7.6 once the final is in: returns the final's id."""
        record = self.cp.tasks.get(task.task_id)
        self.assertEqual((record.status, record.exit_code), ("interrupted", -1))
        expected = interrupted_final_message_id(task.task_id, task.execution_attempt_id)
        self.assertEqual(expected, f"local-interrupted-{task.task_id}-{task.execution_attempt_id}")
        self.assertEqual(self.cp.tasks.store.final_ids([expected]), {expected})
        self.assertFalse(group_alive(pgid))
        self.assertEqual(self.runs(), "run\n")
        return expected

    @inlineCallbacks
    def test_kill_9_of_the_agent_then_restart(self) -> Any:
        """The group the dead agent left is killed at restart; `interrupted` arrives once."""
        agent = yield self.start_agent()
        task, pgid = yield self.run_long_task()
        # Nothing in flight: the agent has recorded the ack of the task's output, so
        # its restart has only the final to report (the control plane then adopts
        # it from the hello instead of waiting for a replay).
        yield wait_until(lambda: store_output_count(self.store) == 0, "the output's ack")
        ended = agent.ended
        agent.signal("KILL")
        reason = yield ended
        self.assertEqual(reason.signal, signal.SIGKILL)
        # The task outlived its agent: only the restart's recovery ends it.
        self.assertTrue(group_alive(pgid))
        self.assertEqual(self.cp.tasks.get(task.task_id).status, "running")
        self.assertEqual(self.tap.finals(task.execution_attempt_id), [])
        agent = yield self.start_agent()
        record = yield self.cp.tasks.wait_final(task.task_id, timeout=WAIT)
        self.assertEqual(record.status, "interrupted")
        expected = self.check_interrupted(task, pgid)
        yield self.barrier()
        # Recovery comes before the first hello (§7.1): the final is in it, the
        # control plane stores it from there and acknowledges it in the hello_ack,
        # so it is never sent again as a task.final.
        listed = [e.message_id for e in self.tap.sent("hello.unacked_final")]
        self.assertEqual(listed, [expected])
        self.assertEqual(self.tap.finals(task.execution_attempt_id), [])
        yield self.stop_agent(agent)
        self.assertEqual(store_finals(self.store)[0], (expected, "interrupted", 1))
        self.assertIn("killing the process group", agent.log())

    @inlineCallbacks
    def test_sigterm_of_the_agent_mid_task(self) -> Any:
        """The group is killed and `interrupted` sent before the close frame, exactly once."""
        agent = yield self.start_agent()
        session = self.cp.session(AGENT)
        task, pgid = yield self.run_long_task()
        session.when_closed().addCallback(lambda code: self.tap.mark(f"closed {code}"))
        yield self.stop_agent(agent)
        expected = self.check_interrupted(task, pgid)
        finals = self.tap.finals(task.execution_attempt_id)
        self.assertEqual([f.message_id for f in finals], [expected])
        # Sent on the session, before its close frame (§8.8).
        close = next(e for e in self.tap.events if isinstance(e, str) and e.startswith("closed"))
        self.assertLess(self.tap.index(finals[0]), self.tap.index(close))
        self.assertEqual(close, "closed 1000")
        # Recorded with the §7.6 id, and acked before the connection ended: the
        # control plane's ack precedes its close reply on the same stream, and
        # the service closes the store only once the acks are recorded.
        self.assertEqual(store_finals(self.store), [(expected, "interrupted", 1)])
        # So a restart has nothing of it to replay.
        agent = yield self.start_agent()
        yield self.barrier()
        self.assertEqual(len(self.tap.finals(task.execution_attempt_id)), 1)
        self.assertEqual(self.tap.sent("hello.unacked_final"), [])
        yield self.stop_agent(agent)
        self.assertEqual(store_finals(self.store)[0], (expected, "interrupted", 1))
        self.assertEqual(self.runs(), "run\n")
