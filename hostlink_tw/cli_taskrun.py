"""
Following a task's output from the command line: what ``hostlink-tw task
run`` and ``hostlink-tw task logs`` share (:class:`Follower`), and how a
finished task becomes the command's exit status (:func:`exit_status`).

The follower reads the operator API's event stream
(:mod:`~hostlink_tw.controlplane.operatorfollow`) and writes each output
chunk to the terminal's stdout or stderr as it arrives.  When the
connection breaks (the control plane restarts), it connects again for up to
:data:`RECONNECT_FOR` seconds and asks for what follows the last sequence
of each stream it wrote: nothing is lost or written twice.  With a delivery
wait, a task the agent has not taken (received) when it expires is
cancelled and the command ends with status 2.

Exit statuses of ``task run``:

=========  ==============================================================
0          the command completed
1–255      the command failed with that exit code
130        the task was cancelled (Ctrl-C cancels the task it started)
137        the command was killed: by a signal, or by the agent's task
           timeout (the agent reports exit code -1 for both; 128 + SIGKILL)
143        the task was interrupted: the agent stopped or restarted while
           it ran (128 + SIGTERM, the signal the agent's stop sends)
2          hostlink-tw itself could not do it (control plane unreachable,
           token refused, agent unknown, delivery wait expired, …)
=========  ==============================================================
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from hostlink_tw.operatorclient import OperatorClient, OperatorError, UnreachableError, task_path
from hostlink_tw.safetext import escape_control

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_CLI",
    "EXIT_INTERRUPTED",
    "EXIT_KILLED",
    "RECONNECT_FOR",
    "CommandFailedError",
    "Follower",
    "Terminal",
    "exit_status",
]

EXIT_CLI = 2
EXIT_CANCELLED = 130
EXIT_KILLED = 137
EXIT_INTERRUPTED = 143
#: How long a broken follow is retried before giving up (a restart takes seconds).
RECONNECT_FOR = 30.0
# Between reconnection attempts.
_RETRY_DELAYS = (0.2, 0.5, 1.0)
_WAITING = ("pending", "delivered")
_STREAMS = ("stdout", "stderr")


class CommandFailedError(Exception):
    """The command ends with ``status`` after printing ``message`` (one line) on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def exit_status(task: Mapping[str, Any]) -> int:
    """The exit status of ``task run`` for a finished task (see the module's table)."""
    status, code = task.get("status"), task.get("exit_code")
    if status == "completed":
        return 0
    if status == "failed":
        if code == -1:
            return EXIT_KILLED
        if isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255:
            return code
        return 1
    if status == "interrupted":
        return EXIT_INTERRUPTED
    if status == "cancelled":
        return EXIT_CANCELLED
    return EXIT_CLI


def describe_end(task: Mapping[str, Any]) -> str | None:
    """A line for stderr when the end needs words (not for an ordinary exit code)."""
    task_id = escape_control(str(task.get("task_id")), 80)
    status = task.get("status")
    if status == "failed" and task.get("exit_code") == -1:
        return (f"task {task_id} was killed (by a signal, or by the agent's task timeout); "
                f"exit status {EXIT_KILLED}")
    if status == "interrupted":
        return (f"task {task_id} was interrupted: the agent stopped while it ran; "
                f"exit status {EXIT_INTERRUPTED}")
    if status == "cancelled":
        return f"task {task_id} was cancelled; exit status {EXIT_CANCELLED}"
    return None


class Terminal:
    """Where the task's output and our own lines go."""

    def __init__(
        self, out: TextIO, err: TextIO, *, progress: bool, name: str = "hostlink-tw"
    ) -> None:
        """
        :param progress: Show a progress line on ``err`` (it is a terminal).
        :param name: What our own lines start with (``hostlink-tw task run``).
        """
        self.out = out
        self.err = err
        self.name = name
        self._progress_enabled = progress
        self._progress_shown = False

    def write(self, stream: str, text: str) -> None:
        """Write task output to our stdout or stderr, as it came (UTF-8)."""
        target = self.err if stream == "stderr" else self.out
        # Both usually reach one screen: the progress line goes first.
        self.clear()
        buffer = getattr(target, "buffer", None)
        if buffer is None:
            target.write(text)
            target.flush()
            return
        target.flush()
        buffer.write(text.encode("utf-8", "replace"))
        buffer.flush()

    def event(self, event: Mapping[str, Any]) -> None:
        """One event as a JSON line (``--json``)."""
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def progress(self, text: str) -> None:
        """Replace the progress line (only on a terminal)."""
        if self._progress_enabled:
            self.err.write("\r\x1b[K" + text)
            self.err.flush()
            self._progress_shown = True

    def clear(self) -> None:
        """Remove the progress line, if shown."""
        if self._progress_shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._progress_shown = False

    def note(self, text: str) -> None:
        """One line of ours on stderr."""
        self.clear()
        self.err.write(f"{self.name}: {text}\n")
        self.err.flush()


