"""
``hostlink-tw demo``: the whole uplink on one machine, narrated.

It creates a throwaway identity under ``.demo/``, starts the reference
control plane on 127.0.0.1 with that agent authorized, and runs the agent
(the same :class:`~hostlink_tw.service.HostlinkService` that ``twistd
hostlink`` runs) against it, printing what happens: the signed upgrade
accepted, hello → hello_ack, the session active, keepalive pings.  After a
few seconds it restarts the control plane once, so the session drops, the
agent backs off and the session comes back.  It then runs until Ctrl-C (or
``--duration``), and ends everything cleanly.
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
# Bound on each wait for the session, so the demo never hangs silently.
ACTIVE_TIMEOUT = 30.0


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
            self.say("agent", f"→ {f.get('type')} {f.get('message_id')}")
        elif kind == "message_in":
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


class _DemoRun:
    """One demo: the control plane, the agent service, and their cleanup."""

    def __init__(self, reactor: Any, narrator: _Narrator, directory: str) -> None:
        self.reactor = reactor
        self.narrator = narrator
        self.directory = directory
        self.cp: ControlPlane | None = None
        self.service: HostlinkService | None = None

    async def _start_cp(self, public_key: Any, listen: str) -> ControlPlane:
        self.cp = await start_control_plane(
            {DEMO_AGENT_ID: public_key}, listen=listen, reactor=self.reactor
        )
        return self.cp

    async def run(self, duration: float | None, restart_after: float) -> int:
        narrator, reactor = self.narrator, self.reactor
        state_path = os.path.abspath(os.path.join(self.directory, "state"))
        key_path = os.path.join(state_path, "agent.key")
        key = generate_private_key(key_path)
        write_agent_state(state_path, AgentState(agent_id=DEMO_AGENT_ID))
        narrator.say("demo", f"throwaway identity {DEMO_AGENT_ID!r} in {state_path}")

        # The control plane's own log line says where it listens.
        cp = await self._start_cp(key.public_key(), "tcp:0:interface=127.0.0.1")
        port = cp.port
        settings = Settings(
            enabled=True,
            ws_url=cp.ws_url,
            state_path=state_path,
            private_key_path=key_path,
            ping_interval=DEMO_PING_INTERVAL,
            reconnect_min=DEMO_RECONNECT_MIN,
            reconnect_max=DEMO_RECONNECT_MAX,
        )
        self.service = HostlinkService(settings, reactor=reactor)
        self.service.add_observer(narrator.on_event)
        active = narrator.wait_for("active", reactor, ACTIVE_TIMEOUT)
        self.service.startService()
        await active

        def left() -> float:
            if duration is None:
                return float("inf")
            return duration - (time.monotonic() - narrator.started)

        await _sleep(reactor, min(restart_after, max(0.0, left())))
        if left() <= 0:
            return 0  # --duration ended the demo before the restart
        narrator.say("demo", "--- restarting the control plane: the session will drop ---")
        await cp.stop()
        self.cp = None
        await _sleep(reactor, DOWN_FOR)
        back = narrator.wait_for("active", reactor, ACTIVE_TIMEOUT)
        await self._start_cp(key.public_key(), f"tcp:{port}:interface=127.0.0.1")
        await back
        narrator.say("demo", "--- session is back: reconnect complete ---")

        if duration is None:
            narrator.say("demo", "running; press Ctrl-C to stop")
            await Deferred()  # until the reactor stops
        elif left() > 0:
            await _sleep(reactor, left())
        return 0

    async def stop(self) -> None:
        """Close the session (1000) and the control plane; safe at any point."""
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
    restart_after: float = 6.0,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo on the global reactor; return the exit status."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor

    narrator = _Narrator(out)
    globalLogBeginner.beginLoggingTo(
        [narrator.log_observer()], discardBuffer=True, redirectStandardIO=False
    )
    demo = _DemoRun(reactor, narrator, directory)
    status, finished_run = 1, False

    def shutting_down() -> Deferred[None]:
        nonlocal status
        # Ctrl-C (SIGINT) or SIGTERM stops the reactor before the run ends:
        # that is how the demo is meant to end, so it is a success.
        if not finished_run:
            status = 0
        return ensureDeferred(demo.stop())

    # Everything is closed before the reactor exits.
    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)

    def finished(outcome: object) -> None:
        nonlocal status, finished_run
        finished_run = True
        if isinstance(outcome, Failure):
            narrator.say("demo", f"failed: {outcome.getErrorMessage() or repr(outcome.value)}")
        else:
            status = outcome if isinstance(outcome, int) else 1
        if reactor.running:
            reactor.stop()

    def begin() -> None:
        ensureDeferred(demo.run(duration, restart_after)).addBoth(finished)

    reactor.callWhenRunning(begin)
    reactor.run()
    narrator.say("demo", "stopped")
    return status
