"""
``hostlink-tw task …`` and ``hostlink-tw agents`` end to end: a real control
plane built the way ``twistd hostlink-controlplane`` builds it (its options,
its token file), a real agent in this process (HostlinkService, real task
processes), and the command itself — in a thread (it blocks; the reactor
serves both sides meanwhile) or as a process where the process matters
(unreachable, Ctrl-C).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from hostlink_tw import cli
from hostlink_tw.controlplane import ControlPlane
from hostlink_tw.controlplane.tap import ControlPlaneService, Options, makeService
from hostlink_tw.identity import public_key_base64

from .process_support import free_port
from .tasks_support import AGENT, WAIT, InProcessAgent, agent_environ, sleep, wait_until
from .test_client_support import key


def _default_sigint() -> None:
    # A child of a runner that ignores SIGINT would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Base(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.agents_file = os.path.join(self.dir, "agents.json")
        with open(self.agents_file, "w") as f:
            json.dump({AGENT: public_key_base64(key())}, f)
        self.token_file = os.path.join(self.dir, "operator.token")
        self.ports = (free_port(), free_port())
        self.service: ControlPlaneService | None = None
        self.agent: InProcessAgent | None = None

    def start_cp(self, *extra: str) -> ControlPlane:
        """The control plane as twistd starts it (stopped by a cleanup)."""
        options = Options()
        options.parseOptions([
            "--agents", self.agents_file,
            "--listen", f"tcp:{self.ports[0]}:interface=127.0.0.1",
            "--operator-listen", f"tcp:{self.ports[1]}:interface=127.0.0.1",
            "--ping-interval", "0s", "--reload-interval", "0s", *extra,
        ])
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.service = service
        self.addCleanup(self.stop_cp)
        return service.control_plane

    def stop_cp(self) -> Deferred[None] | None:
        service, self.service = self.service, None
        if service is None:
            return None
        return service.stopService()

    @property
    def cp(self) -> ControlPlane:
        assert self.service is not None
        return self.service.control_plane

    @inlineCallbacks
    def start_agent(self, **settings: str) -> Generator[Deferred[Any], Any, None]:
        self.agent = InProcessAgent(self, agent_environ(self.cp.ws_url, self.dir, **settings))
        yield self.cp.wait_active(AGENT, timeout=WAIT)

    def argv(self, *args: str) -> list[str]:
        command, rest = args[0], list(args[1:])
        words = [command] if command == "agents" else [command, rest.pop(0)]
        cut = rest.index("--") if "--" in rest else len(rest)
        return [*words, *rest[:cut], "--operator-url", f"http://127.0.0.1:{self.ports[1]}",
                "--operator-token-file", self.token_file, *rest[cut:]]

    @inlineCallbacks
    def cli(self, *args: str) -> Generator[Deferred[Any], Any, tuple[int, str, str]]:
        """Run ``hostlink-tw ARGS`` in a thread; its status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.out, self.err = out, err
        status = yield threads.deferToThread(cli.main, self.argv(*args), out, err)
        return status, out.getvalue(), err.getvalue()