class Follower:
    """Follows one task's events until its end, reconnecting when the connection breaks."""

    def __init__(
        self,
        client: OperatorClient,
        task: Mapping[str, Any],
        terminal: Terminal,
        *,
        follow: bool = True,
        json_events: bool = False,
        wait: float | None = None,
        refused_status: int = EXIT_CLI,
        reconnect_for: float = RECONNECT_FOR,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """
        :param task: The task as the API returned it (``task_id``, ``agent_id``, …).
        :param follow: Wait for the end; False: the stored output, then stop.
        :param json_events: Write the events as JSON lines instead of the output.
        :param wait: Seconds the agent has to take the task before it is
            cancelled (None or 0: no limit); counted from now.
        :param refused_status: The exit status when the first request is
            refused (no such task).
        """
        self._client = client
        self.task = dict(task)
        self._terminal = terminal
        self._follow = follow
        self._json = json_events
        self._wait = wait or None
        self._refused_status = refused_status
        self._connected = False
        self._reconnect_for = reconnect_for
        self._clock = clock
        self._sleep = sleep
        self._started = clock()
        self._attempt = str(task.get("execution_attempt_id") or "")
        self._after = dict.fromkeys(_STREAMS, 0)
        self.task_id = str(task.get("task_id"))
        self._shown_id = escape_control(self.task_id, 80)

    def run(self) -> dict[str, Any]:
        """
        Follow to the end; the task as it ended.

        :raises CommandFailedError: The follow cannot go on (see its message).
        """
        lost_since: float | None = None
        failures = 0
        while True:
            try:
                path = task_path(self.task_id, "output")
                with self._client.stream(path, self._query()) as events:
                    for event in events:
                        lost_since, failures, self._connected = None, 0, True
                        if self._handle(event):
                            return self.task
                self._terminal.clear()
            except UnreachableError as e:
                now = self._clock()
                if lost_since is None:
                    lost_since = now
                    if self._follow:
                        self._terminal.progress(f"{self._terminal.name}: {e}; reconnecting")
                if not self._follow or now - lost_since >= self._reconnect_for:
                    self._terminal.clear()
                    raise CommandFailedError(
                        EXIT_CLI,
                        f"{e}; gave up after {self._reconnect_for:g}s. Task {self._shown_id} "
                        f"may still run: hostlink-tw task show {self._shown_id}",
                    ) from None
                self._sleep(_RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)])
                failures += 1
            except OperatorError as e:
                self._terminal.clear()
                if not self._connected and e.code is not None and e.status != 401:
                    raise CommandFailedError(self._refused_status, str(e)) from None
                if e.code == "unknown_task":
                    raise CommandFailedError(
                        EXIT_CLI,
                        f"the control plane no longer knows task {self._shown_id} (restarted "
                        f"without its tasks database?)",
                    ) from None
                raise CommandFailedError(EXIT_CLI, str(e)) from None

    def _query(self) -> dict[str, str]:
        return {
            "follow": "1" if self._follow else "0",
            "attempt": self._attempt,
            "after_stdout": str(self._after["stdout"]),
            "after_stderr": str(self._after["stderr"]),
        }

    def _handle(self, event: Mapping[str, Any]) -> bool:
        """Act on one event; True at the end."""
        kind = event.get("event")
        if kind in ("status", "end"):
            task = event.get("task")
            if not isinstance(task, dict):
                raise OperatorError("the control plane sent a status event without its task")
            self.task = task
            attempt = str(task.get("execution_attempt_id") or "")
            if attempt != self._attempt:
                # A new attempt: its output starts again from sequence 1.
                self._attempt, self._after = attempt, dict.fromkeys(_STREAMS, 0)
        if self._json:
            self._terminal.event(event)
        if kind == "output":
            self._output(event)
        if kind == "end":
            self._terminal.clear()
            return True
        self._check_delivery()
        return False

    def _output(self, event: Mapping[str, Any]) -> None:
        stream, sequence, data = event.get("stream"), event.get("sequence"), event.get("data")
        if (
            stream not in _STREAMS
            or not isinstance(sequence, int)
            or not isinstance(data, str)
            or event.get("execution_attempt_id") != self._attempt
        ):
            return
        if sequence <= self._after[stream]:
            return  # already written (a replay after reconnecting)
        self._after[stream] = sequence
        if not self._json:
            self._terminal.write(stream, data)

    def _check_delivery(self) -> None:
        """While the agent has not taken the task: the progress line and the --wait limit."""
        if self._wait is None or self.task.get("status") not in _WAITING:
            self._terminal.clear()
            return
        waited = self._clock() - self._started
        agent = escape_control(str(self.task.get("agent_id")), 80)
        if waited < self._wait:
            state = "delivered, not yet received" if self.task.get("status") == "delivered" else (
                "no session with delivery yet")
            self._terminal.progress(
                f"{self._terminal.name}: waiting for agent {agent} to take task {self._shown_id} "
                f"({state}; {waited:.0f}s of {self._wait:g}s)"
            )
            return
        self._terminal.clear()
        try:
            task = self._client.request("POST", task_path(self.task_id, "cancel"))
        except OperatorError as e:
            raise CommandFailedError(
                EXIT_CLI,
                f"agent {agent} did not take task {self._shown_id} within {self._wait:g}s, "
                f"and cancelling it failed: {e}",
            ) from None
        if task.get("status") != "cancelled":
            self.task = task  # it moved on meanwhile: follow it after all
            return
        raise CommandFailedError(
            EXIT_CLI,
            f"agent {agent} did not take task {self._shown_id} within {self._wait:g}s (is it "
            f"connected, with HOSTLINK_WS_DELIVERY_ENABLED=true? see 'hostlink-tw agents'); "
            f"the task is cancelled",
        )
