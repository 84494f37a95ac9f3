"""HostlinkService: feature flag, identity waiting, client start/stop, status source."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.client import ClientEvent
from hostlink_tw.config import Settings
from hostlink_tw.identity import AgentState, generate_private_key, write_agent_state
from hostlink_tw.service import HostlinkService

_KEY_CACHE: dict[str, bytes] = {}


def _install_identity(state_path: str, key_path: str, agent_id: str = "agent-1") -> None:
    """Write agent.json and a key (the key generated once per test run)."""
    if "pem" not in _KEY_CACHE:
        scratch = os.path.abspath("_service_key_cache.pem")
        generate_private_key(scratch)
        with open(scratch, "rb") as f:
            _KEY_CACHE["pem"] = f.read()
        os.remove(scratch)
    write_agent_state(state_path, AgentState(agent_id=agent_id))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_KEY_CACHE["pem"])


class FakeClient:
    """Records what the service asks of its client."""

    def __init__(self, settings: Settings, signer: Any, **kwargs: Any) -> None:
        self.settings = settings
        self.signer = signer
        self.agent_id = signer.agent_id
        self.kwargs = kwargs
        self.started = 0
        self.stopped = 0
        self.stop_result: Deferred[None] = succeed(None)
        self.observers: list[Any] = []
        self.tasks: Any = None
        self.session_listeners: list[Any] = []

    def add_session_listener(self, listener: Any) -> Any:
        self.session_listeners.append(listener)
        return lambda: self.session_listeners.remove(listener)

    def start(self) -> None:
        self.started += 1

    def stop(self) -> Deferred[None]:
        self.stopped += 1
        return self.stop_result

    def add_observer(self, observer: Any) -> Any:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    def snapshot(self) -> dict[str, Any]:
        return {"active": True, "url": "ws://127.0.0.1:1/api/v1/agents/ws", "state": "active"}


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.state_path = os.path.join(self.dir, "state")
        self.key_path = os.path.join(self.dir, "state", "agent.key")
        self.settings = Settings(
            enabled=True,
            ws_url="ws://127.0.0.1:1/api/v1/agents/ws",
            state_path=self.state_path,
            private_key_path=self.key_path,
            reconnect_min=1.0,
            reconnect_max=8.0,
        )
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)
        self.clients: list[FakeClient] = []

    def make(self, settings: Settings | None = None) -> HostlinkService:
        def factory(settings: Settings, signer: Any, **kwargs: Any) -> FakeClient:
            client = FakeClient(settings, signer, **kwargs)
            self.clients.append(client)
            return client

        return HostlinkService(
            settings or self.settings,
            reactor=self.clock,
            rng=random.Random(7),
            log=self.log,
            client_factory=factory,
        )

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"] in (LogLevel.error, LogLevel.critical)]

    def test_disabled_makes_no_attempt_and_says_how_to_enable(self) -> None:
        _install_identity(self.state_path, self.key_path)
        service = self.make(replace(self.settings, enabled=False))
        service.startService()
        self.clock.advance(3600)
        self.assertEqual(self.clients, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        infos = [e for e in self.events if "HOSTLINK_WS_ENABLED=true" in e.get("hint", "")]
        self.assertEqual(len(infos), 1)
        self.assertEqual(service.snapshot()["state"], "disabled")
        self.successResultOf(service.stopService())

    def test_no_polling_when_the_agent_takes_no_tasks(self) -> None:
        """Both task flags off and no store file: no HTTP paths, one line saying so."""
        _install_identity(self.state_path, self.key_path)
        service = self.make()
        self.assertFalse(self.settings.delivery_enabled or self.settings.results_enabled)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.clients), 1)
        self.assertIsNone(service.http)
        lines = [e for e in self.events if "task polling off" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.successResultOf(service.stopService())

    def test_start_is_asynchronous_then_starts_client(self) -> None:
        _install_identity(self.state_path, self.key_path, agent_id="agent-42")
        service = self.make()
        service.startService()
        self.assertEqual(self.clients, [], "startService must not do the work inline")
        self.clock.advance(0)
        (client,) = self.clients
        self.assertEqual(client.started, 1)
        self.assertEqual(client.agent_id, "agent-42")
        self.assertIs(client.kwargs["reactor"], self.clock)
        self.assertTrue(service.snapshot()["active"])
        self.successResultOf(service.stopService())
        self.assertEqual(client.stopped, 1)

    def test_start_line_and_status_show_the_url_redacted(self) -> None:
        """Issue 10 item 14: no user info, query value or fragment in the log or /status."""
        _install_identity(self.state_path, self.key_path)
        secret_url = "wss://u:hunter2@cp.example/ws?token=s3cret#frag"

        class LeakyClient(FakeClient):
            def snapshot(self) -> dict[str, Any]:
                return {"active": False, "url": secret_url, "state": "connecting"}

        service = HostlinkService(
            replace(self.settings, ws_url=secret_url, enabled=False),
            reactor=self.clock, log=self.log, client_factory=LeakyClient,
        )
        self.assertEqual(service.snapshot()["url"], "wss://cp.example/ws?token=REDACTED")
        service = HostlinkService(
            replace(self.settings, ws_url=secret_url),
            reactor=self.clock, log=self.log, client_factory=LeakyClient,
        )
        service.startService()
        self.clock.advance(0)
        [starting] = [e for e in self.events if "starting" in e.get("log_format", "")]
        text = formatEvent(starting)
        self.assertIn("wss://cp.example/ws?token=REDACTED", text)
        for secret in ("hunter2", "s3cret", "frag"):
            self.assertNotIn(secret, text)
        self.successResultOf(service.stopService())

    def test_identity_problem_is_logged_escaped(self) -> None:
        """Issue 10 item 13: a state path with a terminal sequence reaches the log escaped."""
        hostile = os.path.join(self.dir, "state\x1b[2J\r")
        service = self.make(replace(self.settings, state_path=hostile))
        service.startService()
        self.clock.advance(0)
        (error,) = self.errors()
        text = formatEvent(error)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\r", text)
        self.assertIn("state\\x1b[2J\\r", text)
        self.assertNotIn("\x1b", service.snapshot()["last_failure"])
        self.successResultOf(service.stopService())

    def test_missing_identity_logs_once_then_starts_when_it_appears(self) -> None:
        service = self.make()
        service.startService()
        self.clock.advance(0)
        self.assertEqual(self.clients, [])
        (error,) = self.errors()
        self.assertIn(os.path.join(self.state_path, "agent.json"), error["problem"])
        snapshot = service.snapshot()
        self.assertEqual(snapshot["state"], "waiting_for_identity")
        self.assertFalse(snapshot["active"])
        self.assertIsNotNone(snapshot["next_retry_at"])
        # Re-checks follow the reconnect backoff and do not repeat the error.
        for _ in range(4):
            self.clock.advance(10)
        self.assertEqual(len(self.errors()), 1)
        self.assertEqual(self.clients, [])
        # Registration writes the identity: the service notices by itself.
        _install_identity(self.state_path, self.key_path)
        self.clock.advance(10 * 1.25)
        (client,) = self.clients
        self.assertEqual(client.started, 1)
        # No identity check is left (the HTTP paths' heartbeat has its timers).
        self.assertEqual([c for c in self.clock.getDelayedCalls()
                          if getattr(c.func, "__name__", "") == "_start_client"], [])
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_missing_key_hint_names_this_agents_identity(self) -> None:
        """
        New-user trial: the hint for a key stored under another name named a
        placeholder directory; the service now gives the loaders both paths.
        """
        key_path = os.path.join(self.dir, "keys", "custom.pem")
        write_agent_state(self.state_path, AgentState(agent_id="agent-1"))
        service = self.make(replace(self.settings, private_key_path=key_path))
        service.startService()
        self.clock.advance(0)
        (error,) = self.errors()
        text = formatEvent(error)
        self.assertIn(f"--state-path {self.state_path}", text)
        self.assertIn(f"--private-key-path {key_path}", text)
        self.assertNotIn("STATE_DIR", text)
        self.successResultOf(service.stopService())

    def test_recheck_delays_grow_and_are_capped(self) -> None:
        service = self.make()
        service.startService()
        self.clock.advance(0)
        delays = []
        for _ in range(8):
            (call,) = self.clock.getDelayedCalls()
            delay = call.getTime() - self.clock.seconds()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertTrue(0.75 <= delays[0] <= 1.25, delays)
        self.assertTrue(all(d <= 8.0 * 1.25 for d in delays), delays)
        self.assertGreater(delays[4], delays[0])
        self.successResultOf(service.stopService())

    def test_unsafe_key_logs_chmod_fix(self) -> None:
        _install_identity(self.state_path, self.key_path)
        os.chmod(self.key_path, 0o644)
        service = self.make()
        service.startService()
        self.clock.advance(0)
        (error,) = self.errors()
        self.assertIn("chmod 600", error["problem"])
        self.assertEqual(self.clients, [])
        self.successResultOf(service.stopService())

    def test_stop_while_waiting_cancels_the_check(self) -> None:
        service = self.make()
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        _install_identity(self.state_path, self.key_path)
        self.clock.advance(3600)
        self.assertEqual(self.clients, [])

    def test_stop_before_first_check(self) -> None:
        _install_identity(self.state_path, self.key_path)
        service = self.make()
        service.startService()
        self.successResultOf(service.stopService())
        self.clock.advance(10)
        self.assertEqual(self.clients, [])

    def test_stop_waits_for_the_client(self) -> None:
        _install_identity(self.state_path, self.key_path)
        service = self.make()
        service.startService()
        self.clock.advance(0)
        (client,) = self.clients
        seen: list[ClientEvent] = []
        service.add_observer(seen.append)
        client.stop_result = Deferred()
        stopping = service.stopService()
        self.assertNoResult(stopping)
        # The client's last events while it stops still reach the observers.
        (forward,) = client.observers
        forward(ClientEvent("closed", {"code": 1000}))
        self.assertEqual([e.kind for e in seen], ["closed"])
        client.stop_result.callback(None)
        self.successResultOf(stopping)
        self.assertEqual(client.observers, [])

    def test_bad_client_configuration_is_logged_not_raised(self) -> None:
        _install_identity(self.state_path, self.key_path)

        def refusing(settings: Settings, signer: Any, **kwargs: Any) -> FakeClient:
            raise ValueError("HOSTLINK_WS_URL must be a ws:// or wss:// URL")

        service = HostlinkService(
            self.settings, reactor=self.clock, log=self.log, client_factory=refusing
        )
        service.startService()
        self.clock.advance(0)
        (error,) = self.errors()
        self.assertIn("ws://", error["error"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(service.stopService())

    def test_observers_see_events_of_a_client_started_later(self) -> None:
        service = self.make()
        seen: list[ClientEvent] = []
        unsubscribe = service.add_observer(seen.append)
        service.startService()
        self.clock.advance(0)
        _install_identity(self.state_path, self.key_path)
        self.clock.advance(2)
        (client,) = self.clients
        (forward,) = client.observers
        forward(ClientEvent("active", {"message_id": "msg_1"}))
        self.assertEqual([e.kind for e in seen], ["active"])
        unsubscribe()
        forward(ClientEvent("inactive", {"reason": "x"}))
        self.assertEqual(len(seen), 1)
        self.successResultOf(service.stopService())

    def test_other_services_of_the_application_unaffected(self) -> None:
        application = MultiService()
        other = Service()
        other.setServiceParent(application)
        self.make().setServiceParent(application)
        application.startService()
        self.clock.advance(0)  # identity missing: logged, not raised
        self.assertTrue(other.running)
        self.assertEqual(len(self.errors()), 1)
        self.successResultOf(application.stopService())
        self.assertFalse(other.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_starts_a_new_client(self) -> None:
        """stopService then startService: connected again, not silently idle."""
        _install_identity(self.state_path, self.key_path)
        service = self.make()
        seen: list[ClientEvent] = []
        service.add_observer(seen.append)
        service.startService()
        self.clock.advance(0)
        self.successResultOf(service.stopService())
        self.assertEqual(service.snapshot()["state"], "stopped")
        service.startService()
        self.clock.advance(0)
        first, second = self.clients
        self.assertEqual((first.started, first.stopped), (1, 1))
        self.assertEqual(second.started, 1)
        self.assertIs(service.client, second)
        # Only the current client's events reach the service's observers.
        self.assertEqual(first.observers, [])
        (forward,) = second.observers
        forward(ClientEvent("active", {}))
        self.assertEqual([e.kind for e in seen], ["active"])
        self.successResultOf(service.stopService())

    def test_client_configuration_error_is_not_called_waiting_for_identity(self) -> None:
        _install_identity(self.state_path, self.key_path)

        def refusing(settings: Settings, signer: Any, **kwargs: Any) -> FakeClient:
            raise ValueError("HOSTLINK_WS_URL must be a ws:// or wss:// URL")

        service = HostlinkService(
            self.settings, reactor=self.clock, log=self.log, client_factory=refusing
        )
        service.startService()
        self.clock.advance(0)
        snapshot = service.snapshot()
        self.assertEqual(snapshot["state"], "misconfigured")
        self.assertIn("ws://", snapshot["last_failure"])
        self.assertIsNone(snapshot["next_retry_at"])
        self.successResultOf(service.stopService())

    def test_status_page_beyond_loopback_warns_once(self) -> None:
        """Issue 10 item 16: one warning at start when the page is reachable from elsewhere."""
        for listen, expected in (
            ("tcp:0", "all interfaces"),
            ("tcp:0:interface=192.0.2.7", "192.0.2.7"),
            ("tcp:0:interface=127.0.0.1", None),
        ):
            with self.subTest(listen=listen):
                del self.events[:]
                from twisted.internet.testing import MemoryReactorClock

                service = HostlinkService(
                    replace(self.settings, status_listen=listen, enabled=False),
                    reactor=MemoryReactorClock(),
                    log=self.log,
                )
                service.startService()
                warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
                if expected is None:
                    self.assertEqual(warnings, [])
                else:
                    (warning,) = warnings
                    self.assertEqual(warning["address"], expected)
                    text = formatEvent(warning)
                    self.assertIn(listen, text)
                    self.assertIn("interface=127.0.0.1", text)
                self.successResultOf(service.stopService())

    def test_bad_status_endpoint_is_logged_not_raised(self) -> None:
        service = self.make(replace(self.settings, status_listen="bogus:1"))
        (error,) = self.errors()
        self.assertIn("bogus:1", error["endpoint"])
        self.assertRaises(KeyError, service.getServiceNamed, "status")
        service.startService()
        self.clock.advance(0)
        self.successResultOf(service.stopService())



def _readme_tac() -> str:
    """The README's embedding snippet, the ``app.tac`` it tells users to write."""
    from tests.test_readme import _section

    code = _section("Embedding in a Twisted application").split("::\n\n", 1)[1]
    code = code.split("\n\n``", 1)[0]
    return "\n".join(line[4:] for line in code.splitlines()) + "\n"


