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


class SignalTests(SynchronousTestCase):
    def run_until_active_then(self, signum: int) -> tuple[int, str]:
        directory = os.path.abspath(self.mktemp())
        process = subprocess.Popen(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "hostlink_tw", "demo", "--dir", directory,
             "--restart-after", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,  # noqa: PLW1509 - no threads of ours yet
        )
        assert process.stdout is not None
        self.addCleanup(process.stdout.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        output = b""
        deadline = time.monotonic() + WAIT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"SESSION ACTIVE" not in output:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.fail(f"no active session within {WAIT}s:\n{output.decode()}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    self.fail(f"the demo ended early:\n{output.decode()}")
                output += chunk
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=WAIT)
        return process.returncode, (output + rest).decode(errors="replace")

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
