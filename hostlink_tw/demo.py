"""
``hostlink-tw demo``: the whole uplink on one machine, narrated.

It creates a throwaway identity under ``.demo/``, starts the reference
control plane on 127.0.0.1 with that agent authorized (and its operator API,
token in ``.demo/operator.token``), and runs the agent (the same
:class:`~hostlink_tw.service.HostlinkService` that ``twistd hostlink`` runs,
with task delivery and results on) against it, printing what happens: the
signed upgrade accepted, hello → hello_ack, the session active, keepalive
pings.

Once the session is up, it runs ``hostlink-tw task run`` (the real command,
as a child process) of a command that prints ten lines over five seconds,
and restarts the control plane in the middle of it (``--restart-after``,
seconds after the command's first line arrived, so a slow start cannot
move the restart before the command): the session drops, the command
goes on running on the agent, the agent backs off and reconnects and
replays what was not acked, and ``task run`` reconnects and resumes after
the last line it printed.  The demo checks that all ten lines arrived, in
order, each once.  Then a failing command, whose exit code ``task run``
exits with.  It then runs until Ctrl-C (or ``--duration``), and ends
everything cleanly; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure

from hostlink_tw.agent.identity import AgentState
from hostlink_tw.client import ClientEvent
from hostlink_tw.config import Settings
from hostlink_tw.controlplane import ControlPlane, start_control_plane
from hostlink_tw.controlplane.operatortoken import load_or_create_token
from hostlink_tw.demo_tasks import (
    FAILING_EXIT,
    LINES,
    TaskRun,
    count_command,
    counted_lines,
    failing_command,
)
from hostlink_tw.provisioning import generate_private_key, write_agent_state
from hostlink_tw.service import HostlinkService

__all__ = ["run_demo"]

DEMO_AGENT_ID = "demo-agent"
# Shorter than production so a reader sees every phase within seconds.
DEMO_PING_INTERVAL = 3.0
DEMO_RECONNECT_MIN = 1.0
DEMO_RECONNECT_MAX = 4.0
# How long the control plane stays down during the restart.
DOWN_FOR = 2.0
#: Seconds after the first task's first line until the restart: mid-way through that task.
DEFAULT_RESTART_AFTER = 1.5
# Bound on each wait for the session, so the demo never hangs silently.
ACTIVE_TIMEOUT = 30.0


# Message types not narrated one by one (there are many, and the output is shown).
_QUIET = frozenset({"task.output", "ack"})


class _Narrator:
    """Prints the agent's events and the stack's log lines as a readable story."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self._waiters: list[tuple[str, Deferred[ClientEvent]]] = []

    def say(self, who: str, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.out.write(f"{elapsed:6.1f}s  {who:<13} {text}\n")
        self.out.flush()

    def on_event(self, event: ClientEvent) -> None:
        f = event.fields
        kind = event.kind
        if kind == "attempt":
            self.say("agent", f"attempt {f.get('attempt')}: signed upgrade to {f.get('url')}")
        elif kind == "connected":
            self.say("agent", "upgrade accepted (signature verified by the control plane)")
        elif kind == "refused":
            self.say("agent", f"upgrade refused: HTTP {f.get('status')} {f.get('reason', '')}")
        elif kind == "message_out":
            # Output chunks and their acks: task run's own lines show them.
            if f.get("type") not in _QUIET:
                self.say("agent", f"→ {f.get('type')} {f.get('message_id')}")
        elif kind == "message_in":
            if f.get("type") not in _QUIET:
                self.say("agent", f"← {f.get('type')} {f.get('message_id')}")
        elif kind == "active":
            self.say("agent", "SESSION ACTIVE")
        elif kind == "closed":
            # One line per connection: the reason names the close code when
            # there was one ("inactive", which precedes it, says the same).
            reason = str(f.get("reason") or "")
            code = f.get("code")
            if code is not None and f"code={code}" not in reason:
                reason = f"{reason} (close code {code})"
            self.say("agent", f"connection closed: {reason}")
        elif kind == "retry_scheduled":
            self.say("agent", f"backing off: next attempt in {f.get('delay', 0):.2f}s")
        elif kind == "ping":
            self.say("agent", "keepalive ping →")
        elif kind == "pong":
            self.say("agent", "keepalive pong ←")
        for wanted, d in list(self._waiters):
            if wanted == kind:
                self._waiters.remove((wanted, d))
                d.callback(event)

    def wait_for(self, kind: str, reactor: Any, timeout: float) -> Deferred[ClientEvent]:
        d: Deferred[ClientEvent] = Deferred()
        entry = (kind, d)
        self._waiters.append(entry)

        def forget(result: object) -> object:
            # A waiter that timed out must not be fired later.
            if entry in self._waiters:
                self._waiters.remove(entry)
            return result

        d.addTimeout(timeout, reactor)
        d.addBoth(forget)
        return d

    def log_observer(self) -> Any:
        """Warnings and errors of the stack, and the control plane's info lines."""

        def observe(event: dict[str, Any]) -> None:
            namespace = event.get("log_namespace", "")
            level = event.get("log_level")
            if namespace.startswith("hostlink_tw.client") and "close_code" in event:
                return  # the end of a connection: the "closed" event narrates it
            if namespace.startswith("hostlink_tw.controlplane"):
                text = formatEvent(event)
                # "control plane  control plane listening…" says it twice.
                self.say("control plane", text.removeprefix("control plane "))
            elif level is not None and level >= LogLevel.warn:
                text = formatEvent(event)
                failure = event.get("log_failure")
                if failure is not None:
                    # The failure's own words, not only the message around it.
                    text += f": {failure.getErrorMessage() or type(failure.value).__name__}"
                self.say("log", text)

        predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        observer: Any = observe
        return FilteringLogObserver(observer, [predicate])


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


# What a previous run left that this one must not inherit (its tasks, its agent's store).
_LEFTOVERS = ("tasks.db", os.path.join("state", "task_store.db"))


class _DemoRun:
    """One demo: the control plane, the agent service, the task commands, and their cleanup."""

    def __init__(self, reactor: Any, narrator: _Narrator, directory: str) -> None:
        self.reactor = reactor
        self.narrator = narrator
        self.directory = os.path.abspath(directory)
        self.cp: ControlPlane | None = None
        self.service: HostlinkService | None = None
        self.child: TaskRun | None = None
        self.stopping = False
        #: Fires at the first line of the first command (the restart counts from it).
        self._first_line: Deferred[None] = Deferred()
        #: False once a check failed (the exit status is then 1).
        self.ok = True
        self.token = ""
        self.token_file = os.path.join(self.directory, "operator.token")

    async def _start_cp(self, public_key: Any, listen: str, operator_listen: str) -> ControlPlane:
        self.cp = await start_control_plane(
            {DEMO_AGENT_ID: public_key},
            listen=listen,
            operator_listen=operator_listen,
            operator_token=self.token,
            # Tasks and their output survive the restart in this file.
            tasks_database=os.path.join(self.directory, "tasks.db"),
            reactor=self.reactor,
        )
        return self.cp

    def _forget_leftovers(self) -> None:
        for name in _LEFTOVERS:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(os.path.join(self.directory, name + suffix))
                except FileNotFoundError:
                    pass

    async def run(self, restart_after: float) -> None:
        """The story; once told, the demo keeps running until stopped."""
        narrator, reactor = self.narrator, self.reactor
        state_path = os.path.join(self.directory, "state")
        key_path = os.path.join(state_path, "agent.key")
        key = generate_private_key(key_path)
        write_agent_state(state_path, AgentState(agent_id=DEMO_AGENT_ID))
        self._forget_leftovers()
        self.token, _ = load_or_create_token(self.token_file)
        narrator.say("demo", f"throwaway identity {DEMO_AGENT_ID!r} in {state_path}")

        # The control plane's own log line says where it listens.
        loopback = "tcp:0:interface=127.0.0.1"
        cp = await self._start_cp(key.public_key(), loopback, loopback)
        ports = (cp.port, int(cp.operator_url.rsplit(":", 1)[1]))
        operator_url = cp.operator_url
        settings = Settings(
            enabled=True,
            ws_url=cp.ws_url,
            control_plane_url=cp.url,  # heartbeats and polls stay on loopback too
            state_path=state_path,
            private_key_path=key_path,
            ping_interval=DEMO_PING_INTERVAL,
            reconnect_min=DEMO_RECONNECT_MIN,
            reconnect_max=DEMO_RECONNECT_MAX,
            delivery_enabled=True,
            results_enabled=True,
            local_store_path=os.path.join(state_path, "task_store.db"),
        )
        self.service = HostlinkService(settings, reactor=reactor)
        self.service.add_observer(narrator.on_event)
        active = narrator.wait_for("active", reactor, ACTIVE_TIMEOUT)
        self.service.startService()
        await active

        restart = ensureDeferred(self._restart_later(key.public_key(), ports, restart_after))
        restart.addErrback(self._failed)
        await self._tasks(operator_url)
        if not self.stopping:
            narrator.say("demo", "running; press Ctrl-C to stop")

    async def _restart_later(self, public_key: Any, ports: tuple[int, int], after: float) -> None:
        narrator = self.narrator
        # Counted from the command's first line, not from a clock started
        # earlier: on a busy machine the task may take seconds to begin.
        await self._first_line.addTimeout(ACTIVE_TIMEOUT, self.reactor)
        await _sleep(self.reactor, after)
        cp = self.cp
        if self.stopping or cp is None:
            return
        narrator.say("demo", "--- restarting the control plane: the session drops; the command "
                     "runs on, the agent's store keeps its output until acked ---")
        await cp.stop()
        self.cp = None
        await _sleep(self.reactor, DOWN_FOR)
        if self.stopping:
            return
        gateway, operator = (f"tcp:{port}:interface=127.0.0.1" for port in ports)
        cp = await self._start_cp(public_key, gateway, operator)
        if self.stopping:
            # stop() ran while this one was starting: it is ours to close.
            self.cp = None
            await cp.stop()
            return
        # Resumed in the turn the port was bound: no session can be up yet.
        await narrator.wait_for("active", self.reactor, ACTIVE_TIMEOUT)
        narrator.say("demo", "--- session is back: reconnect complete; the agent replays what "
                     "was not acked, task run resumes after its last line ---")

    async def _tasks(self, operator_url: str) -> None:
        narrator = self.narrator
        narrator.say("demo", f"--- a command on the agent from the command line, {LINES} lines "
                     "over a few seconds; the control plane restarts in the middle ---")
        status, lines = await self._task_run(operator_url, count_command())
        if self.stopping:
            return
        if status == 0 and lines == counted_lines():
            narrator.say("demo", f"task run exited 0; all {LINES} lines arrived, in order, "
                         "none lost, none twice")
        else:
            self.ok = False
            narrator.say("demo", f"CHECK FAILED: task run exited {status}, printed {lines!r}")
        narrator.say("demo", "--- a failing command: task run exits with its exit code ---")
        status, _ = await self._task_run(operator_url, failing_command())
        if self.stopping:
            return
        if status == FAILING_EXIT:
            narrator.say("demo", f"task run exited {status}: the command's own exit code")
        else:
            self.ok = False
            narrator.say("demo", f"CHECK FAILED: task run exited {status}, not {FAILING_EXIT}")

    async def _task_run(self, operator_url: str, command: str) -> tuple[int, list[str]]:
        def line(stream: str, text: str) -> None:
            self.narrator.say(f"| {stream}", text)
            if not self._first_line.called:
                self._first_line.callback(None)

        child = TaskRun(self.reactor, operator_url=operator_url, token_file=self.token_file,
                        agent_id=DEMO_AGENT_ID, command=command, on_line=line)
        self.narrator.say("you", f"$ {child.shown()}")
        self.child = child
        status = await child.start()
        self.child = None
        return status, child.stdout

    def _failed(self, failure: Failure) -> None:
        self.ok = False
        self.narrator.say("demo", f"failed: {failure.getErrorMessage() or repr(failure.value)}")
        if self.reactor.running:
            self.reactor.stop()

    async def stop(self) -> None:
        """End the command, close the session (1000) and the control plane; safe at any point."""
        self.stopping = True
        child, self.child = self.child, None
        if child is not None:
            await child.kill()
        service, self.service = self.service, None
        if service is not None and service.running:
            self.narrator.say("demo", "stopping: closing the session and the control plane")
            await service.stopService()
        cp, self.cp = self.cp, None
        if cp is not None:
            await cp.stop()


def run_demo(
    directory: str = ".demo",
    duration: float | None = None,
    restart_after: float = DEFAULT_RESTART_AFTER,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo on the global reactor; return the exit status (1: a check failed)."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor

    narrator = _Narrator(out)
    globalLogBeginner.beginLoggingTo(
        [narrator.log_observer()], discardBuffer=True, redirectStandardIO=False
    )
    demo = _DemoRun(reactor, narrator, directory)

    # Ctrl-C (SIGINT), SIGTERM or --duration stop the reactor: that is how
    # the demo is meant to end.  Everything is closed before the reactor exits.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(demo.stop()))

    def begin() -> None:
        ensureDeferred(demo.run(restart_after)).addErrback(demo._failed)
        if duration is not None:
            reactor.callLater(duration, lambda: reactor.running and reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    narrator.say("demo", "stopped")
    return 0 if demo.ok else 1