class TaskRunTests(_Base):
    @inlineCallbacks
    def test_output_on_stdout_and_stderr_and_the_exit_code(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, out, err = yield self.cli(
            "task", "run", "--agent", AGENT, "--",
            "echo out 1; echo err 1 >&2; sleep 0.2; printf 'h\\303\\251 2\\n'; exit 7",
        )
        self.assertEqual((status, out, err), (7, "out 1\nh\u00e9 2\n", "err 1\n"))
        (task,) = self.cp.tasks.list()
        self.assertEqual((task.status, task.exit_code), ("failed", 7))

    @inlineCallbacks
    def test_words_are_joined_like_ssh(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, out, _ = yield self.cli("task", "run", "--agent", AGENT, "--", "echo", "a", "b")
        self.assertEqual((status, out), (0, "a b\n"))
        self.assertEqual(self.cp.tasks.list()[0].command, "echo a b")

    @inlineCallbacks
    def test_killed_is_137_with_a_line_saying_so(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, _, err = yield self.cli("task", "run", "--agent", AGENT, "--", "kill -9 $$")
        self.assertEqual(status, 137)
        self.assertIn("was killed", err)

    @inlineCallbacks
    def test_json_prints_the_events(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, out, _ = yield self.cli("task", "run", "--agent", AGENT, "--json", "--",
                                        "echo hi; exit 4")
        self.assertEqual(status, 4)
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(events[0]["event"], "status")
        self.assertIn({"stream": "stdout", "data": "hi\n"},
                      [{"stream": e.get("stream"), "data": e.get("data")} for e in events])
        self.assertEqual((events[-1]["event"], events[-1]["task"]["exit_code"]), ("end", 4))

    @inlineCallbacks
    def test_output_continues_across_a_control_plane_restart(self) -> Any:
        """Nothing lost, nothing written twice: the follow resumes after its last sequences."""
        self.start_cp()
        yield self.start_agent()
        lines = [f"line {i}" for i in range(1, 9)]
        command = "for i in 1 2 3 4 5 6 7 8; do echo line $i; echo e$i >&2; sleep 0.25; done"
        running = self.cli("task", "run", "--agent", AGENT, "--", command)
        yield wait_until(lambda: "line 2" in self.out.getvalue(), "the first lines")
        yield self.stop_cp()
        self.assertFalse(running.called)
        yield sleep(1.0)
        self.start_cp()
        status, out, err = yield running
        self.assertEqual(status, 0, err)
        self.assertEqual(out.splitlines(), lines)
        self.assertEqual(err.splitlines(), [f"e{i}" for i in range(1, 9)])

    @inlineCallbacks
    def test_unknown_agent_is_2(self) -> Any:
        self.start_cp()
        status, out, err = yield self.cli("task", "run", "--agent", "agent-nobody", "--", "true")
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, "hostlink-tw task run: no authorized agent has the id "
                              "'agent-nobody'\n")

    @inlineCallbacks
    def test_wait_expires_without_a_session_then_2_and_cancelled(self) -> Any:
        self.start_cp()
        started = time.monotonic()
        status, out, err = yield self.cli("task", "run", "--agent", AGENT, "--wait", "1s", "--",
                                          "true")
        self.assertEqual((status, out), (2, ""))
        self.assertIn(f"agent {AGENT} did not take task", err)
        self.assertIn("within 1s", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertLess(time.monotonic() - started, 10)
        (task,) = self.cp.tasks.list()
        self.assertEqual(task.status, "cancelled")

    @inlineCallbacks
    def test_wait_is_for_delivery_not_for_the_command(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, out, _ = yield self.cli("task", "run", "--agent", AGENT, "--wait", "1s", "--",
                                        "sleep 2; echo done")
        self.assertEqual((status, out), (0, "done\n"))

    @inlineCallbacks
    def test_wrong_token_is_2(self) -> Any:
        self.start_cp()
        with open(self.token_file, "w") as f:
            f.write("not-the-token-the-control-plane-has\n")
        status, _, err = yield self.cli("task", "run", "--agent", AGENT, "--", "true")
        self.assertEqual(status, 2)
        self.assertIn("refused the operator token", err)
        self.assertEqual(self.cp.tasks.list(), [])


class OtherCommandTests(_Base):
    @inlineCallbacks
    def test_list_show_logs_cancel_agents(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        status, _, _ = yield self.cli("task", "run", "--agent", AGENT, "--",
                                      "echo to-out; echo to-err >&2; exit 5")
        self.assertEqual(status, 5)
        (task,) = self.cp.tasks.list()

        status, out, _ = yield self.cli("task", "list")
        self.assertEqual(status, 0)
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["TASK", "AGENT", "STATUS", "EXIT", "CREATED", "COMMAND"])
        self.assertEqual(row.split()[:4], [task.task_id, AGENT, "failed", "5"])
        status, out, _ = yield self.cli("task", "list", "--json", "--agent", AGENT)
        self.assertEqual([t["task_id"] for t in json.loads(out)["tasks"]], [task.task_id])

        status, out, _ = yield self.cli("task", "show", task.task_id)
        self.assertEqual(status, 0)
        self.assertIn("status:    failed (exit code 5)", out)
        self.assertIn("--- stdout ---\nto-out\n", out)
        self.assertIn("--- stderr ---\nto-err\n", out)
        status, out, _ = yield self.cli("task", "show", task.task_id, "--json")
        self.assertEqual(json.loads(out)["stderr"], "to-err\n")

        status, out, err = yield self.cli("task", "logs", task.task_id)
        self.assertEqual((status, out, err), (0, "to-out\n", "to-err\n"))

        status, out, _ = yield self.cli("task", "cancel", task.task_id)
        self.assertEqual((status, out), (0, f"task {task.task_id} had already ended: failed "
                                            "(exit code 5)\n"))

        status, out, _ = yield self.cli("agents")
        self.assertEqual(status, 0)
        row = out.splitlines()[1].split()
        self.assertEqual(row[:5], [AGENT, "yes", "active", "yes", "0"])
        status, out, _ = yield self.cli("agents", "--json")
        (agent,) = json.loads(out)["agents"]
        self.assertTrue(agent["session"]["active"])

    @inlineCallbacks
    def test_cancel_and_follow_a_pending_task(self) -> Any:
        self.start_cp()
        task = self.cp.tasks.create(AGENT, "true")
        following = self.cli("task", "logs", "-f", task.task_id)
        yield sleep(0.3)
        self.assertFalse(following.called)
        status, out, _ = yield self.cli("task", "cancel", task.task_id)
        self.assertEqual((status, out), (0, f"task {task.task_id} cancelled\n"))
        status, _, _ = yield following
        self.assertEqual(status, 0)

    @inlineCallbacks
    def test_unknown_task_is_1(self) -> Any:
        self.start_cp()
        for command in ("show", "logs", "cancel"):
            status, out, err = yield self.cli("task", command, "task-nope")
            self.assertEqual((status, out), (1, ""), command)
            self.assertEqual(err, f"hostlink-tw task {command}: no task 'task-nope'\n")


class ProcessTests(_Base):
    """The command as a process: one line and status 2 where a user may provoke errors."""

    def run_process(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "hostlink_tw", *args], capture_output=True, text=True,
            timeout=WAIT, env=env,
        )

    def test_unreachable_is_one_line_and_2(self) -> None:
        with open(self.token_file, "w") as f:
            f.write("some-token-of-enough-length\n")
        os.chmod(self.token_file, 0o600)
        done = self.run_process(*self.argv("task", "run", "--agent", AGENT, "--", "true"))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stdout, "")
        self.assertEqual(
            done.stderr,
            f"hostlink-tw task run: cannot reach the control plane at "
            f"http://127.0.0.1:{self.ports[1]}: connection refused\n",
        )

    def test_user_mistakes_are_one_line_and_2(self) -> None:
        cases = [
            ["task", "run", "--agent", AGENT, "--operator-url", "127.0.0.1:8081", "--", "true"],
            ["task", "run", "--agent", AGENT, "--operator-url", "ftp://x", "--", "true"],
            ["task", "run", "--agent", AGENT, "--operator-token-file", "/nonexistent/t", "--",
             "true"],
            ["task", "run", "--agent", AGENT, "--wait", "soon", "--", "true"],
            ["task", "run", "--agent", AGENT, "--operator-token-file", self.agents_file],
            ["agents", "--operator-url", "http://[::1"],
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTLINK_OPERATOR")}
        for argv in cases:
            done = self.run_process(*argv, env=env)
            self.assertEqual(done.returncode, 2, (argv, done.stderr))
            self.assertNotIn("Traceback", done.stderr)
            self.assertEqual(done.stdout, "")
            self.assertTrue(done.stderr.strip(), argv)
        done = self.run_process("agents", env=env)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("no operator token", done.stderr)

    @inlineCallbacks
    def test_ctrl_c_cancels_the_task_and_exits_130(self) -> Any:
        self.start_cp()
        yield self.start_agent()
        process = subprocess.Popen(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "hostlink_tw",
             *self.argv("task", "run", "--agent", AGENT, "--", "echo started; sleep 30")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_default_sigint,  # noqa: PLW1509 - no threads of ours in the child
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        yield wait_until(
            lambda: [t for t in self.cp.tasks.list() if t.status == "running"], "a running task"
        )
        process.send_signal(signal.SIGINT)
        yield wait_until(lambda: process.poll() is not None, "the command's exit")
        out, err = process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 130, err)
        self.assertNotIn("Traceback", err)
        (task,) = self.cp.tasks.list()
        self.assertIn(f"interrupted; task {task.task_id} cancelled", err)
        self.assertEqual(task.status, "cancelled")