class EmbeddingConfigurationTests(SynchronousTestCase):
    """Issue 9 item 5: configuration problems reach an embedder as one line, never raised."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)
        self.made: list[Any] = []

    def factory(self, settings: Settings, signer: Any, **kwargs: Any) -> FakeClient:
        self.made.append(settings)  # pragma: no cover - must not be reached
        return FakeClient(settings, signer, **kwargs)  # pragma: no cover

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"] in (LogLevel.error, LogLevel.critical)]

    def test_refused_environment_is_one_error_and_misconfigured(self) -> None:
        """The .tac path with a bad CA file and a bad URL: no exception, one line."""
        from twisted.application.service import Application, IService

        from hostlink_tw.config import load_settings

        environ = {
            "HOSTLINK_WS_ENABLED": "true",
            "HOSTLINK_WS_CA_FILE": os.path.abspath(self.mktemp()),
            "HOSTLINK_WS_URL": "http://cp.example/api/v1/agents/ws",
        }
        application = Application("my-daemon")
        other = Service()
        other.setServiceParent(application)
        settings = load_settings(environ, log=self.log)  # what the .tac does: must not raise
        uplink = HostlinkService(
            settings, reactor=self.clock, log=self.log, client_factory=self.factory
        )
        uplink.setServiceParent(application)
        IService(application).startService()
        self.clock.advance(3600)
        (error,) = self.errors()
        text = formatEvent(error)
        self.assertNotIn("\n", text)
        self.assertIn("HOSTLINK_WS_CA_FILE: cannot read", text)
        self.assertIn("HOSTLINK_WS_URL: 'http://cp.example", text)
        self.assertEqual(self.made, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(other.running)
        snapshot = uplink.snapshot()
        self.assertEqual(snapshot["state"], "misconfigured")
        self.assertIn("HOSTLINK_WS_CA_FILE", snapshot["last_failure"])
        self.successResultOf(IService(application).stopService())

    def test_refused_even_when_disabled(self) -> None:
        """A refused value is reported whatever the flag: turning it on must not surprise."""
        settings = Settings(errors=("HOSTLINK_WS_URL: 'x' is not a ws:// or wss:// URL",))
        uplink = HostlinkService(
            settings, reactor=self.clock, log=self.log, client_factory=self.factory
        )
        uplink.startService()
        self.assertEqual(len(self.errors()), 1)
        self.assertEqual(uplink.snapshot()["state"], "misconfigured")
        self.successResultOf(uplink.stopService())

    def test_twistd_runs_the_readme_tac_without_traceback(self) -> None:
        """A real ``twistd -ny app.tac`` with a bad CA file: one error line, no traceback.

        The application keeps running (the uplink only is off); the test waits
        for the error line (30 s at most), then stops twistd with SIGTERM.
        """
        import selectors
        import signal
        import subprocess
        import sys
        import time

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "app.tac"), "w") as handle:
            handle.write(_readme_tac())
        environ = dict(os.environ)
        for name in list(environ):
            if name.startswith(("HOSTLINK_", "SH_CONTROL_PLANE")):
                del environ[name]
        environ.update(
            HOSTLINK_WS_ENABLED="true",
            HOSTLINK_WS_CA_FILE=os.path.join(directory, "missing-ca.pem"),
            HOSTLINK_STATE_PATH=directory,
        )
        code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        process = subprocess.Popen(
            [sys.executable, "-c", code, "-ny", "app.tac"],
            cwd=directory,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = b""
        try:
            assert process.stdout is not None
            selector = selectors.DefaultSelector()
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while b"not started" not in output and time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    output += chunk
            selector.close()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                rest, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()  # never leave it behind, even when the test fails
                rest, _ = process.communicate(timeout=30)
            output += rest
        text = output.decode("utf-8", "replace")
        self.assertNotIn("Traceback", text)
        errors = [line for line in text.splitlines() if "not started" in line]
        self.assertEqual(len(errors), 1, text)
        self.assertIn("HOSTLINK_WS_CA_FILE: cannot read", errors[0])


class StartupImportTests(SynchronousTestCase):
    """The service module does not load the HTTP client (about 80 ms of every start)."""

    def test_no_http_client_until_polling(self) -> None:
        code = ("import sys, hostlink_tw.service; "
                "print('twisted.web.client' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True, env={**os.environ})
        self.assertEqual(done.stdout.strip(), "False", done.stderr)
