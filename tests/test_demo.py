"""``hostlink-tw demo``: how it ends, and what its narration says."""

from __future__ import annotations

import io
import os
import selectors
import signal
import subprocess
import sys
import time

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.client import ClientEvent
from hostlink_tw.demo import _Narrator

WAIT = 60.0


def _default_sigint() -> None:
    # A test runner started in the background may ignore SIGINT, and a
    # child inherits that; Ctrl-C in a terminal finds it at its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_demo_until(
    case: SynchronousTestCase, markers: list[bytes], signum: int, *options: str
) -> tuple[int, str]:
    """
    Run the demo until its output holds every marker, then send ``signum``;
    its exit status and whole output.
    """
    directory = os.path.abspath(case.mktemp())
    process = subprocess.Popen(  # noqa: S603 - our own interpreter
        [sys.executable, "-m", "hostlink_tw", "demo", "--dir", directory, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,  # noqa: PLW1509 - no threads of ours yet
    )
    assert process.stdout is not None
    case.addCleanup(process.stdout.close)
    case.addCleanup(lambda: process.poll() is None and process.kill())
    output = b""
    deadline = time.monotonic() + WAIT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not all(marker in output for marker in markers):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                case.fail(f"not all of {markers} within {WAIT}s:\n{output.decode()}")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                case.fail(f"the demo ended early:\n{output.decode()}")
            output += chunk
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=WAIT)
    return process.returncode, (output + rest).decode(errors="replace")


class SignalTests(SynchronousTestCase):
    def run_until_active_then(self, signum: int) -> tuple[int, str]:
        # The task run starts at once: a stop must end it too.
        return run_demo_until(self, [b"SESSION ACTIVE"], signum, "--restart-after", "600")

    def test_ctrl_c_is_a_clean_exit(self) -> None:
        status, out = self.run_until_active_then(signal.SIGINT)
        self.assertEqual(status, 0, out)
        self.assertIn("code=1000", out.split("stopping: closing the session")[-1])
        self.assertTrue(out.rstrip().endswith("stopped"), out)
        self.assertNotIn("Traceback", out)

    def test_sigterm_is_a_clean_exit(self) -> None:
        status, out = self.run_until_active_then(signal.SIGTERM)
        self.assertEqual(status, 0, out)
        self.assertNotIn("Traceback", out)


class StoryTests(SynchronousTestCase):
    """The whole story of ``make demo``, checked line by line."""

    def test_task_run_across_a_restart_then_a_failing_command(self) -> None:
        status, out = run_demo_until(
            self, [b"running; press Ctrl-C to stop", b"keepalive pong"], signal.SIGINT,
            "--restart-after", "1.5",
        )
        self.assertEqual(status, 0, out)
        self.assertNotIn("Traceback", out)
        self.assertNotIn("CHECK FAILED", out)
        lines = out.splitlines()
        printed = [line.split("| stdout", 1)[1].strip() for line in lines if "| stdout" in line]
        expected = [f"line {i} of 10" for i in range(1, 11)]
        # Each line once, in order (the failing command's line comes after them).
        self.assertEqual(printed[:10], expected, out)
        self.assertEqual(printed[10:], ["looking for /nonexistent"], out)
        restart = out.index("restarting the control plane")
        self.assertLess(out.index("line 1 of 10"), restart, out)
        self.assertLess(restart, out.index("line 10 of 10"), out)
        self.assertEqual(out.count("SESSION ACTIVE"), 2, out)
        order = [
            out.index("→ agent.hello"),
            out.index("← agent.hello_ack"),
            out.index("$ hostlink-tw task run --agent demo-agent"),
            out.index("restarting the control plane"),
            out.index("backing off"),
            out.index("reconnect complete"),
            out.index("task run exited 0; all 10 lines arrived"),
            out.index("| stderr      ls: "),
            out.index("task run exited 3: the command's own exit code"),
            out.index("running; press Ctrl-C"),
            out.index("stopped"),
        ]
        self.assertEqual(order, sorted(order), out)
        self.assertIn("code=1000", out.split("stopping: closing the session")[-1])
        # Each thing said once: one line per control plane start, one per close.
        self.assertEqual(out.count("listening on"), 2, out)
        self.assertEqual(out.count("control plane stopping"), 1, out)
        self.assertNotIn("code=None", out)
        elapsed = float(lines[-1].split("s", 1)[0])
        self.assertLess(elapsed, 60.0, "the demo's story must stay well under two minutes")


class NarrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.narrator = _Narrator(self.out)
        self.observer = self.narrator.log_observer()

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def log(self, namespace: str, level: LogLevel, text: str, **fields: object) -> None:
        events: list[dict[str, object]] = []
        logger = Logger(namespace=namespace, observer=events.append)
        logger.emit(level, text, **fields)
        self.observer(events[0])

    def test_one_line_per_close(self) -> None:
        """The client's inactive event, its warning and its closed event: one line."""
        reason = "closed by control plane: code=1001 reason=control plane stopping"
        self.narrator.on_event(ClientEvent("inactive", {"reason": reason}))
        self.log(
            "hostlink_tw.client",
            LogLevel.warn,
            "connection ended: {reason} close_code={close_code}",
            reason=reason,
            close_code=1001,
        )
        self.narrator.on_event(ClientEvent("closed", {"code": 1001, "reason": reason}))
        lines = self.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].endswith(f"connection closed: {reason}"), lines)

    def test_no_close_code_is_not_none(self) -> None:
        self.narrator.on_event(
            ClientEvent("closed", {"code": None, "reason": "connection failed: refused"})
        )
        (line,) = self.lines()
        self.assertNotIn("None", line)
        self.assertIn("connection failed: refused", line)

    def test_a_code_the_reason_does_not_name_is_shown(self) -> None:
        self.narrator.on_event(ClientEvent("closed", {"code": 1006, "reason": "lost"}))
        (line,) = self.lines()
        self.assertIn("lost (close code 1006)", line)

    def test_control_plane_named_once(self) -> None:
        self.log(
            "hostlink_tw.controlplane",
            LogLevel.info,
            "control plane listening on {url}",
            url="ws://127.0.0.1:1/api/v1/agents/ws",
        )
        (line,) = self.lines()
        self.assertEqual(line.count("control plane"), 1, line)

    def test_other_client_warnings_still_shown(self) -> None:
        self.log("hostlink_tw.client", LogLevel.warn, "upgrade refused: HTTP 401")
        (line,) = self.lines()
        self.assertIn("upgrade refused: HTTP 401", line)


class FailureNarrationTests(SynchronousTestCase):
    """New-user trial: 'log  while calling from thread' said nothing of what failed."""

    def test_a_logged_failure_names_its_error(self) -> None:
        out = io.StringIO()
        observer = _Narrator(out).log_observer()
        events: list[dict[str, object]] = []
        logger = Logger(namespace="twisted.python.threadpool", observer=events.append)
        try:
            raise RuntimeError("the thread's own words")
        except RuntimeError:
            logger.failure("while calling from thread")
        observer(events[0])
        (line,) = out.getvalue().splitlines()
        self.assertIn("while calling from thread: the thread's own words", line)
